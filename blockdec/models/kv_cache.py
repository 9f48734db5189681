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

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Memory:
  """An encoded source as every decoder layer's cross-attention sees it.

  Computed once per source (`Transformer.encode`) and then only read: the
  decoder's queries change every call, the source's keys and values never.

  Attributes:
    k: L arrays [B, H_kv, S, D], one per decoder layer (head-major, as
      `attention.dot_product_attention` takes them).
    v: L arrays [B, H_kv, S, D].
    valid: [B, S] bool, True at the source's tokens (False at padding).
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array


@flax.struct.dataclass
class KVCache:
  """Per-layer keys and values.

  Attributes:
    k: L arrays [B, H_kv, D, S] of keys; slot s holds position s. One array
      per layer (not one stacked [L, ...] array): a layer's attention then
      reads its buffer directly, where slicing a stacked buffer made XLA copy
      the layer's whole cache on every call. Head-major, so the attention dots
      run over (B, H_kv) leading and XLA never transposes the cache (on CPU
      the [B, S, H_kv, D] layout made batch-8 attention ~10x slower), and
      key-major (slots last), so the score dot is a plain [rows, D] x [D, S]
      product (1.5x faster at batch 8 than contracting D of [S, D] keys).
    v: L arrays [B, H_kv, S, D] of values.
    end_index: [B] int32, number of valid slots per row.
    memory: an encoder-decoder's encoded source (`Memory`, batch-leading
      like every other leaf, so row compaction carries it along), or None.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  end_index: jax.Array
  memory: Any = None

  def with_memory(self, memory: Memory) -> "KVCache":
    """This cache holding `memory`, the source its rows are decoded from."""
    return self.replace(memory=memory)

  @classmethod
  def make(cls, *, num_layers: int, batch: int, length: int,
           num_kv_heads: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
    zeros = lambda *shape: tuple(jnp.zeros(shape, dtype)
                                 for _ in range(num_layers))
    return cls(k=zeros(batch, num_kv_heads, head_dim, length),
               v=zeros(batch, num_kv_heads, length, head_dim),
               end_index=jnp.zeros((batch,), jnp.int32))

  @property
  def length(self) -> int:
    """S, the number of slots per row."""
    return self.v[0].shape[2]

  @property
  def batch(self) -> int:
    return self.k[0].shape[0]

  @property
  def num_layers(self) -> int:
    return len(self.k)

  def set_end_index(self, end_index: jax.Array) -> "KVCache":
    """Rolls back (or forward) each row to `end_index` valid slots."""
    return self.replace(end_index=jnp.asarray(end_index, jnp.int32))

  def write(self, layer: int, k: jax.Array, v: jax.Array,
            positions: jax.Array) -> "KVCache":
    """Writes one layer's block k, v [B, T, H_kv, D] at slots `positions` [B, T].

    A scatter into the layer's buffers, which XLA performs in place inside
    the decoding loop (no copy of the cache per call). Indexing [rows, :, :,
    slots] of the key-major keys selects [B, T, H_kv, D] too (NumPy puts the
    broadcast index dims first when slices separate them).
    """
    rows = jnp.arange(k.shape[0])[:, None]  # [B, 1]

    def put(buffers, new, index):
      buf = buffers[layer]
      buf = buf.at[index].set(new.astype(buf.dtype), unique_indices=True)
      return buffers[:layer] + (buf,) + buffers[layer + 1:]

    return self.replace(
        k=put(self.k, k, (rows, slice(None), slice(None), positions)),
        v=put(self.v, v, (rows, slice(None), positions)))

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
    move_v = lambda buf: buf.at[rows, :, dst].set(buf[rows, :, src_slots],
                                                  unique_indices=True)
    move_k = lambda buf: buf.at[rows, :, :, dst].set(
        buf[rows, :, :, src_slots], unique_indices=True)
    return self.replace(k=tuple(map(move_k, self.k)),
                        v=tuple(map(move_v, self.v)),
                        end_index=jnp.asarray(end_index, jnp.int32))
