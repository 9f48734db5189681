"""Draft diagnostics after Kim et al. (2024, sec. 3): what is wrong with the
heads' independent argmax drafts, and how much a lattice could recover.

Measured teacher-forced along the model's own greedy continuation (the
tokens exact verification accepts): at each position t after the prompt,
head j's distribution is compared with the greedy token at t + j.

  * consecutive repetition: how often adjacent draft tokens are equal
    (draft[j] == draft[j+1]), against the same rate in the greedy text. The
    heads, trained independently, repeat a likely token more often than the
    text does;
  * per-head entropy and confidence (max probability), falling with j;
  * oracle coverage: how often the greedy token is among head j's top-K
    (K = 1 is plain accuracy), and the oracle block size: 1 + the number of
    leading depths whose greedy token is in the top-K, i.e. what an ideal
    lattice rescorer with K candidates per head would accept at that
    position (an upper bound; K = 1 is what plain heads accept there).

    stats = draft_statistics(*head_predictions(params, cfg, prompts, lengths))
    plot_draft_statistics(stats, "drafts.png")
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blockdec import api
from blockdec.config import ModelConfig
from blockdec.models import transformer


@functools.partial(jax.jit, static_argnames=("cfg", "num_heads"))
def _all_heads(params, tokens, source, source_lengths, cfg: ModelConfig,
               num_heads: int):
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                               tokens.shape)
  memory = None if source is None else transformer.encode(
      params, cfg, source, source_lengths)
  logits, _ = transformer.apply(params, cfg, tokens, positions, None,
                                num_heads=num_heads, memory=memory)
  return jax.nn.log_softmax(logits, axis=-1)  # [B, T, k, V]


def head_predictions(params, cfg: ModelConfig, prompts, prompt_lengths, *,
                     max_new_tokens: int = 64, num_heads: int | None = None,
                     eos_id: int | None = None, source=None,
                     source_lengths=None):
  """Heads' log-probs along each row's greedy continuation.

  `eos_id` ends a continuation at its EOS (kept: the heads must draft it
  too); `source` [B, S] and `source_lengths` [B] are an encoder-decoder's
  inputs (`blockdec.decode`'s), the prompts then being the decoder's (BOS).

  Returns:
    log_probs [N, k, V] float32 at the N positions t from each row's last
      prompt token on (head j at t predicts the token at t + j + 1);
    targets [N, k] int32 the greedy tokens there (-1 past the continuation);
    valid [N, k] bool where the target exists.
  """
  k = num_heads or cfg.num_prediction_heads
  prompts = np.asarray(prompts)
  prompt_lengths = np.asarray(prompt_lengths)
  out = api.greedy_decode(params, cfg, prompts, prompt_lengths,
                          max_new_tokens=max_new_tokens, eos_id=eos_id,
                          source=source, source_lengths=source_lengths)
  gen, gen_len = np.asarray(out.tokens), np.asarray(out.lengths)
  batch = prompts.shape[0]
  total = prompt_lengths + gen_len
  # One width for every call of these shapes (one compile).
  seq = np.zeros((batch, prompts.shape[1] + max_new_tokens), np.int32)
  for b in range(batch):
    seq[b, :prompt_lengths[b]] = prompts[b, :prompt_lengths[b]]
    seq[b, prompt_lengths[b]:total[b]] = gen[b, :gen_len[b]]
  log_probs = np.asarray(_all_heads(
      params, jnp.asarray(seq),
      None if source is None else jnp.asarray(source, jnp.int32),
      None if source is None else jnp.asarray(source_lengths, jnp.int32),
      cfg=cfg, num_heads=k))
  rows, tgts, valid = [], [], []
  for b in range(batch):
    for t in range(prompt_lengths[b] - 1, total[b] - 1):
      idx = t + 1 + np.arange(k)
      ok = idx < total[b]
      rows.append(log_probs[b, t])
      tgts.append(np.where(ok, seq[b, np.minimum(idx, seq.shape[1] - 1)], -1))
      valid.append(ok)
  return (np.stack(rows).astype(np.float32), np.stack(tgts).astype(np.int32),
          np.stack(valid))


def draft_statistics(log_probs, targets, valid,
                     widths: Sequence[int] = (1, 2, 4, 8, 16)) -> dict:
  """Kim et al.'s draft diagnostics from `head_predictions`' arrays.

  Returns a dict of lists indexed by head/depth j = 0..k-1 (JSON-ready):
    entropy, confidence, accuracy: per head (nats, mean max prob, top-1);
    draft_repetition[j]: P(argmax_j == argmax_{j+1}) for j < k-1;
    text_repetition[j]: P(target_j == target_{j+1}) on the same positions;
    coverage[K][j]: P(target_j in top-K of head j);
    oracle_block[K]: mean oracle accepted length with K candidates per head.
  """
  log_probs = np.asarray(log_probs, np.float64)
  targets, valid = np.asarray(targets), np.asarray(valid, bool)
  n, k, vocab = log_probs.shape
  probs = np.exp(log_probs)
  mean = lambda x, m: [float(x[:, j][m[:, j]].mean()) if m[:, j].any()
                       else float("nan") for j in range(x.shape[1])]
  entropy = -(probs * log_probs).sum(-1)
  argmax = log_probs.argmax(-1)
  stats = dict(num_positions=int(n), num_heads=int(k),
               entropy=mean(entropy, valid),
               confidence=mean(probs.max(-1), valid),
               accuracy=mean((argmax == targets).astype(float), valid))
  pair = valid[:, 1:] & valid[:, :-1]
  stats["draft_repetition"] = mean((argmax[:, 1:] == argmax[:, :-1]).astype(float), pair)
  stats["text_repetition"] = mean((targets[:, 1:] == targets[:, :-1]).astype(float), pair)
  # Rank of the target in each head's distribution (0 = argmax).
  target_lp = np.take_along_axis(log_probs, np.maximum(targets, 0)[..., None],
                                 axis=-1)
  rank = (log_probs > target_lp).sum(-1)
  stats["coverage"], stats["oracle_block"] = {}, {}
  for width in widths:
    width = min(int(width), vocab)
    hit = (rank < width) & valid
    stats["coverage"][width] = mean(hit.astype(float), valid)
    # Depth 0 is always accepted; then the longest run of covered depths.
    run = np.cumprod(hit[:, 1:], axis=1).sum(axis=1) if k > 1 else np.zeros(n)
    stats["oracle_block"][width] = float(1 + run.mean())
  return stats


def plot_draft_statistics(stats: dict, path, title: str = "") -> None:
  """Three panels: entropy/confidence per head, top-K coverage, repetition."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  k = stats["num_heads"]
  heads = np.arange(1, k + 1)
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  ax = axes[0]
  ax.plot(heads, stats["entropy"], "o-", label="entropy (nats)")
  ax.set_xlabel("head j")
  ax2 = ax.twinx()
  ax2.plot(heads, stats["confidence"], "s--", color="C1", label="confidence")
  ax2.plot(heads, stats["accuracy"], "^:", color="C2", label="top-1 accuracy")
  ax2.set_ylim(0, 1)
  ax.legend(loc="upper left", fontsize=8)
  ax2.legend(loc="upper right", fontsize=8)
  ax.set_title("per-head entropy / confidence")
  ax = axes[1]
  for width, cov in stats["coverage"].items():
    ax.plot(heads, cov, "o-", label=f"top-{width} (oracle block "
            f"{stats['oracle_block'][width]:.2f})")
  ax.set_xlabel("head j")
  ax.set_ylabel("greedy token in top-K")
  ax.set_ylim(0, 1.02)
  ax.legend(fontsize=7)
  ax.set_title("oracle coverage of the lattice")
  ax = axes[2]
  pairs = np.arange(1, k)
  ax.plot(pairs, stats["draft_repetition"], "o-", label="drafts (argmax)")
  ax.plot(pairs, stats["text_repetition"], "s--", label="greedy text")
  ax.set_xlabel("depth pair (j, j+1)")
  ax.set_ylabel("consecutive repetition rate")
  ax.legend(fontsize=8)
  ax.set_title("consecutive repetitions")
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
