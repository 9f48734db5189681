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
                               2023; Chen et al. 2023); token trees by
                               multi-candidate rejection, deterministic
                               drafts by matching the target's own draws
                               (see the class).
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
  """Lossless speculative sampling, for one chain or a token tree.

  Three cases, each output distributed as ancestral sampling from p:

  * Drafts with q, one chain: the module docstring's steps.
  * Drafts with q, C > 1 chains (a tree sharing the root; SpecInfer's
    multi-candidate rejection, Miao et al. 2024): the chains' first tokens
    are tried in order against a residual r, starting at r = p: candidate c
    is accepted with probability min(1, r(x_c) / q_c(x_c)), and a rejection
    sets r to the normalised max(0, r - q_c). If every candidate fails the
    next token is drawn from the last r; otherwise the accepted chain goes
    on as a single chain. Contract: given everything before the call,
    chain c's first token is drawn from q[:, c, 0] independently of the
    other chains (i.i.d. draws from one q qualify; so do fixed tokens with
    one-hot q), and its later tokens from q[:, c, j] given its earlier ones.
  * Deterministic drafts (`q=None`), any number of chains: the target's
    token at every depth of every chain is drawn with the key of the
    generated index it would have (`keys.next`) and the drafts are matched
    against those draws as `Exact()` matches argmaxes: the longest matching
    chain wins and the draw after it is the next token. Chains that share
    a prefix share the draws along it, so this is ancestral sampling with
    the tree as a cache: with the same key the output equals
    `Autoregressive()` sampling token for token (up to float rounding of
    the logits between a block call and a one-token call).
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
    if q is None:
      return self._match_draws(drafts, logits, sampling, keys)
    p = sampling.probs(logits)  # [B, C, D + 1, V]
    q = q.astype(jnp.float32)
    one_hot = jax.nn.one_hot(drafts, p.shape[-1], dtype=p.dtype)  # [B,C,D,V]
    ratio = self.acceptance_ratio(jnp.sum(p[:, :, :-1] * one_hot, axis=-1),
                                  jnp.sum(q * one_hot, axis=-1))  # [B, C, D]
    if drafts.shape[1] == 1:
      return self._chain(p[:, 0], q[:, 0], ratio[:, 0], keys)
    return self._tree(drafts, p, q, ratio, keys)

  def _chain(self, p, q, ratio, keys) -> Verdict:
    """One chain: p [B, D + 1, V], q [B, D, V], ratio [B, D]."""
    d = q.shape[1]
    if d:
      u = sampling_lib.uniform(keys.accept)  # [B, D]
      accepted = accepted_drafts(u < ratio).astype(jnp.int32)
    else:  # Nothing drafted: plain ancestral sampling.
      accepted = jnp.zeros(p.shape[:1], jnp.int32)
    # Row b draws its next token from the residual at its first rejection,
    # or from p after the last draft; pad q with zeros so index D is p.
    q_pad = jnp.concatenate([q, jnp.zeros_like(p[:, :1])], axis=1)
    dist = self.residual(_pick(p, accepted), _pick(q_pad, accepted))  # [B, V]
    next_token = sampling_lib.sample(_pick(keys.next, accepted), jnp.log(dist))
    return Verdict(accepted=accepted, next_token=next_token,
                   chain=jnp.zeros_like(accepted))

  def _tree(self, drafts, p, q, ratio, keys) -> Verdict:
    """C > 1 chains with q: multi-candidate rejection at the first depth,
    then the accepted chain as one chain (see the class docstring)."""
    batch, chains, d = drafts.shape
    # Candidate c's uniform: the first draft's accept key with c folded in.
    u_first = sampling_lib.uniform(jax.vmap(lambda k: jax.vmap(
        lambda c: jax.random.fold_in(k, c))(jnp.arange(chains)))(
            keys.accept[:, 0]))  # [B, C]
    r = p[:, 0, 0]  # [B, V], the root's distribution (shared node)
    chosen = jnp.full((batch,), -1, jnp.int32)
    for c in range(chains):
      r_x = jnp.take_along_axis(r, drafts[:, c, :1], axis=-1)[:, 0]
      q_x = jnp.take_along_axis(q[:, c, 0], drafts[:, c, :1], axis=-1)[:, 0]
      take = (chosen < 0) & (u_first[:, c] < self.acceptance_ratio(r_x, q_x))
      chosen = jnp.where(take, c, chosen)
      r = jnp.where((chosen < 0)[:, None], self.residual(r, q[:, c, 0]), r)
    hit = chosen >= 0
    chain = jnp.maximum(chosen, 0)
    p_c, q_c = _pick(p, chain), _pick(q, chain)  # [B, D + 1, V], [B, D, V]
    deeper = jnp.zeros((batch,), jnp.int32)
    if d > 1:
      u = sampling_lib.uniform(keys.accept[:, 1:])  # [B, D - 1]
      deeper = accepted_drafts(u < _pick(ratio, chain)[:, 1:]).astype(jnp.int32)
    accepted = jnp.where(hit, 1 + deeper, 0).astype(jnp.int32)
    q_pad = jnp.concatenate([q_c, jnp.zeros_like(p_c[:, :1])], axis=1)
    dist = jnp.where(hit[:, None], self.residual(_pick(p_c, accepted),
                                                 _pick(q_pad, accepted)), r)
    next_token = sampling_lib.sample(_pick(keys.next, accepted), jnp.log(dist))
    return Verdict(accepted=accepted, next_token=next_token, chain=chain)

  def _match_draws(self, drafts, logits, sampling, keys) -> Verdict:
    """Deterministic drafts: match them against the target's own draws."""
    log_p = sampling.log_probs(logits)  # [B, C, D + 1, V]
    chains = drafts.shape[1]
    draw_keys = jnp.broadcast_to(keys.next[:, None],
                                 (keys.next.shape[0], chains) +
                                 keys.next.shape[1:])
    draws = sampling_lib.sample(draw_keys, log_p)  # [B, C, D + 1]
    per_chain = accepted_drafts(drafts == draws[:, :, :-1])  # [B, C]
    chain = jnp.argmax(per_chain, axis=-1).astype(jnp.int32)
    accepted = _pick(per_chain, chain).astype(jnp.int32)
    return Verdict(accepted=accepted,
                   next_token=_pick(_pick(draws, chain), accepted),
                   chain=chain)


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
