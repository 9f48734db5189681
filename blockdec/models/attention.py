"""Attention: the one dispatch point for every backend.

`xla` is the reference (plain einsums, differentiable, used for training);
`pallas` calls the block-masked flash kernel in `blockdec.kernels` for
prefill and decoding. Both see the same mask: a query at position `p` attends
to the keys at positions `<= p` (slot `s` of the cache holds position `s`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
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


def cached_attention(q, k_cache, v_cache, positions, *, backend: str = "xla",
                     parents: tuple[int, ...] | None = None):
  """Attention of a block written into the cache to the row's valid prefix.

  Args:
    q: [B, T, H, D] queries of the block at `positions`.
    k_cache: [B, H_kv, S, D], with the block's own keys already written at
      slots `positions` (tree: slots `positions[:, 0] + 0 .. T-1`).
    v_cache: [B, H_kv, S, D].
    positions: [B, T] int32, consecutive per row (tree: offset + depth).
    backend: "xla" or "pallas".
    parents: None for the causal block, or a static token tree (node i's
      parent block index, -1 for a root at depth 0, `kernels.TreeMask`
      convention): node i then sees the committed slots `< positions[:, 0]`
      and the block slots of its ancestors and itself.
  """
  if parents is not None and len(parents) != q.shape[1]:
    raise ValueError(f"parents has {len(parents)} nodes but the block has "
                     f"T={q.shape[1]} tokens.")
  if backend == "pallas":
    from blockdec import kernels  # Imported lazily: the kernel is optional.
    mask = (kernels.CausalBlockMask(q.shape[1]) if parents is None
            else kernels.TreeMask(parents))
    run = functools.partial(
        kernels.block_attention, mask=mask,
        interpret=jax.default_backend() == "cpu")
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
      run = _on_mesh(run, mesh, batch=q.shape[0], num_kv_heads=k_cache.shape[1])
    # The kernel takes [B, S, H_kv, D] and goes head-major inside; XLA folds
    # the two transposes.
    return run(q, k_cache.swapaxes(1, 2), v_cache.swapaxes(1, 2),
               positions[:, 0].astype(jnp.int32))
  if backend != "xla":
    raise ValueError(f"attention backend={backend!r}; allowed: 'xla', 'pallas'.")
  slots = jnp.arange(k_cache.shape[2], dtype=jnp.int32)
  if parents is None:
    mask = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]
  else:
    mask = tree_mask(parents, positions[:, 0], k_cache.shape[2])
  return dot_product_attention(q, k_cache, v_cache, mask)


def tree_mask(parents: tuple[int, ...], offsets: jax.Array,
              length: int) -> jax.Array:
  """[B, T, S] mask of a token tree written at slots offsets[b] + 0..T-1.

  Key slot s is visible to node t iff s < offsets[b] (committed) or s is
  the slot of t or one of its ancestors (`blockdec.kernels.masks` rule).
  """
  from blockdec.kernels import masks  # NumPy only; lazily like the kernel.
  pattern = jnp.asarray(masks.TreeMask(parents).pattern())  # [T, T]
  t = pattern.shape[0]
  rel = jnp.arange(length, dtype=jnp.int32)[None, :] - offsets[:, None]  # [B, S]
  in_block = (rel >= 0) & (rel < t)
  seen = pattern[:, jnp.clip(rel, 0, t - 1)]  # [T, B, S]
  return (rel < 0)[:, None, :] | (in_block[:, None, :]
                                  & jnp.transpose(seen, (1, 0, 2)))


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
