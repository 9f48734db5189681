"""Attention: the one dispatch point for every backend.

`xla` is the reference (plain einsums, differentiable, used for training;
with a cache it attends to the committed prefix and to the block's own keys
in one softmax, then writes the block); `pallas` writes the block and calls
the block-masked flash kernel in `blockdec.kernels` for prefill and decoding.
Both see the same mask. By default (a causal block) a query at position `p`
attends to the keys at positions `<= p` (slot `s` of the cache holds position
`s`); a block mask (`blockdec.kernels.masks`: a token tree, block diffusion,
or a tree whose parents are runtime data) changes only which of the block's
own keys each query sees, never the committed prefix, which every query sees.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array) -> jax.Array:
  """Grouped-query attention with an explicit boolean mask.

  Args:
    q: [B, T, H, D] queries.
    k: [B, H_kv, S, D] keys (head-major, like the cache), H a multiple of H_kv.
    v: [B, H_kv, S, D] values.
    mask: [B, T, S] True where query t may attend to key s.

  Returns:
    [B, T, H, D] in q's dtype; softmax in float32.
  """
  b, t, h, d = q.shape
  h_kv = k.shape[1]
  g = h // h_kv
  # Both dots as plain batched matmuls over (B, H_kv) with the query group
  # folded into the rows: [G*T, D] x [S, D]^T, then [G*T, S] x [S, D]. XLA:CPU
  # hands these to its fast matmul library; written with T or the group as
  # separate output axes it fell back to a slow loop of tiny dots (the
  # probabilities-times-values dot alone was a third of a batch-8 step).
  q = q.reshape(b, t, h_kv, g, d).transpose(0, 2, 3, 1, 4)
  q = q.reshape(b, h_kv, g * t, d)
  scores = jnp.einsum("bkqd,bksd->bkqs", q, k,
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  scores = scores.reshape(b, h_kv, g, t, -1)
  scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkqs,bksd->bkqd", probs.reshape(b, h_kv, g * t, -1), v)
  return out.reshape(b, h_kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(
      b, t, h, d)


@jax.tree_util.register_pytree_node_class
class PaddingMask:
  """Bidirectional attention over each row's valid keys (an encoder's mask).

  Every query of row b sees every key s with ``valid[b, s]``, before or
  after it: the pattern of an encoder over right-padded sources. A pytree
  whose one leaf is ``valid`` [B, S] bool, so it is traced data, never a
  static argument. Used without a KV cache only.
  """

  __hash__ = None

  def __init__(self, valid):
    self.valid = jnp.asarray(valid, bool)

  def tree_flatten(self):
    return (self.valid,), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    mask = object.__new__(cls)
    mask.valid = children[0]
    return mask

  def __repr__(self):
    return f"PaddingMask(valid={self.valid.shape})"


def cross_attention(q, k, v, valid):
  """Queries q [B, T, H, D] attend to a source's keys/values k, v [B, H_kv,
  S, D] at its valid tokens, valid [B, S] (no order: every query sees the
  whole source)."""
  mask = jnp.broadcast_to(valid[:, None, :],
                          (q.shape[0], q.shape[1], valid.shape[1]))
  return dot_product_attention(q, k, v, mask)


def self_attention(q, k, v, positions, query_positions=None):
  """Causal attention of a sequence to itself (training, scoring).

  q [B, T, H, D], k/v [B, T, H_kv, D], positions [B, T]. With
  `query_positions` [B, M], q [B, M, H, D] holds only the queries at those
  positions (the rows of the full result there, without the other rows'
  work): query m sees key s where positions[b, s] <= query_positions[b, m].
  """
  if query_positions is None:
    query_positions = positions
  mask = positions[:, None, :] <= query_positions[:, :, None]  # [B, M, T]
  return dot_product_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask)


def attends_itself_only(backend: str, mask, empty: bool) -> bool:
  """Whether `cached_attention` treats the block as a sequence attending to
  itself, reading no cache slot (the xla backend's causal prefill of an
  empty cache); only then may its queries be a subset of the block's rows
  (`query_positions`)."""
  from blockdec.kernels import masks  # pylint: disable=g-import-not-at-top
  causal = mask is None or isinstance(mask, masks.CausalBlockMask)
  return backend == "xla" and empty and causal


def cached_attention(q, k, v, cache, layer: int, positions, *,
                     backend: str = "xla", mask=None, empty: bool = False,
                     query_positions=None):
  """Writes a block's keys/values into the cache and attends to the row's prefix.

  Query i of row b sees the committed slots `< positions[b, 0]` and block key
  j where `pattern[i, j]` (the mask's pattern; per row for a per-row runtime
  tree). Example: `mask=TreeMask((-1, 0, 0))` with `positions[b] = [7, 8, 8]`
  (offset + depth) writes slots 7, 8, 9; node 2 sees slots 0..6, 7 and 9.

  Args:
    q: [B, T, H, D] queries of the block at `positions`.
    k: [B, T, H_kv, D] the block's keys; v likewise.
    cache: the `KVCache`; the block goes into layer `layer` at slots
      `positions` when `mask.slots_are_positions` (causal, block
      bidirectional), else (a tree) at slots `positions[:, 0] + 0 .. T-1`.
    layer: which layer's buffers.
    positions: [B, T] int32, consecutive per row (tree: offset + depth).
    backend: "xla" or "pallas".
    mask: None (the causal block) or the block's mask, with `block_len == T`:
      a static, hashable `kernels.BlockMask` (`CausalBlockMask`, `TreeMask`,
      `BlockBidirectionalMask`, `PatternMask`, `&`/`|` combinations), or a
      `kernels.RuntimeMask`: a `RuntimeTreeMask`, a token tree whose parents
      ([T] or [B, T] int32) are traced (its pattern, the ancestor closure,
      is computed in jnp), or a `RuntimePatternMask`, a traced [T, T] or
      [B, T, T] pattern (slots are positions); read in the trace on the xla
      backend and passed to the kernel on the pallas backend.
    empty: True when no slot before `positions[:, 0]` holds a committed
      token (prefill of a fresh cache): the block then attends only to
      itself and the cache is only written (xla backend, causal block; same
      result).
    query_positions: [B, M] positions of q's rows when q holds only some of
      the block's queries ([B, M, H, D]); allowed where
      `attends_itself_only(backend, mask, empty)`. None: all T.

  Returns:
    (out [B, T, H, D], the cache with the block written).
  """
  from blockdec.kernels import masks  # Lazily, like the kernel below.
  b, t = k.shape[:2]
  if backend not in ("xla", "pallas"):
    raise ValueError(f"attention backend={backend!r}; allowed: 'xla', 'pallas'.")
  _check_mask(mask, b, t)
  slots = positions if mask is None or mask.slots_are_positions else (
      positions[:, :1] + jnp.arange(t, dtype=positions.dtype))
  offsets = positions[:, 0].astype(jnp.int32)
  if attends_itself_only(backend, mask, empty):
    # Prefill: reading the cache would only add masked-out slots (P + N + k
    # of them per query); skipping them made the demo model's prefill 12%
    # faster at batch 1 and 6% at batch 8 on 2 CPU cores.
    return (self_attention(q, k, v, positions, query_positions),
            cache.write(layer, k, v, slots))
  if query_positions is not None:
    raise ValueError("query_positions (a subset of the block's queries) is "
                     "for a block attending only to itself: the xla "
                     "backend's causal prefill of an empty cache.")
  if backend == "xla":
    # Attend first, then write in place. The block's own keys come from k, v,
    # so the attention reads the buffers as they were before this call, and
    # the write is made to depend on the attention's output so that XLA sees
    # every read ordered before it. Without that order XLA copies a buffer
    # before writing it; attending to the written buffers instead made
    # XLA:CPU duplicate the one-token write into the attention's reshape and
    # copy each cache buffer three times per greedy step at batch 1 (40% of
    # the step, demo model).
    pattern = np.tri(t, dtype=bool) if mask is None else mask.pattern()
    out = prefix_block_attention(q, cache.k[layer], cache.v[layer], k, v,
                                 offsets, pattern)
    k, v = _after(out, k), _after(out, v)
    return out, cache.write(layer, k, v, slots)
  cache = cache.write(layer, k, v, slots)
  from blockdec import kernels  # Imported lazily: the kernel is optional.
  mask = masks.CausalBlockMask(t) if mask is None else mask
  kernel = functools.partial(kernels.block_attention,
                             interpret=jax.default_backend() == "cpu")
  # A runtime mask is an argument (traced, split with the rows under a
  # mesh); a static one is bound here.
  runtime = isinstance(mask, masks.RuntimeMask)
  extra = (mask,) if runtime else ()
  run = kernel if runtime else functools.partial(kernel, mask=mask)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    run = _on_mesh(run, mesh, batch=b, num_kv_heads=cache.k[0].shape[1],
                   mask_leaf=(mask.leaf.ndim, mask.batched) if runtime
                   else None)
  # The kernel takes [B, S, H_kv, D] and goes head-major inside (padding
  # its copy); XLA folds the transposes into that copy.
  out = run(q, cache.k[layer].transpose(0, 3, 1, 2),
            cache.v[layer].swapaxes(1, 2), offsets, *extra)
  return out, cache


def _check_mask(mask, batch: int, t: int) -> None:
  """Raises unless `mask` is None or a block mask for T = t (and B = batch)."""
  from blockdec.kernels import masks  # pylint: disable=g-import-not-at-top
  if mask is None:
    return
  if not isinstance(mask, (masks.BlockMask, masks.RuntimeMask)):
    raise TypeError(
        f"mask must be None (causal block), a kernels.BlockMask (e.g. "
        f"TreeMask(parents)) or a kernels.RuntimeMask; got "
        f"{type(mask).__name__}. A tuple of parents is TreeMask(parents).")
  if mask.block_len != t:
    raise ValueError(f"mask.block_len={mask.block_len} must equal the block "
                     f"length T={t} (tokens per call); mask={mask!r}.")
  if isinstance(mask, masks.RuntimeMask):
    mask.check_batch(batch)


def _after(first: jax.Array, x: jax.Array) -> jax.Array:
  """x, with a data dependency on `first` (x + 0 * one element of first).

  XLA keeps the dependency (it does not fold float `y * 0`, which is NaN for
  infinite y) and so schedules everything `first` needs before x's users;
  `lax.optimization_barrier` does not order anything on XLA:CPU.
  """
  return x + first.reshape(-1)[0].astype(x.dtype) * 0


def prefix_block_attention(q: jax.Array, k_prefix: jax.Array,
                           v_prefix: jax.Array, k: jax.Array, v: jax.Array,
                           offsets: jax.Array,
                           pattern: np.ndarray | jax.Array) -> jax.Array:
  """Attention of a block to a cached prefix and to itself, in one softmax.

  Args:
    q: [B, T, H, D] the block's queries.
    k_prefix: [B, H_kv, D, S] cached keys (key-major, like the cache); row
      b's slots `< offsets[b]` are its committed prefix, the rest is ignored.
    v_prefix: [B, H_kv, S, D] cached values.
    k: [B, T, H_kv, D] the block's own keys; v likewise.
    offsets: [B] int32, committed slots per row.
    pattern: [T, T] bool, query i sees block key j (causal: lower triangle;
      token tree: ancestors and itself), NumPy (static) or a jax array; or
      [B, T, T], one pattern per row (a per-row runtime tree). Each row must
      see at least itself, so no query is left with nothing to attend to.

  Returns:
    [B, T, H, D] in q's dtype; scores and softmax in float32. Equal to
    `dot_product_attention` over the prefix and the block placed at slots
    offsets[b] + 0..T-1 (the cache layout), up to float rounding.
  """
  b, t, h, d = q.shape
  h_kv = k_prefix.shape[1]
  g = h // h_kv
  # Rows of both dots are (group, query) pairs of one KV head, as in
  # `dot_product_attention`.
  q = q.reshape(b, t, h_kv, g, d).transpose(0, 2, 3, 1, 4)
  q = q.reshape(b, h_kv, g * t, d)
  k = k.transpose(0, 2, 1, 3)  # [B, H_kv, T, D]
  v = v.transpose(0, 2, 1, 3)
  scale = d ** -0.5
  s_prefix = jnp.einsum("bkqd,bkds->bkqs", q, k_prefix,
                        preferred_element_type=jnp.float32) * scale
  s_block = jnp.einsum("bkqd,bktd->bkqt", q, k,
                       preferred_element_type=jnp.float32) * scale
  committed = jnp.arange(k_prefix.shape[3], dtype=jnp.int32) < offsets[:, None]
  s_prefix = jnp.where(committed[:, None, None, :], s_prefix, _MASK_VALUE)
  pattern = jnp.asarray(pattern, bool)
  if pattern.ndim == 2:
    pattern = pattern[None]
  seen = jnp.tile(pattern, (1, g, 1))[:, None]  # [1|B, 1, G*T, T]
  s_block = jnp.where(seen, s_block, _MASK_VALUE)
  top = jnp.maximum(s_prefix.max(-1), s_block.max(-1))[..., None]
  p_prefix = jnp.exp(s_prefix - top)
  p_block = jnp.exp(s_block - top)
  total = p_prefix.sum(-1, keepdims=True) + p_block.sum(-1, keepdims=True)
  out = (jnp.einsum("bkqs,bksd->bkqd", p_prefix.astype(v_prefix.dtype),
                    v_prefix, preferred_element_type=jnp.float32)
         + jnp.einsum("bkqt,bktd->bkqd", p_block.astype(v.dtype), v,
                      preferred_element_type=jnp.float32)) / total
  return out.astype(q.dtype).reshape(b, h_kv, g, t, d).transpose(
      0, 3, 1, 2, 4).reshape(b, t, h, d)


def _on_mesh(kernel, mesh, *, batch: int, num_kv_heads: int,
             mask_leaf: tuple[int, bool] | None = None):
  """`kernel(q, k, v, offsets[, mask])` run per shard with `jax.shard_map`.

  A Pallas call is opaque to XLA's SPMD partitioner, so under a mesh (set by
  `jax.set_mesh`, as the sharded decode does) each device runs the kernel on
  its own rows (batch over "data") and its own KV heads with their query
  heads (over "model"). Query head h reads KV head h // G, so splitting both
  into equal contiguous slices keeps every group on one device. An axis the
  mesh lacks, or that does not divide the dim, is not used (replicated).
  `mask_leaf` (a `RuntimeMask` passed as a fifth argument): (ndim of its
  leaf, whether it is per row); a per-row leaf ([B, T] parents, [B, T, T]
  pattern) is split with the rows, a shared one replicated; None, no mask
  argument. `check_vma=False`: pallas_call has no varying-manual-axes rule.
  """

  def axis(name, size):
    n = dict(mesh.shape).get(name, 1)
    return name if n > 1 and size % n == 0 else None

  rows, heads = axis("data", batch), axis("model", num_kv_heads)
  qkv = P(rows, None, heads, None)  # [B, T|S, H|H_kv, D]
  in_specs = (qkv, qkv, qkv, P(rows))
  if mask_leaf is not None:
    ndim, batched = mask_leaf
    in_specs += (P(rows, *(None,) * (ndim - 1)) if batched
                 else P(*(None,) * ndim),)
  return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs,
                       out_specs=qkv, check_vma=False)

