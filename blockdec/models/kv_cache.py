"""Key/value cache with a per-row end index.

Slot `s` of a row always holds the keys and values of the token at position
`s`. A model call writes its block of `T` tokens at the row's offset (its first
position) and sets `end_index = offset + T`; everything at or past the offset
is treated as stale, so rolling back after a rejected draft is only a matter of
writing the next block at the committed length (`set_end_index`). Nothing is
ever cleared: stale slots are overwritten before any query can see them,
because a query at position `p` attends to slots `<= p` only.

Example: a row holds 10 committed tokens (end_index=10); a k=4 block is
written at slots 10..13 (end_index=14); the verifier accepts 2 tokens, so the
next block is written at offset 12 and slots 12..13 are overwritten.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
  """Stacked per-layer keys and values.

  Attributes:
    k: [L, B, S, H_kv, D] keys; slot s holds position s.
    v: [L, B, S, H_kv, D] values.
    end_index: [B] int32, number of valid slots per row.
  """

  k: jax.Array
  v: jax.Array
  end_index: jax.Array

  @classmethod
  def make(cls, *, num_layers: int, batch: int, length: int,
           num_kv_heads: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
    shape = (num_layers, batch, length, num_kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               end_index=jnp.zeros((batch,), jnp.int32))

  @property
  def length(self) -> int:
    """S, the number of slots per row."""
    return self.k.shape[2]

  @property
  def batch(self) -> int:
    return self.k.shape[1]

  def set_end_index(self, end_index: jax.Array) -> "KVCache":
    """Rolls back (or forward) each row to `end_index` valid slots."""
    return self.replace(end_index=jnp.asarray(end_index, jnp.int32))

  def write(self, layer: int, k: jax.Array, v: jax.Array,
            positions: jax.Array) -> "KVCache":
    """Writes one layer's block k, v [B, T, H_kv, D] at slots `positions` [B, T].

    A scatter into the stacked buffers, which XLA performs in place inside
    the decoding loop (no copy of the whole cache per call).
    """
    rows = jnp.arange(k.shape[0])[:, None]  # [B, 1]
    return self.replace(
        k=self.k.at[layer, rows, positions].set(k.astype(self.k.dtype),
                                                unique_indices=True),
        v=self.v.at[layer, rows, positions].set(v.astype(self.v.dtype),
                                                unique_indices=True))

  def slot_positions(self) -> jax.Array:
    """[S] the position held by each slot."""
    return jnp.arange(self.length, dtype=jnp.int32)

  def move_slots(self, src_slots: jax.Array, offsets: jax.Array,
                 end_index: jax.Array) -> "KVCache":
    """Copies slots src_slots[b, i] to offsets[b] + i in every layer.

    After a token-tree call (slot != position) this moves the accepted path
    [B, A] back to consecutive slots, restoring "slot s holds position s";
    every source is read before any slot is written. Then sets `end_index`.
    """
    rows = jnp.arange(src_slots.shape[0])[:, None]  # [B, 1]
    dst = offsets[:, None] + jnp.arange(src_slots.shape[1])  # [B, A]
    k = self.k.at[:, rows, dst].set(self.k[:, rows, src_slots],
                                    unique_indices=True)
    v = self.v.at[:, rows, dst].set(self.v[:, rows, src_slots],
                                    unique_indices=True)
    return self.replace(k=k, v=v, end_index=jnp.asarray(end_index, jnp.int32))
