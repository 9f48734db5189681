"""Plain greedy decoding: one token per model call.

This is the reference every exact mode is tested against, so it is kept as
simple as possible and shares no step logic with the blockwise loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from blockdec.decoding.state import (DecodeOptions, DecodeOutput, DecodeState,
                                     ScoreFn, finalize, prefill, write_rows)


def greedy_decode(score_fn: ScoreFn, params, prompts: jax.Array,
                  prompt_lengths: jax.Array, cache,
                  options: DecodeOptions) -> DecodeOutput:
  """Greedy decoding with head 1 only; `options.block_size` is ignored.

  Each call feeds the token chosen by the previous call, commits it, and
  picks the next, so `num_calls == lengths` for every row.
  """
  options = DecodeOptions(max_new_tokens=options.max_new_tokens, block_size=1,
                          eos_id=options.eos_id, pad_id=options.pad_id)
  first, cache = prefill(score_fn, params, prompts, prompt_lengths, cache, 1)
  state = DecodeState.make(prompt_lengths, first, cache, options)

  def cond(state: DecodeState):
    return ~jnp.all(state.done)

  def body(state: DecodeState):
    token = state.proposal  # [B, 1]
    logits, cache = score_fn(params, token, state.positions[:, None],
                             state.cache)  # [B, 1, k, V]
    active = ~state.done
    tokens = write_rows(state.tokens, token, state.lengths)
    lengths = state.lengths + active
    done = state.done | (lengths >= options.max_new_tokens)
    if options.eos_id is not None:
      done = done | (active & (token[:, 0] == options.eos_id))
    next_token = jnp.argmax(logits[:, :, 0], axis=-1).astype(jnp.int32)
    return state.replace(
        step=state.step + 1, tokens=tokens, lengths=lengths.astype(jnp.int32),
        proposal=next_token, done=done, num_calls=state.num_calls + active,
        accepted_hist=state.accepted_hist + active[:, None], cache=cache)

  return finalize(jax.lax.while_loop(cond, body, state), options)
