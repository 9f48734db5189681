"""Adaptive block sizes: verify only as much of a draft as is likely to pay.

A k-token verification call costs more than a one-token call wherever the
hardware is compute-bound (CPUs, accelerators at large batch): on the demo
model on 2 CPU cores a k = 8 call costs ~3x a greedy call at batch 8. When
the heads are unsure of their drafts, most of those k tokens are rejected
and their compute is wasted. `AdaptiveBlockSize` chooses, before every call,
how many of the k drafted tokens to verify, from how often drafts at each
depth have survived (or from the heads' own confidence).

The verified prefix is still checked by the acceptance rule against head 1,
so with `Exact()` the output stays greedy's; only the calls change.

The rule. Let q[b, j] be the chance that row b's draft P[j] survives
verification given that P[0..j-1] did (q[b, 0] = 1: P[0] is head 1's
argmax, always right). Two estimates (`estimate`):

  "history"     (default) the rate at which depth j survived in this row's
                calls so far, (passed + 1) / (tested + 1): a depth never
                verified counts as certain, so every depth gets tried, and
                a row settles on the length its heads sustain. With
                `forget` < 1 each call first scales the counts by it, so
                old evidence fades: a depth that failed early but is no
                longer verified drifts back towards certain and is tried
                again (prompt lookup's drafts are as good as each call's
                match, so one early failure should not pin its length);
  "confidence"  head j+1's softmax probability of its drafted token, which
                reacts call by call but is only as calibrated as the heads
                (on weak models it underrates how often drafts survive).

Row b's expected accepted tokens when T tokens are verified is

    E_b(T) = 1 + sum_{j=1}^{T-1} q[b, 1] * ... * q[b, j]

and a call of T tokens is modelled as costing `1 + token_cost * (T - 1)`
one-token calls. Each call verifies the candidate size T (from `sizes`) with
the most expected tokens per unit of cost over the rows still decoding:

    T* = argmax_T  sum_b E_b(T) / (1 + token_cost * (T - 1)).

`token_cost` is the hardware's marginal cost of one more token per row in
a call relative to a one-token call: ~0.3 for the demo model on 2 CPU
cores at batch 8, near 0 on an accelerator that is memory-bound at the
batch (where always verifying all k tokens is right: `token_cost=0` gives
plain blockwise decoding). Real costs are seldom linear in T (demo model,
batch 1, one CPU here: 1.19x, 1.31x and 1.73x a one-token call for 2, 4
and 8 tokens, where token_cost = 0.3 says 1.3x, 1.9x and 3.1x;
`experiments/results/step_costs.md`), so `call_costs` can give the cost
of each size instead, as measured on the
machine by `blockdec.measure_call_costs`; the candidate sizes are then the
table's. Every size is one compiled branch of the loop body
(`lax.switch`).

Worked example, k = 4, one row, q = [1, 0.9, 0.5, 0.1], token_cost = 0.3:

    T = 1: E = 1                       / 1.0 = 1.00
    T = 2: E = 1 + 0.9          = 1.90 / 1.3 = 1.46
    T = 4: E = 1.9 + 0.45 + .045 = 2.40 / 1.9 = 1.26   -> verify 2 tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from blockdec import validation

ESTIMATES = ("history", "confidence")


@dataclasses.dataclass(frozen=True)
class AdaptiveBlockSize:
  """How many drafted tokens each call verifies (see the module docstring).

  Attributes:
    token_cost: marginal cost of one more verified token per row, in
      one-token calls (>= 0; 0 always verifies the largest size).
    sizes: the candidate lengths T, each in [1, block_size]; None: the
      sizes of `call_costs` up to the block size, or without it 1, 2, 4,
      ... up to the block size, and the block size itself.
    estimate: how q is estimated: "history" or "confidence" (module doc).
    forget: in (0, 1], how much of the history each call keeps
      ("history"; 1: every call counts alike).
    call_costs: None (the linear model of `token_cost`) or ((T, cost),
      ...) (or a dict T -> cost; stored as the sorted tuple): a call
      verifying T tokens costs `cost` one-token calls (> 0),
      e.g. `blockdec.measure_call_costs(params, cfg, batch=...)`. Every
      candidate size needs an entry; `token_cost` is then unused.
  """

  token_cost: float = 0.3
  sizes: tuple[int, ...] | None = None
  estimate: str = "history"
  call_costs: tuple[tuple[int, float], ...] | None = None
  forget: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "token_cost", validation.check_number(
        "AdaptiveBlockSize token_cost", self.token_cost, low=0))
    object.__setattr__(self, "forget", validation.check_number(
        "AdaptiveBlockSize forget", self.forget, low=0, high=1,
        low_open=True))
    if self.estimate not in ESTIMATES:
      raise ValueError(f"AdaptiveBlockSize estimate={self.estimate!r}; "
                       f"allowed: {ESTIMATES}.")
    if self.sizes is not None:
      if (not isinstance(self.sizes, tuple) or not self.sizes
          or any(not validation.is_int(t) or t < 1 for t in self.sizes)):
        raise ValueError(f"AdaptiveBlockSize sizes={self.sizes!r} must be a "
                         "non-empty tuple of positive ints.")
      object.__setattr__(self, "sizes", tuple(int(t) for t in self.sizes))
    if self.call_costs is not None:
      object.__setattr__(self, "call_costs", _check_costs(self.call_costs))
      missing = sorted(set(self.sizes or ()) - set(self._cost_table))
      if missing:
        raise ValueError(f"AdaptiveBlockSize sizes {missing} have no entry "
                         f"in call_costs={self.call_costs!r}; give every "
                         "candidate size a cost.")

  @property
  def _cost_table(self) -> dict[int, float]:
    return dict(self.call_costs or ())

  def call_cost(self, t: int) -> float:
    """What a call verifying t tokens costs, in one-token calls."""
    if self.call_costs is None:
      return 1.0 + self.token_cost * (t - 1)
    table = self._cost_table
    if t not in table:
      raise ValueError(f"AdaptiveBlockSize call_costs={self.call_costs!r} "
                       f"has no entry for a call of {t} tokens.")
    return table[t]

  def init(self, batch: int, block_size: int):
    """The rule's carry: per-row counts of verified and surviving drafts.

    tested [B, k] float32: entry j counts calls that verified draft j after
    accepting drafts 1..j-1; passed [B, k]: those that accepted draft j.
    """
    zeros = jnp.zeros((batch, block_size), jnp.float32)
    return {"tested": zeros, "passed": zeros}

  def update(self, carry, accepted: jax.Array, t: int, active: jax.Array):
    """The carry after a call verifying t - 1 drafts that accepted
    `accepted` [B] of them (rows not `active` [B] are left alone)."""
    depth = jnp.arange(carry["tested"].shape[1])[None, :]
    verified = accepted[:, None] + 1  # Root included.
    reached = active[:, None] & (depth >= 1) & (depth < t)
    # Active rows keep `forget` of their history before counting this call.
    keep = jnp.where(active[:, None], jnp.float32(self.forget), 1.0)
    return {"tested": carry["tested"] * keep + (reached & (depth <= verified)),
            "passed": carry["passed"] * keep + (reached & (depth < verified))}

  def survival(self, carry, draft) -> jax.Array:
    """q [B, k] of the module docstring from the carry and the next draft
    (`core.Draft`; its `confidence` [B, k - 1] for "confidence")."""
    if self.estimate == "confidence":
      if draft.confidence is None:
        raise ValueError("AdaptiveBlockSize(estimate='confidence') needs a "
                         "drafter that reports its confidence; use "
                         "estimate='history'.")
      conf = draft.confidence.astype(jnp.float32)
      survival = jnp.concatenate([jnp.ones_like(conf[:, :1]), conf], axis=1)
    else:
      # The rate at which each depth survived so far, with one optimistic
      # pseudo-success: a depth never verified looks certain, so it is tried.
      survival = (carry["passed"] + 1.0) / (carry["tested"] + 1.0)
    if getattr(draft, "length", None) is not None:
      # Filler past the drafter's real proposals will not survive.
      depth = jnp.arange(survival.shape[1])[None, :]
      survival = jnp.where(depth <= draft.length[:, None], survival, 0.0)
    return survival

  def candidate_sizes(self, block_size: int) -> tuple[int, ...]:
    """The sorted candidate lengths for `block_size` drafted tokens."""
    if self.sizes is None and self.call_costs is not None:
      return tuple(t for t in sorted(self._cost_table) if t <= block_size)
    if self.sizes is None:
      sizes = {block_size}
      t = 1
      while t < block_size:
        sizes.add(t)
        t *= 2
      return tuple(sorted(sizes))
    return tuple(sorted(set(self.sizes)))

  def validate(self, block_size: int) -> None:
    """Raises ValueError if a size exceeds `block_size`, or if there is
    nothing to choose (block_size 1 drafts no token)."""
    if block_size < 2:
      raise ValueError(f"adaptive={self!r} chooses how many drafts each call "
                       f"verifies, but block_size={block_size} drafts none; "
                       "use block_size >= 2 or adaptive=None.")
    too_big = [t for t in self.candidate_sizes(block_size) if t > block_size]
    if too_big:
      raise ValueError(f"AdaptiveBlockSize sizes {too_big} exceed "
                       f"block_size={block_size}; allowed: 1..{block_size}.")
    if not self.candidate_sizes(block_size):
      raise ValueError(f"AdaptiveBlockSize call_costs={self.call_costs!r} "
                       f"has no size <= block_size={block_size}.")

  def choose(self, survival: jax.Array, active: jax.Array,
             block_size: int) -> jax.Array:
    """Index into `candidate_sizes(block_size)` of the length to verify.

    Args:
      survival: [B, k] float32, q of the module docstring (`survival`;
        column 0 is ignored: P[0] is always accepted).
      active: [B] bool, rows still decoding (the others do not count).
      block_size: k.

    Returns:
      int32 [] index of the chosen size.
    """
    sizes = self.candidate_sizes(block_size)
    survive = jnp.cumprod(survival[:, 1:].astype(jnp.float32), axis=-1)
    # expected[b, t] = E_b(t + 1): tokens row b accepts verifying t + 1.
    expected = 1.0 + jnp.concatenate(
        [jnp.zeros_like(survive[:, :1]), jnp.cumsum(survive, axis=-1)], axis=-1)
    total = jnp.sum(jnp.where(active[:, None], expected, 0.0), axis=0)  # [k]
    picked = jnp.stack([total[t - 1] for t in sizes])
    cost = jnp.asarray([self.call_cost(t) for t in sizes], jnp.float32)
    return jnp.argmax(picked / cost).astype(jnp.int32)


def _check_costs(costs) -> tuple[tuple[int, float], ...]:
  """call_costs as sorted ((T, cost), ...), or a ValueError naming it."""
  allowed = ("((T, cost), ...) with distinct positive int sizes T and "
             "finite costs > 0")
  if isinstance(costs, dict):
    costs = tuple(costs.items())
  try:
    pairs = [(t, c) for t, c in costs]
  except (TypeError, ValueError):
    raise ValueError(f"AdaptiveBlockSize call_costs={costs!r}; allowed: "
                     f"{allowed}.") from None
  if (not pairs or any(not validation.is_int(t) or t < 1
                       or not validation.is_number(c)
                       or not np.isfinite(c) or c <= 0 for t, c in pairs)
      or len({t for t, _ in pairs}) != len(pairs)):
    raise ValueError(f"AdaptiveBlockSize call_costs={costs!r}; allowed: "
                     f"{allowed}.")
  return tuple(sorted((int(t), float(c)) for t, c in pairs))


def proposal_confidence(logits: jax.Array) -> jax.Array:
  """logits [B, k, V] -> [B, k] float32 softmax probability of each argmax."""
  logits = logits.astype(jnp.float32)
  return 1.0 / jnp.sum(jnp.exp(logits - logits.max(-1, keepdims=True)), -1)
