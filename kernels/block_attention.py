"""Flash-style Pallas attention for a block of T queries against a KV cache.

Blockwise verification, tree verification and block diffusion all score a
block of ``T`` new tokens per row in one model call. The block's keys and
values are already written into the cache at ``offsets[b] .. offsets[b]+T-1``
and the committed prefix is ``0 .. offsets[b]-1``; cache slots after the block
are stale or empty. Visibility is given by a static ``BlockMask`` (see
``masks.py``) plus the runtime ``offsets``, or by a ``RuntimeMask`` (a tree
or a pattern) whose pattern (per row or shared) is computed in the trace and
read by the kernel exactly like a static one.

Shapes::

    q        [B, T, H, D]       H = H_kv * G  (grouped-query attention)
    k, v     [B, S, H_kv, D]    the cache, block already written
    offsets  [B] int32          0 <= offsets[b] and offsets[b] + T <= S
    out      [B, T, H, D]       dtype of q

Query head ``h`` reads KV head ``h // G`` (the ``jnp.repeat`` convention).

How the kernel works
--------------------
The wrapper gathers, for each KV head, the ``G * T`` query rows that share it
(row ``r = g * T + t``), so one program computes a ``[block_q, D]`` tile of
rows against one KV head: grid ``(B, H_kv, R_pad // block_q)``. Inside, KV
tiles of ``block_kv`` keys are visited with an online softmax (running max
``m``, running sum ``l``, float32 accumulator), in two ``lax.fori_loop``s
whose trip counts are *runtime* values read from ``offsets[b]``:

1. tiles ``[0, n_full)`` with ``n_full = min(offset, S) // block_kv`` lie
   wholly in the committed prefix: every key is visible, no mask is built;
2. tiles ``[n_full, n_end)`` with ``n_end = min(cdiv(offset + T, block_kv),
   S_pad // block_kv)`` touch the block: the mask
   ``s < offset | pattern[t, s - offset]`` is applied.

Tiles ``>= n_end`` hold only keys at or after ``offset + T``; the mask
excludes them entirely, so they are never loaded or computed (the loops stop
before them). ``skipped_kv_tile_fraction`` reports how many that is.

The within-block pattern lookup ``pattern[t, s - offset]`` with a runtime
``offset`` would be a gather, which neither Triton nor Mosaic lowers. It is
done instead as a small matmul: ``pattern_rows [block_q, T_pad] @
onehot [T_pad, block_kv]`` with ``onehot[u, j] = (s_j - offset == u)``, built
from iotas. Only the (usually one or two) tiles of loop 2 pay for it.

A query row that sees no key at all (possible only with a custom pattern
whose row is empty and ``offset == 0``) returns zeros, as the reference does.

Block-shape rules and how this kernel keeps them
------------------------------------------------
* GPU / Triton: every array a kernel creates must have power-of-two dims, and
  ``dot`` needs each of M, N, K >= 16. Hence ``block_q`` and ``block_kv`` are
  powers of two >= 16, the row count ``G*T`` is padded up to a multiple of
  ``block_q``, the pattern's key dim ``T`` is padded to ``T_pad`` =
  next power of two >= 16, and ``D`` is padded to a power of two >= 16.
  KV tiles are read from the ``[S_pad, D]`` slab with ``pl.ds`` inside the
  loop, so tiles the loop never reaches are never loaded from HBM. ``offsets``
  is passed with a squeezed ``(None,)`` block: one scalar per program.
* TPU / Mosaic: the last two dims of every block must be multiples of
  (8, 128) or equal the full array dims. Blocks are ``[block_q, D_pad]``
  (q, out), ``[S_pad, D_pad]`` (k, v: the full dims) and ``[block_q, T_pad]``
  (pattern: full last dim); ``block_q >= 16`` is a multiple of 8, and the
  dynamic ``pl.ds(j * block_kv, block_kv)`` slices start at multiples of
  ``block_kv`` (hinted with ``pl.multiple_of``); pick ``block_kv`` a multiple
  of 128 for lane-dense score tiles (the default is 128 once ``S >= 128``).
  Scalars (offsets) must live in SMEM: on TPU the wrapper passes the whole
  ``offsets`` array with ``memory_space=SMEM`` and indexes it by
  ``program_id(0)``. Caveat: here the whole ``[S_pad, D]`` K/V slab of a
  (row, head) is DMA'd into VMEM and only the *compute* of skipped tiles is
  avoided; a TPU-tuned variant would put the KV tile index in the grid and
  clamp it in the ``index_map`` with scalar-prefetched offsets so skipped
  tiles also skip their DMA (the paged-attention pattern).

Layout cost: the wrapper moves the cache to head-major ``[B, H_kv, S_pad, D]``
(one fused XLA copy, also doing any padding of ``S`` to a multiple of
``block_kv``). A caller that stores the cache head-major avoids it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

from blockdec.kernels import masks as masks_lib

__all__ = [
    "BlockSizes",
    "block_attention",
    "block_attention_reference",
    "skipped_kv_tile_fraction",
]

_MIN_TILE = 16  # Triton's minimum dot dimension; also a multiple of TPU's 8.


def _next_pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def _is_pow2(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes. ``None`` picks a default from the shapes.

  Attributes:
    block_q: query rows per program (rows are ``G * T`` per KV head, padded
      to a multiple of ``block_q``). Default: ``min(64, next_pow2(G * T))``,
      at least 16.
    block_kv: keys per KV tile of the online-softmax loop. ``S`` is padded
      internally to a multiple of it. Default: ``min(128, next_pow2(S))``, at
      least 16.
  """

  block_q: int | None = None
  block_kv: int | None = None

  def resolve(self, num_rows: int, seq_len: int) -> tuple[int, int]:
    """Returns concrete ``(block_q, block_kv)`` for these shapes, validated."""
    block_q = self.block_q
    if block_q is None:
      block_q = max(_MIN_TILE, min(64, _next_pow2(num_rows)))
    block_kv = self.block_kv
    if block_kv is None:
      block_kv = max(_MIN_TILE, min(128, _next_pow2(seq_len)))
    for name, val in (("block_q", block_q), ("block_kv", block_kv)):
      if not (isinstance(val, int) and _is_pow2(val) and val >= _MIN_TILE):
        raise ValueError(f"{name}={val!r} must be a power of two >= "
                         f"{_MIN_TILE} (Triton dot and TPU sublane tiling).")
    return block_q, block_kv


def skipped_kv_tile_fraction(offsets, block_len: int, seq_len: int, *,
                             block_kv: int | None = None) -> float:
  """Fraction of KV tiles ``block_attention`` skips for these offsets.

  Counts over all (row, KV tile) pairs of the padded cache; the fraction is the
  same for every head and query tile. Example: ``S=512, block_kv=128,
  T=4, offsets=[10, 300]``: row 0 visits 1 of 4 tiles, row 1 visits 3 of 4,
  so 4 of 8 are skipped -> 0.5.
  """
  offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
  _, block_kv = BlockSizes(block_kv=block_kv).resolve(1, seq_len)
  num_tiles = -(-seq_len // block_kv)
  # Same trip count as the kernel's second loop: n_end = cdiv(offset + T, bkv).
  visited = np.clip(-(-(offsets + block_len) // block_kv), 0, num_tiles)
  return float(1.0 - visited.sum() / (num_tiles * offsets.size))


def _block_attention_kernel(
    offsets_ref,   # scalar [] (GPU) or [B] in SMEM (TPU)
    pattern_ref,   # [block_q, T_pad] float32: pattern row of each query row
                   # (of this batch row for a per-row RuntimeMask)
    q_ref,         # [block_q, D_pad]
    k_ref,         # [S_pad, D_pad]
    v_ref,         # [S_pad, D_pad]
    o_ref,         # [block_q, D_pad]
    *,
    sm_scale: float,
    block_kv: int,
    block_len: int,
    seq_len: int,
    offsets_is_vector: bool,
):
  block_q, _ = q_ref.shape
  s_pad, _ = k_ref.shape
  t_pad = pattern_ref.shape[1]
  if offsets_is_vector:
    offset = offsets_ref[pl.program_id(0)]
  else:
    offset = offsets_ref[()]
  offset = offset.astype(jnp.int32)

  q = q_ref[...]
  pattern = pattern_ref[...]
  mask_value = -0.7 * float(jnp.finfo(jnp.float32).max)

  def tile_step(j, carry, masked: bool):
    acc, m_prev, l_prev = carry
    start = pl.multiple_of(j * block_kv, block_kv)
    k = k_ref[pl.ds(start, block_kv), :]                          # [bkv, D]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)       # [bq, bkv]
    s = s * sm_scale
    if masked:
      key_pos = start + lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 1)
      # onehot[u, j] = (key j is block key u); pattern @ onehot = pattern[t, u]
      rel = (start - offset) + lax.broadcasted_iota(
          jnp.int32, (t_pad, block_kv), 1)
      onehot = (rel == lax.broadcasted_iota(jnp.int32, (t_pad, block_kv), 0))
      in_pattern = lax.dot_general(
          pattern, onehot.astype(jnp.float32), (((1,), (0,)), ((), ())),
          preferred_element_type=jnp.float32) > 0.5               # [bq, bkv]
      visible = ((key_pos < offset) | in_pattern) & (key_pos < seq_len)
      s = jnp.where(visible, s, mask_value)
    # m, l are kept 2-D ([bq, 1]): Mosaic prefers 2-D vector layouts.
    m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))    # [bq, 1]
    correction = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next)
    if masked:
      p = jnp.where(visible, p, 0.0)  # fully masked rows keep l == 0
    l_next = correction * l_prev + p.sum(axis=-1, keepdims=True)
    v = v_ref[pl.ds(start, block_kv), :]
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return correction * acc + pv, m_next, l_next

  num_tiles = s_pad // block_kv
  n_full = jnp.minimum(offset, seq_len) // block_kv
  n_end = jnp.minimum((offset + block_len + block_kv - 1) // block_kv,
                      num_tiles)
  n_full = jnp.minimum(n_full, n_end)

  carry = (jnp.zeros(o_ref.shape, jnp.float32),
           jnp.full((block_q, 1), mask_value, jnp.float32),
           jnp.zeros((block_q, 1), jnp.float32))
  carry = lax.fori_loop(0, n_full,
                        functools.partial(tile_step, masked=False), carry)
  carry = lax.fori_loop(n_full, n_end,
                        functools.partial(tile_step, masked=True), carry)
  acc, _, l = carry
  l_safe = jnp.where(l == 0.0, 1.0, l)
  o_ref[...] = (acc / l_safe).astype(o_ref.dtype)


def _check_inputs(q, k, v, offsets, mask):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"Expected q [B, T, H, D] and k, v [B, S, H_kv, D]; got "
                     f"{q.shape=}, {k.shape=}, {v.shape=}.")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; {k.shape=} "
                     f"{v.shape=}.")
  batch, block_len, num_heads, head_dim = q.shape
  kb, _, num_kv_heads, kd = k.shape
  if kb != batch or kd != head_dim:
    raise ValueError(f"Batch and head dim of q and k must match; {q.shape=} "
                     f"{k.shape=}.")
  if num_heads % num_kv_heads:
    raise ValueError(f"{num_heads=} must be a multiple of {num_kv_heads=} "
                     "(grouped-query attention).")
  if offsets.shape != (batch,):
    raise ValueError(f"offsets must have shape ({batch},) = [B]; got "
                     f"{offsets.shape=}.")
  if not jnp.issubdtype(offsets.dtype, jnp.integer):
    raise ValueError(f"offsets must be integer; got {offsets.dtype=}.")
  if not isinstance(mask, (masks_lib.BlockMask, masks_lib.RuntimeMask)):
    raise TypeError(f"mask must be a BlockMask (e.g. CausalBlockMask(T)) or a "
                    f"RuntimeMask; got {type(mask).__name__}.")
  if isinstance(mask, masks_lib.RuntimeMask):
    mask.check_batch(batch)
  if mask.block_len != block_len:
    raise ValueError(f"{mask.block_len=} must equal the query block length "
                     f"T={block_len} (q.shape[1]).")


def _checked_inputs(q, k, v, offsets, mask, sm_scale):
  """Checks the inputs; (the softmax scale, 1 / sqrt(D) by default, and the
  query heads per KV head)."""
  _check_inputs(q, k, v, offsets, mask)
  head_dim = q.shape[-1]
  scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
  return scale, q.shape[2] // k.shape[2]


def _split_mask(mask):
  """(static mask or None, runtime mask or None): jit arguments of each kind."""
  if isinstance(mask, masks_lib.RuntimeMask):
    return None, mask
  return mask, None


def _pattern_array(mask) -> np.ndarray | jax.Array:
  """``[1, T, T]`` NumPy (static mask) or ``[1|B, T, T]`` jnp (runtime) bool."""
  pattern = mask.pattern()
  if isinstance(mask, masks_lib.RuntimeMask):
    return pattern if pattern.ndim == 3 else pattern[None]
  return np.asarray(pattern, bool)[None]


def block_attention(q, k, v, offsets, mask, *, block_sizes=None,
                    interpret=False, sm_scale=None):
  """Attention of a block of T queries over a KV cache (Pallas kernel).

  Args:
    q: ``[B, T, H, D]`` queries of the block.
    k: ``[B, S, H_kv, D]`` key cache, the block's own keys already written at
      ``offsets[b] .. offsets[b] + T - 1``.
    v: ``[B, S, H_kv, D]`` value cache, same layout.
    offsets: ``[B]`` int32, committed length of each row (position of the
      block's first query). Requires ``0 <= offsets[b]`` and
      ``offsets[b] + T <= S``; block keys past ``S`` are treated as absent.
    mask: a static ``BlockMask`` with ``block_len == T``, e.g.
      ``CausalBlockMask(T)``, ``TreeMask(parents)``,
      ``BlockBidirectionalMask(T)`` (a static argument of the jitted
      kernel); or a ``RuntimeMask``: a ``RuntimeTreeMask`` with parents
      ``[T]`` or ``[B, T]``, or a ``RuntimePatternMask`` ``[T, T]`` or
      ``[B, T, T]`` (a traced argument: one compilation serves every tree or
      pattern of that shape).
    block_sizes: static ``BlockSizes``; ``None`` picks defaults.
    interpret: run the kernel in the Pallas interpreter (CPU tests).
    sm_scale: softmax scale; default ``1 / sqrt(D)``.

  Returns:
    ``[B, T, H, D]`` in the dtype of ``q``.
  """
  static_mask, runtime_mask = _split_mask(mask)
  return _block_attention(q, k, v, offsets, runtime_mask, mask=static_mask,
                          block_sizes=block_sizes, interpret=interpret,
                          sm_scale=sm_scale)


@functools.partial(jax.jit,
                   static_argnames=("mask", "block_sizes", "interpret",
                                    "sm_scale"))
def _block_attention(q, k, v, offsets, runtime_mask, *, mask, block_sizes,
                     interpret, sm_scale):
  """``block_attention``; exactly one of ``mask``, ``runtime_mask`` is set."""
  mask = runtime_mask if mask is None else mask
  sm_scale, group = _checked_inputs(q, k, v, offsets, mask, sm_scale)
  batch, block_len, num_heads, head_dim = q.shape
  _, seq_len, num_kv_heads, _ = k.shape
  if block_sizes is None:
    block_sizes = BlockSizes()
  num_rows = group * block_len
  block_q, block_kv = block_sizes.resolve(num_rows, seq_len)

  rows_pad = -(-num_rows // block_q) * block_q
  s_pad = -(-seq_len // block_kv) * block_kv
  d_pad = max(_MIN_TILE, _next_pow2(head_dim))
  t_pad = max(_MIN_TILE, _next_pow2(block_len))

  # q [B, T, H_kv*G, D] -> [B, H_kv, G*T, D]: row r = g * T + t.
  qh = q.reshape(batch, block_len, num_kv_heads, group, head_dim)
  qh = qh.transpose(0, 2, 3, 1, 4).reshape(batch, num_kv_heads, num_rows,
                                           head_dim)
  qh = jnp.pad(qh, ((0, 0), (0, 0), (0, rows_pad - num_rows),
                    (0, d_pad - head_dim)))
  kv_pad = ((0, 0), (0, 0), (0, s_pad - seq_len), (0, d_pad - head_dim))
  kh = jnp.pad(k.transpose(0, 2, 1, 3), kv_pad)    # [B, H_kv, S_pad, D_pad]
  vh = jnp.pad(v.transpose(0, 2, 1, 3), kv_pad)

  # Row r = g * T + t of the rows holds pattern[t]: [1|B, R_pad, T_pad]
  # float32, a NumPy constant for a static mask, traced for a runtime one.
  pattern = _pattern_array(mask)                    # [1|B, T, T]
  xp = np if isinstance(pattern, np.ndarray) else jnp
  pattern_rows = xp.pad(
      xp.tile(pattern, (1, group, 1)).astype(np.float32),
      ((0, 0), (0, rows_pad - num_rows), (0, t_pad - block_len)))
  per_row = pattern_rows.shape[0] > 1

  platform = jax.default_backend()
  on_tpu = platform == "tpu" and not interpret
  compiler_params = None
  if platform == "gpu" and not interpret:
    # Pick the Triton lowering explicitly (jax may default to Mosaic GPU).
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    compiler_params = pltriton.CompilerParams(num_warps=4, num_stages=2)
  if on_tpu:
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    offsets_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
  else:
    offsets_spec = pl.BlockSpec((None,), lambda b, h, i: (b,))

  kernel = functools.partial(
      _block_attention_kernel, sm_scale=float(sm_scale), block_kv=block_kv,
      block_len=block_len, seq_len=seq_len, offsets_is_vector=on_tpu)
  grid = (batch, num_kv_heads, rows_pad // block_q)
  out = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[
          offsets_spec,
          pl.BlockSpec((None, block_q, t_pad),
                       lambda b, h, i: (b if per_row else 0, i, 0)),
          pl.BlockSpec((None, None, block_q, d_pad),
                       lambda b, h, i: (b, h, i, 0)),
          pl.BlockSpec((None, None, s_pad, d_pad),
                       lambda b, h, i: (b, h, 0, 0)),
          pl.BlockSpec((None, None, s_pad, d_pad),
                       lambda b, h, i: (b, h, 0, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, block_q, d_pad),
                             lambda b, h, i: (b, h, i, 0)),
      out_shape=jax.ShapeDtypeStruct((batch, num_kv_heads, rows_pad, d_pad),
                                     q.dtype),
      compiler_params=compiler_params,
      interpret=interpret,
      name="block_attention",
  )(offsets.astype(jnp.int32), jnp.asarray(pattern_rows), qh, kh, vh)

  out = out[:, :, :num_rows, :head_dim]
  out = out.reshape(batch, num_kv_heads, group, block_len, head_dim)
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, block_len, num_heads,
                                               head_dim)


def block_attention_reference(q, k, v, offsets, mask, *, block_sizes=None,
                              interpret=False, sm_scale=None):
  """Pure-jnp ``block_attention``: materializes the ``[B, T, S]`` mask.

  Same signature and semantics as ``block_attention``; ``block_sizes`` and
  ``interpret`` are accepted and ignored. Computes in float32.
  """
  del block_sizes, interpret
  static_mask, runtime_mask = _split_mask(mask)
  return _block_attention_reference(q, k, v, offsets, runtime_mask,
                                    mask=static_mask, sm_scale=sm_scale)


@functools.partial(jax.jit, static_argnames=("mask", "sm_scale"))
def _block_attention_reference(q, k, v, offsets, runtime_mask, *, mask,
                               sm_scale):
  mask = runtime_mask if mask is None else mask
  sm_scale, group = _checked_inputs(q, k, v, offsets, mask, sm_scale)
  batch, block_len = q.shape[:2]
  seq_len = k.shape[1]

  pattern = jnp.broadcast_to(jnp.asarray(_pattern_array(mask)),
                             (batch, block_len, block_len))    # [B, T, T]
  key_pos = jnp.arange(seq_len)[None, None, :]                  # [1, 1, S]
  off = offsets.astype(jnp.int32)[:, None, None]                # [B, 1, 1]
  rel = key_pos - off
  in_block = (rel >= 0) & (rel < block_len)
  in_pattern = pattern[jnp.arange(batch)[:, None, None],
                       jnp.arange(block_len)[None, :, None],
                       jnp.clip(rel, 0, block_len - 1)]         # [B, T, S]
  visible = (key_pos < off) | (in_block & in_pattern)           # [B, T, S]

  kf = jnp.repeat(k.astype(jnp.float32), group, axis=2)        # [B, S, H, D]
  vf = jnp.repeat(v.astype(jnp.float32), group, axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kf,
                      precision=lax.Precision.HIGHEST) * sm_scale
  logits = jnp.where(visible[:, None], logits, -jnp.inf)
  any_visible = visible.any(axis=-1)[:, None, :, None]          # [B, 1, T, 1]
  probs = jax.nn.softmax(jnp.where(any_visible, logits, 0.0), axis=-1)
  probs = jnp.where(any_visible, probs, 0.0)
  out = jnp.einsum("bhts,bshd->bthd", probs, vf,
                   precision=lax.Precision.HIGHEST)
  return out.astype(q.dtype)
