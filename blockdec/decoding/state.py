"""Static options, outputs and helpers shared by the decoding loops.

`core.py` is the draft-and-verify loop every method runs; `greedy.py` is the
plain reference loop. `DecodeState` is the reference loop's state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from blockdec.decoding.acceptance import Exact
from blockdec.decoding.rescoring import tree_call
from blockdec.decoding.sampling import Sampling
from blockdec.decoding.verify import Verifier

# score(params, tokens [B, T], positions [B, T], cache) -> (logits [B, T, k, V], cache)
# The callable writes the block's keys/values at `positions` and treats every
# cache slot at or past `positions[:, 0]` as stale (that is the rollback).
ScoreFn = Callable[[Any, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class SplitScoreFn:
  """A `ScoreFn` split into a trunk and its output heads.

  Verification needs head 1 at every block position but the proposal heads
  only at the last accepted one; with the split the loops compute exactly
  that (k heads at 1 position instead of k heads at k positions).

  Attributes:
    trunk: (params, tokens [B, T], positions [B, T], cache)
      -> (hidden [B, T, ...], cache).
    heads: (params, hidden [B, T', ...], num_heads) -> logits [B, T', num_heads, V].
    num_heads: heads returned by a plain call.
    prefill: optional `trunk` for a cache that holds nothing committed yet
      (the prompt's call): it may write the cache without reading it, and
      it takes `keep=` (None, or [B, M] block indices): with it, it returns
      the hidden states at those tokens only ([B, M, ...]), which lets it
      skip work at the others (see `Transformer.trunk`). None: `trunk`.
  """

  trunk: Callable[[Any, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
  heads: Callable[[Any, jax.Array, int], jax.Array]
  num_heads: int
  prefill: Callable[..., tuple[jax.Array, Any]] | None = None

  def __call__(self, params, tokens, positions, cache):
    hidden, cache = self.trunk(params, tokens, positions, cache)
    return self.heads(params, hidden, self.num_heads), cache


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """Static options of a decoding run (hashable: a static jit argument).

  Attributes:
    max_new_tokens: N, the per-row budget of generated tokens.
    block_size: k, tokens fed and verified per call (1 = one token).
    acceptance: the verifier (`verify.Verifier`); `Exact()` is lossless:
      greedy output, or speculative sampling with `sampling`.
    eos_id: a token that ends its row (counted in `lengths`), or None.
    pad_id: written after each row's end in the output.
    compact_rows: core loop: once at most half of the rows are active,
      continue on a batch of half the size holding them (same output; see
      `while_loop_compacting` for what the state must look like, else it
      is skipped).
    adaptive: core loop: choose per call how many of the drafted tokens to
      verify (`adaptive.AdaptiveBlockSize`), or None to verify them all.
    sampling: `sampling.Sampling` to sample, or None for greedy decoding.
  """

  max_new_tokens: int
  block_size: int = 1
  acceptance: Verifier = Exact()
  eos_id: int | None = None
  pad_id: int = 0
  compact_rows: bool = True
  adaptive: Any = None
  sampling: Sampling | None = None


@flax.struct.dataclass
class DecodeState:
  """Per-row state of the greedy reference loop.

  Attributes:
    step: [] int32 loop iterations so far.
    prompt_lengths: [B] int32.
    tokens: [B, N + k] int32 generated tokens; garbage past `lengths`.
    lengths: [B] int32 committed generated tokens per row.
    proposal: [B, 1] int32 the next token (head 1's argmax).
    done: [B] bool rows that hit EOS or their budget.
    num_calls: [B] int32 model calls while the row was active.
    accepted_hist: [B, 1] int32 calls per row.
    cache: the scoring function's cache pytree (opaque here).
  """

  step: jax.Array
  prompt_lengths: jax.Array
  tokens: jax.Array
  lengths: jax.Array
  proposal: jax.Array
  done: jax.Array
  num_calls: jax.Array
  accepted_hist: jax.Array
  cache: Any

  @classmethod
  def make(cls, prompt_lengths, proposal, cache, options: DecodeOptions):
    batch, k = proposal.shape
    zeros = jnp.zeros((batch,), jnp.int32)
    return cls(
        step=jnp.zeros((), jnp.int32),
        prompt_lengths=prompt_lengths.astype(jnp.int32),
        tokens=jnp.full((batch, options.max_new_tokens + k), options.pad_id,
                        jnp.int32),
        lengths=zeros,
        proposal=proposal.astype(jnp.int32),
        done=jnp.zeros((batch,), bool),
        num_calls=zeros,
        accepted_hist=jnp.zeros((batch, k), jnp.int32),
        cache=cache)

  @property
  def positions(self) -> jax.Array:
    """[B] position of the next token to commit (prompt included)."""
    return self.prompt_lengths + self.lengths


@flax.struct.dataclass
class DecodeOutput:
  """Result of a decoding run.

  Attributes:
    tokens: [B, N] int32, `pad_id` after each row's end.
    lengths: [B] int32 generated tokens per row (an ending EOS counts).
    num_calls: [B] int32 model calls after prefill while the row was active.
    accepted_hist: [B, K] int32; entry a - 1 counts the row's calls that
      committed a tokens.
  """

  tokens: jax.Array
  lengths: jax.Array
  num_calls: jax.Array
  accepted_hist: jax.Array

  @property
  def block_efficiency(self) -> jax.Array:
    """Mean accepted block size over all rows: tokens per model call."""
    return jnp.sum(self.lengths) / jnp.maximum(jnp.sum(self.num_calls), 1)


def prefill_logits(score_fn: ScoreFn, params, prompts, prompt_lengths, cache,
                   num_heads: int):
  """Runs the prompts once; returns (logits [B, num_heads, V], cache).

  prompts [B, P] right-padded; the logits are the heads' at each row's last
  prompt token.
  """
  batch, p = prompts.shape
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (batch, p))
  head_fn, cache = tree_call(score_fn, params, prompts, positions, cache,
                             prefill=True,
                             keep=(prompt_lengths - 1)[:, None])
  return head_fn(jnp.zeros((batch, 1), jnp.int32), num_heads)[:, 0], cache


def prefill(score_fn: ScoreFn, params, prompts, prompt_lengths, cache,
            num_heads: int):
  """`prefill_logits`, argmaxed: (first block [B, num_heads], cache)."""
  last, cache = prefill_logits(score_fn, params, prompts, prompt_lengths,
                               cache, num_heads)
  return jnp.argmax(last, axis=-1).astype(jnp.int32), cache


def finalize(state: DecodeState, options: DecodeOptions) -> DecodeOutput:
  """Masks everything after each row's end once, after the loop."""
  n = options.max_new_tokens
  valid = jnp.arange(n)[None, :] < state.lengths[:, None]
  tokens = jnp.where(valid, state.tokens[:, :n], options.pad_id)
  return DecodeOutput(tokens=tokens, lengths=state.lengths,
                      num_calls=state.num_calls,
                      accepted_hist=state.accepted_hist)


def write_rows(buffer: jax.Array, block: jax.Array, offsets: jax.Array):
  """Writes block [B, T] into buffer [B, M] at per-row offsets [B]."""
  return jax.vmap(lambda row, blk, off: jax.lax.dynamic_update_slice(
      row, blk, (off,)))(buffer, block, offsets)


def while_loop_compacting(cond, body, state, done_of, compact: bool = True):
  """`jax.lax.while_loop(cond, body, state)`, halving the batch as rows finish.

  The loop runs at batch B while more than B/2 rows are active
  (`done_of(state)` [B] bool); then the active rows (finished ones fill any
  spare places) are gathered into a batch of ceil(B/2) that runs the same
  loop, and so on down to one row; the rows are scattered back at the end.
  Each row's computation is unchanged, so is the result; where a step's
  cost grows with the batch (CPUs, accelerators once compute-bound), the
  last slow rows stop paying for the finished ones. Costs a gather and a
  scatter of the state per halving and one compiled loop body per batch
  size.

  Every leaf of `state` must be a scalar (global: taken from the smaller
  batch's loop) or have the batch as leading axis (per row); otherwise, or
  with `compact=False` or one row, this is a plain while loop. The body
  must not close over per-row arrays (they would keep batch B).
  """
  done = done_of(state)
  batch = done.shape[0]
  leaves, treedef = jax.tree_util.tree_flatten(state)
  per_row = [x.ndim >= 1 for x in leaves]
  half = (batch + 1) // 2
  if (not compact or half == batch
      or any(r and x.shape[0] != batch for x, r in zip(leaves, per_row))):
    return jax.lax.while_loop(cond, body, state)

  def wide_cond(s):
    return cond(s) & (jnp.sum(~done_of(s)) > half)

  state = jax.lax.while_loop(wide_cond, body, state)
  leaves = jax.tree_util.tree_leaves(state)
  # Active rows first (stable), then enough finished ones to fill the batch.
  rows = jnp.argsort(done_of(state), stable=True)[:half]
  sub = jax.tree_util.tree_unflatten(
      treedef, [x[rows] if r else x for x, r in zip(leaves, per_row)])
  sub = while_loop_compacting(cond, body, sub, done_of)
  merged = [x.at[rows].set(y) if r else y
            for x, y, r in zip(leaves, jax.tree_util.tree_leaves(sub), per_row)]
  return jax.tree_util.tree_unflatten(treedef, merged)
