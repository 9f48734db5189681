"""Sampling settings and per-token randomness of the decoding loops.

`Sampling(temperature, top_k, top_p)` filters the logits in HF transformers'
order and with its semantics: divide by the temperature, keep the `top_k`
largest logits (ties with the k-th kept), then keep the smallest set of most
probable tokens whose probability mass reaches `top_p` (the token that
crosses the threshold is kept; at least one token always is). The loops pass
`sampling=None` for greedy decoding.

Randomness never depends on the batch a row sits in: every random draw of a
row is keyed by the run's key, the row's index in the caller's batch and the
index of the generated token it decides (`token_keys`), so compaction,
neighbours and block sizes leave a row's stream of keys alone.

Example: logits [2, 1, 0, 0] with temperature 1 give probabilities
[0.61, 0.22, 0.08, 0.08]; `top_p=0.8` keeps tokens 0 and 1 (0.61 < 0.8 <=
0.83) and renormalises them to [0.73, 0.27, 0, 0].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from blockdec import validation

# What a key is drawn for; folded into a token's key so the uses never share.
DRAFT, ACCEPT, NEXT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How tokens are drawn (hashable: a static argument of the jitted loops).

  Attributes:
    temperature: > 0; logits are divided by it before filtering.
    top_k: keep the k most likely tokens (ties with the k-th kept), or None.
    top_p: in (0, 1]: keep the smallest most-probable set whose mass reaches
      it, or None (1.0 keeps everything).
  """

  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    # Stored as Python numbers: equal settings hash alike (static argument).
    object.__setattr__(self, "temperature", validation.check_number(
        "Sampling temperature", self.temperature, low=0, low_open=True,
        hint=" (use sampling=None for greedy decoding)"))
    object.__setattr__(self, "top_k", validation.check_int(
        "Sampling top_k", self.top_k, low=1, optional=True))
    object.__setattr__(self, "top_p", validation.check_number(
        "Sampling top_p", self.top_p, low=0, high=1, low_open=True,
        optional=True))

  def log_probs(self, logits: jax.Array) -> jax.Array:
    """logits [..., V] -> filtered log-probabilities [..., V] (-inf = removed)."""
    x = logits.astype(jnp.float32) / self.temperature
    vocab = x.shape[-1]
    if self.top_k is not None and self.top_k < vocab:
      kth = jax.lax.top_k(x, self.top_k)[0][..., -1:]
      x = jnp.where(x < kth, -jnp.inf, x)
    if self.top_p is not None and self.top_p < 1:
      # As HF: sort ascending, drop the prefix whose mass is <= 1 - top_p,
      # always keep the most likely token.
      order = jnp.argsort(x, axis=-1, stable=True)
      ascending = jnp.take_along_axis(x, order, axis=-1)
      mass = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
      drop = (mass <= 1 - self.top_p).at[..., -1].set(False)
      drop = jnp.take_along_axis(drop, jnp.argsort(order, axis=-1), axis=-1)
      x = jnp.where(drop, -jnp.inf, x)
    return jax.nn.log_softmax(x, axis=-1)

  def probs(self, logits: jax.Array) -> jax.Array:
    """logits [..., V] -> filtered probabilities [..., V]."""
    return jnp.exp(self.log_probs(logits))


def row_keys(key: jax.Array, row_ids: jax.Array) -> jax.Array:
  """key [] and row_ids [B] int32 -> one key per row [B]."""
  return jax.vmap(jax.random.fold_in, (None, 0))(key, row_ids)


def token_keys(keys: jax.Array, index: jax.Array, purpose: int) -> jax.Array:
  """Per-row keys [B] and generated-token indices [B, ...] -> keys [B, ...].

  The key that decides generated token `index` of a row for `purpose`
  (DRAFT, ACCEPT or NEXT).
  """

  def one(key, idx):
    return jax.vmap(lambda i: jax.random.fold_in(
        jax.random.fold_in(key, i), purpose))(idx.reshape(-1)).reshape(idx.shape)

  return jax.vmap(one)(keys, index.astype(jnp.int32))


def sample(keys: jax.Array, log_probs: jax.Array) -> jax.Array:
  """keys [...] and log_probs [..., V] -> int32 tokens [...]."""
  flat = log_probs.reshape((-1, log_probs.shape[-1]))
  out = jax.vmap(jax.random.categorical)(keys.reshape(-1), flat)
  return out.reshape(log_probs.shape[:-1]).astype(jnp.int32)


def uniform(keys: jax.Array) -> jax.Array:
  """keys [...] -> float32 uniforms in [0, 1) of the same shape."""
  flat = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys.reshape(-1))
  return flat.reshape(keys.shape)


def choose(logits: jax.Array, sampling: Sampling | None, keys=None):
  """The next token from logits [..., V]: argmax, or a filtered sample.

  keys [...] (one per token) are needed when `sampling` is not None.
  """
  if sampling is None:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return sample(keys, sampling.log_probs(logits))


def draft(logits: jax.Array, sampling: Sampling | None, keys, index):
  """One drafted token per row from logits [B, V] -> (tokens [B], q).

  Greedy (`sampling` None): the argmax, q None. Sampling: a draw from the
  filtered distribution q [B, V] (which the speculative-sampling verifier
  needs), keyed by the rows' `keys` and the drafted token's generated
  index [B] (`token_keys(..., DRAFT)`).
  """
  if sampling is None:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
  log_q = sampling.log_probs(logits)
  return (sample(token_keys(keys, index, DRAFT), log_q), jnp.exp(log_q))

