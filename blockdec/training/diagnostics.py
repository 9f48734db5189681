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


def head_agreement(params, cfg, prompts, prompt_lengths,
                   new_tokens: int = 64) -> np.ndarray:
  """Top-1 agreement [k] of each head with the greedy continuation.

  Args:
    params, cfg: the model (all its heads are scored).
    prompts: int [B, P] right-padded; prompt_lengths: int [B].
    new_tokens: greedy tokens generated per prompt.
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
  positions = np.broadcast_to(np.arange(seq.shape[1], dtype=np.int32), seq.shape)
  logits, _ = _apply(params, cfg, seq, positions)
  pred = np.asarray(logits.argmax(-1))  # [B, T, k]
  hits, counts = agreement_counts(pred, seq, lengths - 1, lengths + gen_len)
  return hits / np.maximum(counts, 1)


