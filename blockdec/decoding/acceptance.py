"""Acceptance rules for block verification (Stern et al. 2018, sec. 3 and 5).

A rule decides, for each drafted token, whether it is acceptable given head
1's logits at the node before it, the model's own prediction for that slot.
Rules are verifiers (`verify.Verifier`): the longest prefix of acceptable
drafts is accepted and the next token is head 1's argmax after it.

Only `Exact()` is lossless: it reproduces greedy decoding, and with
`sampling` it verifies by speculative sampling, so the output is distributed
exactly as the target's samples. The others trade quality for longer blocks
(greedy decoding only), and every result produced with them must say so.

Rules are frozen dataclasses: hashable, so they ride along as static
arguments of jitted functions.
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp

from blockdec import validation
from blockdec.decoding.verify import (SpeculativeSampling, Verifier,
                                      greedy_verdict)


class AcceptanceRule(Verifier):
  """Base class: `matches` says which drafted tokens are acceptable."""

  exact: bool = False  # True only for rules that reproduce greedy output.

  @abc.abstractmethod
  def matches(self, draft: jax.Array, logits: jax.Array) -> jax.Array:
    """draft [..., T] int32, logits [..., T, V] -> bool [..., T]."""

  def validate(self, block_size: int, sampling=None) -> None:
    """Raises ValueError if the rule cannot be used with these settings."""
    if sampling is not None and not self.exact:
      raise ValueError(
          f"acceptance={self!r} is a lossy greedy rule and cannot be used with "
          f"sampling={sampling!r}; with sampling use Exact() (lossless "
          "speculative sampling) or Typical(...).")

  def verify(self, drafts, logits, q, sampling, keys):
    return greedy_verdict(self.matches(drafts, logits[..., :-1, :]), logits)


@dataclasses.dataclass(frozen=True)
class Exact(AcceptanceRule):
  """Lossless: greedy, a token survives iff it is head 1's argmax (output
  equals greedy decoding); with sampling, `SpeculativeSampling` (output
  distributed as the target's samples)."""

  exact = True
  lossless = True

  def matches(self, draft, logits):
    return draft == jnp.argmax(logits, axis=-1)

  def verify(self, drafts, logits, q, sampling, keys):
    if sampling is not None:
      return SpeculativeSampling().verify(drafts, logits, q, sampling, keys)
    return super().verify(drafts, logits, q, sampling, keys)


@dataclasses.dataclass(frozen=True)
class TopK(AcceptanceRule):
  """Accept a token iff it is among head 1's `n` most likely tokens (lossy)."""

  n: int = 2

  def __post_init__(self):
    object.__setattr__(self, "n", validation.check_int("TopK n", self.n,
                                                       low=1))

  def matches(self, draft, logits):
    draft_logit = jnp.take_along_axis(logits, draft[..., None], axis=-1)
    # Rank = number of tokens strictly more likely than the draft.
    rank = jnp.sum(logits > draft_logit, axis=-1)
    return rank < self.n


@dataclasses.dataclass(frozen=True)
class Distance(AcceptanceRule):
  """Accept iff |draft - argmax| <= eps, for ordinal vocabularies (lossy).

  Stern et al. use this for image super-resolution, where token ids are
  intensities; for text it is rarely meaningful.
  """

  eps: int = 1

  def __post_init__(self):
    object.__setattr__(self, "eps", validation.check_int("Distance eps",
                                                         self.eps, low=0))

  def matches(self, draft, logits):
    return jnp.abs(draft - jnp.argmax(logits, axis=-1)) <= self.eps


@dataclasses.dataclass(frozen=True)
class MinBlock(AcceptanceRule):
  """Always accept at least `l` tokens, then apply `base` (lossy for l > 1).

  Stern et al. found l = 2..3 costs much quality; it is here to measure that.
  """

  l: int = 2
  base: AcceptanceRule = Exact()

  @property
  def exact(self):  # l = 1 forces nothing beyond the always-correct P[0].
    return self.l == 1 and self.base.exact

  def __post_init__(self):
    object.__setattr__(self, "l", validation.check_int("MinBlock l", self.l,
                                                       low=1))
    if not isinstance(self.base, AcceptanceRule):
      raise TypeError(f"MinBlock base={self.base!r} must be an acceptance rule "
                      "(Exact(), TopK(n), Distance(eps)).")

  def validate(self, block_size, sampling=None):
    if self.l > block_size:
      raise ValueError(f"MinBlock l={self.l} exceeds block_size={block_size}.")
    if sampling is not None:
      raise ValueError(f"acceptance={self!r} is greedy-only; with sampling use "
                       "Exact() or Typical(...).")
    self.base.validate(block_size, sampling)

  def matches(self, draft, logits):
    forced = jnp.arange(draft.shape[-1]) < self.l - 1
    return self.base.matches(draft, logits) | forced


@dataclasses.dataclass(frozen=True)
class AcceptAll(AcceptanceRule):
  """Accept every drafted token up to the first `stop_id` (lossy).

  The draft is the output: block diffusion without verification
  (`blockdec.BlockDiffusion(acceptance=None)`, its default), where the call after a block
  only writes the block's keys and values and decides the token after it.
  A drafter that ends its block early fills the rest with `stop_id` (the
  model's [MASK] token); those drafts are never accepted.
  """

  stop_id: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "stop_id", validation.check_int(
        "AcceptAll stop_id", self.stop_id, low=0, optional=True))

  def matches(self, draft, logits):
    if self.stop_id is None:
      return jnp.ones(draft.shape, bool)
    return draft != self.stop_id


def accepted_prefix_length(matches: jax.Array) -> jax.Array:
  """bool [B, T-1] (match of drafts 1..T-1) -> int32 [B] accepted count in [1, T].

  Example: matches [True, True, False, True] -> 3 (P[0], P[1], P[2]).
  """
  return 1 + jnp.sum(jnp.cumprod(matches.astype(jnp.int32), axis=-1), axis=-1)
