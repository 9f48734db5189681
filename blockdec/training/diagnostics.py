"""Per-head diagnostics: how often head i agrees with the base model's greedy path.

Blockwise decoding accepts head i's proposal only if it equals the token the
base model would greedily produce i - 1 steps later, so the useful accuracy of
head i is its top-1 agreement with the model's OWN greedy continuation, not
with the corpus. We measure it teacher-forced: greedily continue held-out
prompts, run the model once over prompt + continuation, and compare head i's
argmax at position t with the sequence token at t + i:

    seq      p p p g1 g2 g3 g4         (prompt p, greedy g; t0 = last prompt pos)
    head 1 at t0 should say g1, head 2 at t0 should say g2, head 3 at t0 g3...

Positions count while t + i stays inside the continuation. Head 1 agrees
everywhere by construction (up to float near-ties between a cached and an
uncached forward pass), which the tests use as a check.

A draft model (the "draft" training regime) is scored the same way against
its base's greedy continuation (`draft_agreement`), and
`draft_tokens_per_call` turns its per-position matches into the tokens per
target call of exact speculative decoding.
"""

from __future__ import annotations

import jax
import numpy as np

from blockdec import api
from blockdec.models import transformer

_apply = jax.jit(transformer.apply, static_argnums=1)  # Full-sequence logits.


def agreement_counts(pred: np.ndarray, seq: np.ndarray, start: np.ndarray,
                     end: np.ndarray):
  """Per-head agreement from argmax predictions.

  Args:
    pred: int [B, T, k]; pred[b, t, i-1] is head i's argmax at position t.
    seq: int [B, T] the teacher-forced sequence.
    start: int [B] the first position to score (the last prompt position).
    end: int [B] one past the last valid position of `seq`.

  Returns:
    (hits [k], counts [k]) over positions t >= start with t + i < end.
  """
  pred, seq = np.asarray(pred), np.asarray(seq)
  b, t, k = pred.shape
  pos = np.arange(t)[None, :]
  hits, counts = np.zeros(k, np.int64), np.zeros(k, np.int64)
  for i in range(1, k + 1):
    target = np.zeros_like(seq)
    target[:, :t - i] = seq[:, i:]
    valid = (pos >= np.asarray(start)[:, None]) & (pos + i < np.asarray(end)[:, None])
    hits[i - 1] = np.sum((pred[:, :, i - 1] == target) & valid)
    counts[i - 1] = np.sum(valid)
  return hits, counts


def greedy_sequences(params, cfg, prompts, prompt_lengths, new_tokens: int):
  """Prompts continued greedily by the model, packed for teacher forcing.

  Returns seq int32 [B, P + new_tokens] (prompt, continuation, zeros),
  start int [B] (the last prompt position) and end int [B] (one past the
  continuation).
  """
  prompts = np.asarray(prompts, np.int32)
  lengths = np.asarray(prompt_lengths, np.int32)
  out = api.greedy_decode(params, cfg, prompts, lengths,
                          max_new_tokens=new_tokens)
  gen, gen_len = np.asarray(out.tokens), np.asarray(out.lengths)
  b, p = prompts.shape
  seq = np.zeros((b, p + new_tokens), np.int32)
  for r in range(b):
    n = lengths[r]
    seq[r, :n] = prompts[r, :n]
    seq[r, n:n + gen_len[r]] = gen[r, :gen_len[r]]
  return seq, lengths - 1, lengths + gen_len


def predictions(params, cfg, seq) -> np.ndarray:
  """Each head's argmax int [B, T, k] over the teacher-forced `seq` [B, T]."""
  positions = np.broadcast_to(np.arange(seq.shape[1], dtype=np.int32), seq.shape)
  logits, _ = _apply(params, cfg, seq, positions)
  return np.asarray(logits.argmax(-1))


def head_agreement(params, cfg, prompts, prompt_lengths,
                   new_tokens: int = 64) -> np.ndarray:
  """Top-1 agreement [k] of each head with the greedy continuation.

  Args:
    params, cfg: the model (all its heads are scored).
    prompts: int [B, P] right-padded; prompt_lengths: int [B].
    new_tokens: greedy tokens generated per prompt.
  """
  seq, start, end = greedy_sequences(params, cfg, prompts, prompt_lengths,
                                     new_tokens)
  hits, counts = agreement_counts(predictions(params, cfg, seq), seq, start,
                                  end)
  return hits / np.maximum(counts, 1)


def draft_agreement(params, cfg, teacher, prompts, prompt_lengths,
                    new_tokens: int = 64, block_sizes=(4, 8)) -> dict:
  """How well a draft model drafts its target's greedy continuation.

  Args:
    params, cfg: the draft (head 1 is scored).
    teacher: (cfg, params) of the target whose greedy continuation is scored.
    prompts: int [B, P] right-padded; prompt_lengths: int [B].
    new_tokens: greedy tokens the target generates per prompt.
    block_sizes: draft lengths to report tokens per call for.

  Returns:
    {"agreement": share of continuation positions where the draft's argmax
    is the target's next greedy token, "tokens_per_call": {block size:
    draft_tokens_per_call}}.
  """
  t_cfg, t_params = teacher
  seq, start, end = greedy_sequences(t_params, t_cfg, prompts, prompt_lengths,
                                     new_tokens)
  pred = predictions(params, cfg, seq)[:, :, :1]  # [B, T, 1]
  hits, counts = agreement_counts(pred, seq, start, end)
  match = pred[:, :-1, 0] == seq[:, 1:]  # [B, T - 1]
  return {"agreement": float(hits[0] / max(counts[0], 1)),
          "tokens_per_call": {
              int(k): draft_tokens_per_call(match, start, end, k)
              for k in block_sizes}}


def draft_tokens_per_call(match: np.ndarray, start: np.ndarray,
                          end: np.ndarray, block_size: int) -> float:
  """Tokens per target call of exact speculative decoding with a draft model.

  Under greedy verification a drafted token is accepted while it equals the
  target's greedy token, and then the draft has seen only target tokens, so
  its autoregressive drafts ARE its teacher-forced predictions on the
  target's greedy sequence. Each call therefore accepts the run of matches
  starting at the current position (at most block_size - 1 drafted tokens)
  plus the target's own next token:

      match   1 1 0 1 1 1 1 0          (block_size 4: 3 drafted per call)
      calls   [1 1 0] [1 1 1 1] [0]    -> 3 + 4 + 1 tokens in 3 calls

  (a call's last position is the target's own token, whatever the draft said).

  Args:
    match: bool [B, T]; match[b, t]: the draft's argmax at t equals seq[t + 1].
    start: int [B] the last prompt position; end: int [B] one past the
      continuation (as `greedy_sequences` returns them).
    block_size: the most tokens one call yields (block_size - 1 drafted and
      the target's own), as `block_size` in blockdec.DraftModel.

  Returns:
    Generated tokens over target calls, all rows together (the last call of
    a row may be cut short by the end of its continuation).
  """
  match = np.asarray(match, bool)
  tokens = calls = 0
  for row, t, stop in zip(match, np.asarray(start), np.asarray(end)):
    tokens += max(stop - 1 - t, 0)
    while t < stop - 1:
      run = 0
      while run < block_size - 1 and t + run < stop - 1 and row[t + run]:
        run += 1
      t += run + 1
      calls += 1
  return float(tokens / max(calls, 1))
