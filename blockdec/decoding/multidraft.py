"""Blockwise decoding with refined drafts: the refined drafter in the core.

See `drafters/refined.py` for the drafts (Kim et al. 2024's lattice
rescoring and multi-draft trees) and `core.py` for the loop.
"""

from __future__ import annotations

import jax

from blockdec.decoding import core
from blockdec.decoding.drafters.refined import (DraftOptions, NeuralRescorer,
                                                RefinedDrafter,
                                                history_tokens)
from blockdec.decoding.ngram import NGramLM
from blockdec.decoding.state import DecodeOptions, DecodeOutput

CompactFn = core.CompactFn


def refined_blockwise_decode(score_fn, params, prompts: jax.Array,
                             prompt_lengths: jax.Array, cache,
                             options: DecodeOptions, drafts: DraftOptions, *,
                             compact_fn: CompactFn | None = None,
                             ngram: NGramLM | None = None,
                             rescorer: NeuralRescorer | None = None,
                             key: jax.Array | None = None) -> DecodeOutput:
  """Blockwise decoding with p rescored drafts per call.

  Args:
    score_fn: the model's scoring callable, plain (`ScoreFn`) or split into
      trunk and heads; for p > 1 it (or its trunk) must accept a static
      `mask=` for tree calls (see `rescoring.tree_call`).
    params: passed through to `score_fn`.
    prompts: [B, P] int32, right-padded.
    prompt_lengths: [B] int32 in [1, P].
    cache: an empty cache with room for P + N + `drafts.tree_size(k)` slots.
    options: static decoding options (block size k, acceptance, EOS, budget,
      compaction, adaptive length for p = 1, sampling for p = 1).
    drafts: static draft options.
    compact_fn: moves the accepted path's cache entries; required for p > 1.
    ngram: the n-gram LM when `drafts.ngram_weight` is non-zero.
    rescorer: the small LM when `drafts.neural_weight` is non-zero.
    key: PRNG key when `options.sampling` is set.

  Returns:
    `DecodeOutput`, as `blockwise_decode`'s.

  Traceable: call it under `jax.jit` with `options` and `drafts` static.
  """
  drafter = RefinedDrafter(options.block_size, drafts, ngram, rescorer)
  return core.run(score_fn, params, prompts, prompt_lengths, cache, options,
                  drafter, key=key, compact_fn=compact_fn)


__all__ = ["DraftOptions", "NeuralRescorer", "history_tokens",
           "refined_blockwise_decode"]
