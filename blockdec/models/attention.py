"""Attention: the one dispatch point for every backend.

`xla` is the reference (plain einsums, differentiable, used for training;
with a cache it attends to the committed prefix and to the block's own keys
in one softmax, then writes the block); `pallas` writes the block and calls
the block-masked flash kernel in `blockdec.kernels` for prefill and decoding.
Both see the same mask: a query at position `p` attends to the keys at
positions `<= p` (slot `s` of the cache holds position `s`).
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


def self_attention(q, k, v, positions):
  """Causal attention of a sequence to itself (training, scoring).

  q [B, T, H, D], k/v [B, T, H_kv, D], positions [B, T].
  """
  mask = positions[:, None, :] <= positions[:, :, None]  # [B, T, T]
  return dot_product_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask)


def cached_attention(q, k, v, cache, layer: int, positions, *,
                     backend: str = "xla",
                     parents: tuple[int, ...] | None = None,
                     empty: bool = False):
  """Writes a block's keys/values into the cache and attends to the row's prefix.

  Args:
    q: [B, T, H, D] queries of the block at `positions`.
    k: [B, T, H_kv, D] the block's keys; v likewise.
    cache: the `KVCache`; the block goes into layer `layer` at slots
      `positions` (tree: slots `positions[:, 0] + 0 .. T-1`).
    layer: which layer's buffers.
    positions: [B, T] int32, consecutive per row (tree: offset + depth).
    backend: "xla" or "pallas".
    parents: None for the causal block, or a static token tree (node i's
      parent block index, -1 for a root at depth 0, `kernels.TreeMask`
      convention): node i then sees the committed slots `< positions[:, 0]`
      and the block slots of its ancestors and itself.
    empty: True when no slot before `positions[:, 0]` holds a committed
      token (prefill of a fresh cache): the block then attends only to
      itself and the cache is only written (xla backend; same result).

  Returns:
    (out [B, T, H, D], the cache with the block written).
  """
  t = q.shape[1]
  if parents is not None and len(parents) != t:
    raise ValueError(f"parents has {len(parents)} nodes but the block has "
                     f"T={t} tokens.")
  if backend not in ("xla", "pallas"):
    raise ValueError(f"attention backend={backend!r}; allowed: 'xla', 'pallas'.")
  slots = positions if parents is None else (
      positions[:, :1] + jnp.arange(t, dtype=positions.dtype))
  offsets = positions[:, 0].astype(jnp.int32)
  if backend == "xla" and empty and parents is None:
    # Prefill: reading the cache would only add masked-out slots (P + N + k
    # of them per query); skipping them made the demo model's prefill 12%
    # faster at batch 1 and 6% at batch 8 on 2 CPU cores.
    return self_attention(q, k, v, positions), cache.write(layer, k, v, slots)
  if backend == "xla":
    # Attend first, then write in place. The block's own keys come from k, v,
    # so the attention reads the buffers as they were before this call, and
    # the write is made to depend on the attention's output so that XLA sees
    # every read ordered before it. Without that order XLA copies a buffer
    # before writing it; attending to the written buffers instead made
    # XLA:CPU duplicate the one-token write into the attention's reshape and
    # copy each cache buffer three times per greedy step at batch 1 (40% of
    # the step, demo model).
    out = prefix_block_attention(q, cache.k[layer], cache.v[layer], k, v,
                                 offsets, _block_pattern(t, parents))
    k, v = _after(out, k), _after(out, v)
    return out, cache.write(layer, k, v, slots)
  cache = cache.write(layer, k, v, slots)
  from blockdec import kernels  # Imported lazily: the kernel is optional.
  mask = (kernels.CausalBlockMask(t) if parents is None
          else kernels.TreeMask(parents))
  run = functools.partial(
      kernels.block_attention, mask=mask,
      interpret=jax.default_backend() == "cpu")
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    run = _on_mesh(run, mesh, batch=q.shape[0], num_kv_heads=cache.k[0].shape[1])
  # The kernel takes [B, S, H_kv, D] and goes head-major inside (padding
  # its copy); XLA folds the transposes into that copy.
  out = run(q, cache.k[layer].transpose(0, 3, 1, 2),
            cache.v[layer].swapaxes(1, 2), offsets)
  return out, cache


def _after(first: jax.Array, x: jax.Array) -> jax.Array:
  """x, with a data dependency on `first` (x + 0 * one element of first).

  XLA keeps the dependency (it does not fold float `y * 0`, which is NaN for
  infinite y) and so schedules everything `first` needs before x's users;
  `lax.optimization_barrier` does not order anything on XLA:CPU.
  """
  return x + first.reshape(-1)[0].astype(x.dtype) * 0


def _block_pattern(t: int, parents: tuple[int, ...] | None) -> np.ndarray:
  """[T, T] NumPy bool: block query i sees block key j."""
  if parents is None:
    return np.tri(t, dtype=bool)
  from blockdec.kernels import masks  # NumPy only; lazily like the kernel.
  return masks.TreeMask(parents).pattern()


def prefix_block_attention(q: jax.Array, k_prefix: jax.Array,
                           v_prefix: jax.Array, k: jax.Array, v: jax.Array,
                           offsets: jax.Array, pattern: np.ndarray) -> jax.Array:
  """Attention of a block to a cached prefix and to itself, in one softmax.

  Args:
    q: [B, T, H, D] the block's queries.
    k_prefix: [B, H_kv, D, S] cached keys (key-major, like the cache); row
      b's slots `< offsets[b]` are its committed prefix, the rest is ignored.
    v_prefix: [B, H_kv, S, D] cached values.
    k: [B, T, H_kv, D] the block's own keys; v likewise.
    offsets: [B] int32, committed slots per row.
    pattern: static [T, T] bool, query i sees block key j (causal: lower
      triangle; token tree: ancestors and itself). Each row must see at
      least itself, so no query is left with nothing to attend to.

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
  seen = jnp.asarray(np.tile(np.asarray(pattern, bool), (g, 1)))  # [G*T, T]
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


def _on_mesh(kernel, mesh, *, batch: int, num_kv_heads: int):
  """`kernel(q, k, v, offsets)` run per shard with `jax.shard_map`.

  A Pallas call is opaque to XLA's SPMD partitioner, so under a mesh (set by
  `jax.set_mesh`, as the sharded decode does) each device runs the kernel on
  its own rows (batch over "data") and its own KV heads with their query
  heads (over "model"). Query head h reads KV head h // G, so splitting both
  into equal contiguous slices keeps every group on one device. An axis the
  mesh lacks, or that does not divide the dim, is not used (replicated).
  `check_vma=False`: pallas_call has no varying-manual-axes rule.
  """

  def axis(name, size):
    n = dict(mesh.shape).get(name, 1)
    return name if n > 1 and size % n == 0 else None

  rows, heads = axis("data", batch), axis("model", num_kv_heads)
  qkv = P(rows, None, heads, None)  # [B, T|S, H|H_kv, D]
  return jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, P(rows)),
                       out_specs=qkv, check_vma=False)

