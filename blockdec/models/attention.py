"""Attention: the one dispatch point for every backend.

`xla` is the reference (plain einsums, differentiable, used for training);
`pallas` calls the block-masked flash kernel in `blockdec.kernels` for
prefill and decoding. Both see the same mask: a query at position `p` attends
to the keys at positions `<= p` (slot `s` of the cache holds position `s`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array) -> jax.Array:
  """Grouped-query attention with an explicit boolean mask.

  Args:
    q: [B, T, H, D] queries.
    k: [B, S, H_kv, D] keys, H a multiple of H_kv.
    v: [B, S, H_kv, D] values.
    mask: [B, T, S] True where query t may attend to key s.

  Returns:
    [B, T, H, D] in q's dtype; softmax in float32.
  """
  b, t, h, d = q.shape
  h_kv = k.shape[2]
  q = q.reshape(b, t, h_kv, h // h_kv, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def self_attention(q, k, v, positions):
  """Causal attention of a sequence to itself (training, scoring).

  q [B, T, H, D], k/v [B, T, H_kv, D], positions [B, T].
  """
  mask = positions[:, None, :] <= positions[:, :, None]  # [B, T, T]
  return dot_product_attention(q, k, v, mask)


def cached_attention(q, k_cache, v_cache, positions, *, backend: str = "xla"):
  """Attention of a block written into the cache to the row's valid prefix.

  Args:
    q: [B, T, H, D] queries of the block at `positions`.
    k_cache: [B, S, H_kv, D], with the block's own keys already written at
      slots `positions`.
    v_cache: [B, S, H_kv, D].
    positions: [B, T] int32, consecutive per row.
    backend: "xla" or "pallas".
  """
  if backend == "pallas":
    from blockdec import kernels  # Imported lazily: the kernel is optional.
    mask = kernels.CausalBlockMask(block_len=q.shape[1])
    return kernels.block_attention(
        q, k_cache, v_cache, positions[:, 0].astype(jnp.int32), mask,
        interpret=jax.default_backend() == "cpu")
  if backend != "xla":
    raise ValueError(f"attention backend={backend!r}; allowed: 'xla', 'pallas'.")
  slots = jnp.arange(k_cache.shape[1], dtype=jnp.int32)
  mask = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]
  return dot_product_attention(q, k_cache, v_cache, mask)
