"""Blockwise parallel decoding (Stern et al. 2018): the heads drafter in the core.

One iteration is one model call per batch:

  1. feed the decided token and the heads' k - 1 drafts at positions
     L .. L+k-1;
  2. verify: with `Exact()` a draft survives iff every earlier one did and
     it equals head 1's argmax after them (with sampling: speculative
     sampling, `verify.SpeculativeSampling`);
  3. commit 1 + a tokens (fewer at EOS or at the budget), L += 1 + a;
  4. the heads at the last committed node give the next token's drafts.

The loop itself (compaction, EOS, budget, adaptive lengths) is `core.run`;
this module only picks the drafter. Worked example with k = 3, one row,
greedy:

  fed           [the, cat, sat]      head-1 argmax at the fed nodes
  argmax p1     [cat, ran, ...]      0 -> "cat" (matches), 1 -> "ran"
  committed     2 ("the cat");       "sat" != "ran" is rejected
  next call     ["ran", h2, h3] from the heads at "cat"
"""

from __future__ import annotations

import jax

from blockdec.decoding import core
from blockdec.decoding.drafters.heads import HeadsDrafter
from blockdec.decoding.state import DecodeOptions, DecodeOutput, ScoreFn


def blockwise_decode(score_fn: ScoreFn, params, prompts: jax.Array,
                     prompt_lengths: jax.Array, cache,
                     options: DecodeOptions, key: jax.Array | None = None
                     ) -> DecodeOutput:
  """Decodes with blocks of `options.block_size` drafted by the model's heads.

  Args:
    score_fn: see `ScoreFn`; must return at least `block_size` heads.
    params: passed through to `score_fn`.
    prompts: [B, P] int32, right-padded.
    prompt_lengths: [B] int32 in [1, P].
    cache: an empty cache for `score_fn`, with room for P + N + k positions.
    options: static options.
    key: PRNG key when `options.sampling` is set.

  Traceable: call it under `jax.jit` with `options` static.
  """
  return core.run(score_fn, params, prompts, prompt_lengths, cache, options,
                  HeadsDrafter(options.block_size), key=key)
