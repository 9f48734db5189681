"""Prompt lookup as a drafter: draft what followed the same n-gram before.

Code, chat and summaries repeat their own context: an identifier, a
quoted line, a closing pattern. Prompt lookup (HF transformers'
`prompt_lookup_num_tokens`, vLLM's n-gram speculator) needs no model: per
row it takes the last `ngram` tokens (the decided next token included),
finds where they occurred earlier in the prompt or the generated text, and
drafts the tokens that followed there. Here, batched in jax inside the loop:

  - the longest match wins (n = ngram, then fewer on a miss, down to 1),
    and among equally long ones the most recent;
  - the continuation of a match ending at position e, with period
    p = (current end) - e, is the text after e, continued periodically
    past the current end: a row caught in a loop gets full blocks;
  - a row with no match, or one shorter than `min_match` tokens, says so
    (`Draft.length` = 0), so the adaptive draft length verifies nothing
    there (its drafts, filler or the short match's continuation, are fed
    only without the adaptive rule).

Drafts are deterministic, so with sampling they count as one-hot q and the
speculative-sampling verifier stays lossless.

Worked example, ngram = 2, next token "c": the row reads "a b c d a b"
then "c" (decided, not yet committed). The last two tokens "b c" occurred
ending at position 2, so the drafts are "d a b c d ..." (period 4).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from blockdec.decoding.core import Draft, View, ViewDrafter


def context_tokens(prompts, prompt_lengths, generated, lengths, next_token):
  """Each row's text so far as one array.

  Returns (seq [B, P + M + 1] int32, end [B] int32): seq[b, :end[b]] is the
  prompt then the committed generated tokens, seq[b, end[b]] the decided
  next token, and -1 after it.
  """
  p = prompts.shape[1]
  m = generated.shape[1]
  j = jnp.arange(p + m + 1, dtype=jnp.int32)[None, :]
  pl = prompt_lengths[:, None]
  end = prompt_lengths + lengths
  from_prompt = jnp.take_along_axis(prompts, jnp.clip(j, 0, p - 1), axis=1)
  from_gen = jnp.take_along_axis(generated, jnp.clip(j - pl, 0, m - 1), axis=1)
  seq = jnp.where(j < pl, from_prompt, from_gen)
  seq = jnp.where(j == end[:, None], next_token[:, None], seq)
  seq = jnp.where(j <= end[:, None], seq, -1)
  return seq.astype(jnp.int32), end.astype(jnp.int32)


def lookup(seq: jax.Array, end: jax.Array, ngram: int, num_drafts: int):
  """The longest, most recent earlier match of each row's last tokens.

  Args:
    seq: [B, L] int32 from `context_tokens` (-1 past `end`).
    end: [B] int32 index of the decided next token (the query's last token).
    ngram: the longest n-gram to match.
    num_drafts: D tokens to draft.

  Returns:
    drafts [B, D] int32 (the next token repeated where nothing matched) and
    matched [B] int32, the length of the match used (0: none).
  """
  length = seq.shape[1]
  e = jnp.arange(length, dtype=jnp.int32)[None, :]  # candidate match ends
  query = jnp.take_along_axis(
      seq, jnp.clip(end[:, None] - jnp.arange(ngram), 0, length - 1), axis=1)
  run = jnp.ones(seq.shape, bool)
  matched = jnp.zeros(seq.shape, jnp.int32)
  for i in range(ngram):
    # seq[e - i] == query[i], with both positions inside the text.
    shifted = jnp.pad(seq, ((0, 0), (i, 0)), constant_values=-1)[:, :length]
    run = run & (shifted == query[:, i:i + 1]) & (end[:, None] - i >= 0)
    matched = matched + run
  # Only earlier occurrences count (e < end); longest first, then latest.
  score = jnp.where((e < end[:, None]) & (matched > 0), matched * length + e,
                    -1)
  best = jnp.argmax(score, axis=1).astype(jnp.int32)  # [B]
  found = jnp.max(score, axis=1) >= 0
  period = jnp.maximum(end - best, 1)
  j = jnp.arange(num_drafts, dtype=jnp.int32)[None, :]
  index = best[:, None] + 1 + j % period[:, None]
  drafts = jnp.take_along_axis(seq, jnp.clip(index, 0, length - 1), axis=1)
  next_token = jnp.take_along_axis(seq, end[:, None], axis=1)
  drafts = jnp.where(found[:, None], drafts, next_token)
  used = jnp.take_along_axis(matched, best[:, None], axis=1)[:, 0]
  return drafts.astype(jnp.int32), jnp.where(found, used, 0).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class PromptLookupDrafter(ViewDrafter):
  """Drafts `block_size - 1` tokens by n-gram lookup in the row's own text.

  Carry: tokens [B, D] the next drafts; length [B] how many are real
  (D after a match of at least `min_match` tokens, else 0).
  """

  ngram: int
  block_size: int
  min_match: int = 1

  def update(self, carry, view: View):
    del carry
    seq, end = context_tokens(view.prompts, view.prompt_lengths,
                              view.generated, view.lengths, view.next_token)
    tokens, matched = lookup(seq, end, self.ngram, self.num_drafts)
    return {"tokens": tokens,
            "length": jnp.where(matched >= self.min_match,
                                self.num_drafts, 0)}

  def propose(self, carry, view: View) -> Draft:
    return Draft(tokens=carry["tokens"][:, None], length=carry["length"])
