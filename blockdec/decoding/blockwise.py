"""Blockwise parallel decoding (Stern et al. 2018), combined scoring and proposal.

One iteration is one model call per batch (DESIGN.md, "The algorithm"):

  1. feed the proposal block P[0..k-1] at positions L .. L+k-1;
  2. verify: P[i] (i >= 1) is accepted iff all earlier ones were and the
     acceptance rule matches it against head 1 at block position i-1;
  3. accept a in [1, k] tokens (fewer at EOS or at the budget), L += a;
  4. propose: the heads' argmaxes at block position a-1 are the next block.

Rows accept different counts: each row keeps its own length and cache end,
so no row waits for another. Nor does a finished row keep costing: once at
most half of the rows are still active, they are gathered into a batch half
the size and the loop goes on there (`options.compact_rows`; see
`state.while_loop_compacting`), so the last slow rows do not pay for the
whole batch. With `options.adaptive` each call verifies only the first
T <= k drafted tokens, T chosen from how often drafts have survived so far
(or the heads' confidence; `adaptive.AdaptiveBlockSize`).
Worked example with k = 3, one row:

  proposal      [the, cat, sat]      head-1 argmax at block positions
  argmax p1     [cat, ran, ...]      0 -> "cat" (matches P[1]), 1 -> "ran"
  accepted      2 ("the cat");       P[2] = "sat" != "ran" is rejected
  next block    heads at position 1: ["ran", h2, h3]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from blockdec.decoding.acceptance import accepted_prefix_length
from blockdec.decoding.adaptive import proposal_confidence
from blockdec.decoding.state import (DecodeOptions, DecodeOutput, DecodeState,
                                     ScoreFn, SplitScoreFn, finalize,
                                     prefill_logits, take_positions,
                                     while_loop_compacting, write_rows)


def blockwise_decode(score_fn: ScoreFn, params, prompts: jax.Array,
                     prompt_lengths: jax.Array, cache,
                     options: DecodeOptions) -> DecodeOutput:
  """Decodes with blocks of `options.block_size` drafted by the model's heads.

  Args:
    score_fn: see `ScoreFn`; must return at least `block_size` heads.
    params: passed through to `score_fn`.
    prompts: [B, P] int32, right-padded.
    prompt_lengths: [B] int32 in [1, P].
    cache: an empty cache for `score_fn`, with room for P + N + k positions.
    options: static options.

  Traceable: call it under `jax.jit` with `options` static.
  """
  k = options.block_size
  adaptive = options.adaptive
  # What the adaptive rule's estimate reads: head confidences or counts.
  by_confidence = adaptive is not None and adaptive.estimate == "confidence"
  by_history = adaptive is not None and not by_confidence
  first_logits, cache = prefill_logits(score_fn, params, prompts,
                                       prompt_lengths, cache, k)
  state = DecodeState.make(
      prompt_lengths, jnp.argmax(first_logits, axis=-1), cache, options,
      confidence=proposal_confidence(first_logits) if by_confidence else None)
  split = isinstance(score_fn, SplitScoreFn)

  def cond(state: DecodeState):
    return ~jnp.all(state.done) & (state.step < options.max_new_tokens)

  def step(state: DecodeState, t: int):
    """One call verifying the first t <= k tokens of the proposal."""
    block = state.proposal[:, :t]  # [B, t]
    block_positions = (state.positions[:, None]
                       + jnp.arange(t, dtype=jnp.int32))  # [B, t]
    if split:
      hidden, cache = score_fn.trunk(params, block, block_positions,
                                     state.cache)  # [B, t, ...]
      head1 = score_fn.heads(params, hidden, 1)[:, :, 0]  # [B, t, V]
    else:
      logits, cache = score_fn(params, block, block_positions,
                               state.cache)  # [B, t, k, V]
      head1 = logits[:, :, 0]
    matches = options.acceptance.matches(block[:, 1:],
                                         head1[:, :-1])  # [B, t-1]
    accepted = accepted_prefix_length(matches)  # [B] in [1, t]
    verified = accepted  # Before EOS and the budget cut it.
    ended = jnp.zeros_like(state.done)
    if options.eos_id is not None:
      is_eos = ((block == options.eos_id)
                & (jnp.arange(t) < accepted[:, None]))  # [B, t]
      ended = jnp.any(is_eos, axis=-1)
      accepted = jnp.where(ended, jnp.argmax(is_eos, axis=-1) + 1, accepted)
    accepted = jnp.minimum(accepted, options.max_new_tokens - state.lengths)
    active = ~state.done
    accepted = jnp.where(active, accepted, 0).astype(jnp.int32)
    tokens = write_rows(state.tokens, state.proposal, state.lengths)
    lengths = state.lengths + accepted
    done = state.done | (active & ended) | (lengths >= options.max_new_tokens)
    # The heads' argmaxes after the last accepted token form the next block.
    last = jnp.maximum(accepted - 1, 0)
    if split:
      last_hidden = take_positions(hidden, last)[:, None]  # [B, 1, ...]
      next_logits = score_fn.heads(params, last_hidden, k)[:, 0]  # [B, k, V]
    else:
      next_logits = take_positions(logits, last)[:, :k]  # [B, k, V]
    proposal = jnp.argmax(next_logits, axis=-1).astype(jnp.int32)
    confidence = state.confidence
    tested, passed = state.draft_tested, state.draft_passed
    if by_confidence:
      confidence = jnp.where(active[:, None], proposal_confidence(next_logits),
                             confidence)
    if by_history:
      # Draft j (1 <= j < t) was verified iff P[0..j-1] were accepted.
      depth = jnp.arange(k)[None, :]
      reached = active[:, None] & (depth >= 1) & (depth < t)
      tested = tested + (reached & (depth <= verified[:, None]))
      passed = passed + (reached & (depth < verified[:, None]))
    hist = state.accepted_hist + (
        active[:, None] & (jnp.arange(k)[None, :] == accepted[:, None] - 1))
    return state.replace(
        step=state.step + 1, tokens=tokens, lengths=lengths,
        proposal=jnp.where(active[:, None], proposal, state.proposal),
        done=done, num_calls=state.num_calls + active,
        accepted_hist=hist.astype(jnp.int32), confidence=confidence,
        draft_tested=tested, draft_passed=passed, cache=cache)

  if adaptive is None:
    body = lambda state: step(state, k)
  else:
    sizes = adaptive.candidate_sizes(k)
    branches = [functools.partial(step, t=t) for t in sizes]

    def body(state: DecodeState):
      which = adaptive.choose(adaptive.survival(state), ~state.done, k)
      return jax.lax.switch(which, branches, state)

  state = while_loop_compacting(cond, body, state, lambda s: s.done,
                                options.compact_rows)
  return finalize(state, options)
