"""Verifiers: how many drafted tokens survive a call, and which token follows.

One call of the draft-and-verify loop (`core.py`) feeds the token already
decided (the *root*, committed in this call whatever happens) followed by
D drafted tokens, as C chains that share the root (C = 1 for a plain chain,
C > 1 when several drafts are verified as a token tree). The target model's
head-1 logits at every fed node of chain c are `logits[:, c, i]`: the
distribution of the token after node i. A verifier turns them into a
`Verdict`: per row, the chain it keeps, how many of its D drafts it accepts
(0..D) and the next token (a correction where a draft failed, a bonus token
after a fully accepted chain). The loop commits root + accepted drafts and
feeds the next token first in the following call.

Verifiers are frozen dataclasses (static jit arguments). `lossless` ones
keep the target's output: exactly greedy's with `sampling=None`, exactly
distributed as ancestral sampling from the target otherwise.

  Exact() (acceptance.py)      greedy: a draft survives iff it is the
                               argmax; with sampling it is
  SpeculativeSampling()        accept draft x with probability min(1, p(x) /
                               q(x)); at the first rejection draw from the
                               normalised max(0, p - q); after a full chain
                               draw a bonus token from p (Leviathan et al.
                               2023; Chen et al. 2023).
  TopK, Distance, MinBlock     Stern et al.'s approximate rules (greedy
  (acceptance.py)              only; lossy).
  Typical(threshold, alpha)    Medusa's typical acceptance (lossy).

Worked example of one sampled verification, vocabulary {a, b, c}, D = 2
drafts [b, c] drawn by the heads from q1 = [.2, .6, .2] and q2 = [.1, .1, .8]:

  target p after the root      [.3, .5, .2]  p(b)/q1(b) = .83; u1 = .41 < .83
                                             -> b accepted
  target p after root, b       [.6, .3, .1]  p(c)/q2(c) = .125; u2 = .52
                                             -> c rejected
  residual max(0, p - q2)      [.5, .2, 0] / .7 -> next token drawn from it

The call commits root and b; the next call starts from the drawn token.
"""

from __future__ import annotations

import abc
import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from blockdec import validation
from blockdec.decoding import sampling as sampling_lib
from blockdec.decoding.sampling import Sampling


@flax.struct.dataclass
class Verdict:
  """What a verifier decided, per row.

  Attributes:
    accepted: [B] int32 drafts accepted, in [0, D].
    next_token: [B] int32 the token after the accepted ones.
    chain: [B] int32 the chain the accepted drafts belong to (0 for one).
  """

  accepted: jax.Array
  next_token: jax.Array
  chain: jax.Array


@flax.struct.dataclass
class VerifyKeys:
  """The keys of the tokens a call decides (sampling only).

  Attributes:
    accept: [B, D] key of draft j's accept/reject draw (generated token
      index lengths + 1 + j).
    next: [B, D + 1] key of the next token's draw when a drafts were
      accepted (index lengths + 1 + a).
  """

  accept: jax.Array
  next: jax.Array


def accepted_drafts(matches: jax.Array) -> jax.Array:
  """bool [..., D] -> int32 [...] the number of leading True entries."""
  return jnp.sum(jnp.cumprod(matches.astype(jnp.int32), axis=-1), axis=-1)


def _pick(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, N, ...], index [B] -> x[b, index[b]] [B, ...]."""
  index = index.reshape((-1, 1) + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)[:, 0]


class Verifier(abc.ABC):
  """Base class: `verify` decides a call (see the module docstring)."""

  lossless: bool = False  # True only where the output is the target's.
  exact: bool = False     # Lossless under greedy decoding (kept name).

  def validate(self, block_size: int, sampling: Sampling | None) -> None:
    """Raises ValueError if the verifier cannot run with these settings."""

  @abc.abstractmethod
  def verify(self, drafts: jax.Array, logits: jax.Array, q: jax.Array | None,
             sampling: Sampling | None, keys: VerifyKeys | None) -> Verdict:
    """Decides one call.

    Args:
      drafts: [B, C, D] int32 drafted tokens of each chain (root excluded).
      logits: [B, C, D + 1, V] the target's head-1 logits at the root and
        each chain's drafted nodes.
      q: [B, C, D, V] float32 the drafter's (filtered) distribution of each
        draft, or None where the drafts are deterministic.
      sampling: the sampling settings, or None for greedy decoding.
      keys: the call's keys when sampling, else None.

    Returns:
      `Verdict`.
    """


def greedy_verdict(matches: jax.Array, logits: jax.Array) -> Verdict:
  """Longest run of matches over the chains, next token = argmax.

  matches [B, C, D] bool, logits [B, C, D + 1, V]; ties between chains go
  to the lower index.
  """
  per_chain = accepted_drafts(matches)  # [B, C]
  chain = jnp.argmax(per_chain, axis=-1).astype(jnp.int32)
  accepted = _pick(per_chain, chain).astype(jnp.int32)
  next_logits = _pick(_pick(logits, chain), accepted)  # [B, V]
  return Verdict(accepted=accepted,
                 next_token=jnp.argmax(next_logits, axis=-1).astype(jnp.int32),
                 chain=chain)


@dataclasses.dataclass(frozen=True)
class SpeculativeSampling(Verifier):
  """Lossless speculative sampling (the module docstring's steps).

  Deterministic drafts (`q=None`) count as drawn from a one-hot q: a draft
  x is then accepted with probability p(x), and a rejection draws from p
  with x removed. One chain only.
  """

  lossless = True

  def validate(self, block_size, sampling):
    if sampling is None:
      raise ValueError("SpeculativeSampling needs sampling=blockdec.Sampling"
                       "(...); with sampling=None use Exact().")

  def residual(self, p: jax.Array, q: jax.Array) -> jax.Array:
    """The distribution a rejection draws from: normalised max(0, p - q).

    p, q [B, V]; where p - q has no positive mass (only reachable through
    rounding) it falls back to p.
    """
    r = jnp.maximum(p - q, 0.0)
    mass = jnp.sum(r, axis=-1, keepdims=True)
    return jnp.where(mass > 0, r / jnp.where(mass > 0, mass, 1.0), p)

  def acceptance_ratio(self, p_draft: jax.Array,
                       q_draft: jax.Array) -> jax.Array:
    """p(x) / q(x) of each draft x; it is accepted iff a uniform is below."""
    return p_draft / jnp.maximum(q_draft, jnp.finfo(jnp.float32).tiny)

  def verify(self, drafts, logits, q, sampling, keys):
    if drafts.shape[1] != 1:
      raise ValueError(f"speculative sampling verifies one chain; got "
                       f"{drafts.shape[1]} (multi-draft trees are greedy-only).")
    draft = drafts[:, 0]  # [B, D]
    d = draft.shape[-1]
    p = sampling.probs(logits[:, 0])  # [B, D + 1, V]
    one_hot = jax.nn.one_hot(draft, p.shape[-1], dtype=p.dtype)  # [B, D, V]
    q = one_hot if q is None else q[:, 0].astype(jnp.float32)
    p_draft = jnp.sum(p[:, :d] * one_hot, axis=-1)  # [B, D]
    q_draft = jnp.sum(q * one_hot, axis=-1)
    if d:
      u = sampling_lib.uniform(keys.accept)  # [B, D]
      accepted = accepted_drafts(
          u < self.acceptance_ratio(p_draft, q_draft)).astype(jnp.int32)
    else:  # Nothing drafted: plain ancestral sampling.
      accepted = jnp.zeros(draft.shape[:1], jnp.int32)
    # Row b draws its next token from the residual at its first rejection,
    # or from p after the last draft; pad q with zeros so index D is p.
    q_pad = jnp.concatenate([q, jnp.zeros_like(p[:, :1])], axis=1)
    dist = self.residual(_pick(p, accepted), _pick(q_pad, accepted))  # [B, V]
    next_key = _pick(keys.next, accepted)
    next_token = sampling_lib.sample(next_key, jnp.log(dist))
    return Verdict(accepted=accepted, next_token=next_token,
                   chain=jnp.zeros_like(accepted))


@dataclasses.dataclass(frozen=True)
class Typical(Verifier):
  """Medusa's typical acceptance (Cai et al. 2024; lossy).

  A draft x survives iff the target gives it probability
  p(x) > min(posterior_threshold, posterior_alpha * exp(-H(p))), H the
  entropy of p: confident targets demand the likely token, uncertain ones
  accept anything plausible. p is the filtered distribution of `sampling`
  (temperature 1, unfiltered, under greedy decoding). The next token is
  p's argmax under greedy decoding and a draw from p with sampling. The
  longest surviving chain wins.
  """

  posterior_threshold: float = 0.09
  posterior_alpha: float = 0.3

  def __post_init__(self):
    for name in ("posterior_threshold", "posterior_alpha"):
      object.__setattr__(self, name, validation.check_number(
          f"Typical {name}", getattr(self, name), low=0, high=1))

  def verify(self, drafts, logits, q, sampling, keys):
    del q
    log_p = (jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
             if sampling is None else sampling.log_probs(logits))
    p = jnp.exp(log_p)  # [B, C, D + 1, V]
    entropy = -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1)
    bar = jnp.minimum(self.posterior_threshold,
                      self.posterior_alpha * jnp.exp(-entropy))  # [B, C, D+1]
    p_draft = jnp.take_along_axis(p[:, :, :-1], drafts[..., None],
                                  axis=-1)[..., 0]  # [B, C, D]
    verdict = greedy_verdict(p_draft > bar[:, :, :-1], logits)
    if sampling is None:
      return verdict
    next_log_p = _pick(_pick(log_p, verdict.chain), verdict.accepted)
    next_token = sampling_lib.sample(_pick(keys.next, verdict.accepted),
                                     next_log_p)
    return verdict.replace(next_token=next_token)
