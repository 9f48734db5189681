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

  def slot_positions(self) -> jax.Array:
    """[S] the position held by each slot."""
    return jnp.arange(self.length, dtype=jnp.int32)


def write_block(cache_layer: jax.Array, new: jax.Array,
                offsets: jax.Array) -> jax.Array:
  """Writes `new` [B, T, H, D] into `cache_layer` [B, S, H, D] at `offsets` [B]."""

  def one_row(row, block, offset):
    return jax.lax.dynamic_update_slice(row, block.astype(row.dtype),
                                        (offset, 0, 0))

  return jax.vmap(one_row)(cache_layer, new, offsets)
