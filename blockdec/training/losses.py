"""Losses of the k heads and how each training regime combines them.

Head j at input position t predicts the token at t + j (head 1 is the
ordinary next-token loss). A batch row of S tokens gives T = S - 1 input
positions; head j has targets at the positions t with t + j <= S - 1:

    tokens  a b c d e          (S = 5, T = 4)
    head 1  b c d e            targets tokens[t + 1]
    head 2  c d e .            the last position has no target (weight 0)

Combining heads (fine-tuned regimes): we minimise the MEAN of the k per-head
mean cross-entropies. Stern et al. (sec. 4) instead sample one head per
minibatch uniformly at random and backpropagate only its loss; that estimate's
expectation is exactly this mean, so the mean gives the same expected gradient
without the sampling variance, at the cost of evaluating all k vocabulary
projections (cheap next to the trunk). Mean rather than sum keeps the loss
scale, and so the learning rate, independent of k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# What each regime trains and which heads its loss averages.
#   trains: "all" parameters, only params["proposal_heads"] ("heads") or
#           only params["eagle"] ("eagle"); the last two freeze the base.
#   heads:  "first" (head 1 only), "proposals" (heads 2..k), "all" (1..k).
#   distill: targets are the base's greedy continuations (distill.generate).
#   model:  "fresh" (initialised from config.model and config.seed) or
#           "base" (the base checkpoint, plus any heads it lacks).
# "draft" trains a small separate model (a speculative-decoding draft) on the
# base's own greedy text; it shares only the base's tokenizer.
# "block_diffusion" adapts the base (plus a [MASK] token) to denoise blocks,
# on the diffusion loss plus the autoregressive one (training/diffusion.py);
# its held-out loss is the autoregressive head-1 loss;
# "block_diffusion_distill" the same with the diffusion loss on the base's
# greedy continuations (deterministic targets, as Stern's distillation gives
# the heads) and the autoregressive loss on corpus rows.
# "eagle" trains the EAGLE-style drafter on the frozen base (training/
# eagle.py), "eagle_distill" the same on the base's greedy continuations;
# their held-out regime loss is the drafter's token loss.
REGIMES = {
    "base": dict(trains="all", heads="first", distill=False, model="fresh"),
    "frozen": dict(trains="heads", heads="proposals", distill=False,
                   model="base"),
    "finetune": dict(trains="all", heads="all", distill=False, model="base"),
    "distill": dict(trains="heads", heads="proposals", distill=True,
                    model="base"),
    "distill_finetune": dict(trains="all", heads="all", distill=True,
                             model="base"),
    "draft": dict(trains="all", heads="first", distill=True, model="fresh"),
    "block_diffusion": dict(trains="all", heads="first", distill=False,
                            model="base"),
    "block_diffusion_distill": dict(trains="all", heads="first", distill=True,
                                    model="base"),
    "eagle": dict(trains="eagle", heads="first", distill=False, model="base"),
    "eagle_distill": dict(trains="eagle", heads="first", distill=True,
                          model="base"),
}


def is_diffusion(regime: str) -> bool:
  """Whether `regime` adapts the base to block diffusion (training/
  diffusion.py), on the corpus or on the base's greedy continuations."""
  return regime in ("block_diffusion", "block_diffusion_distill")


def check_regime(regime: str, num_heads: int) -> None:
  if regime not in REGIMES:
    raise ValueError(f"regime={regime!r} is not supported; allowed: "
                     f"{tuple(REGIMES)}.")
  if REGIMES[regime]["heads"] == "proposals" and num_heads < 2:
    raise ValueError(f"regime={regime!r} trains proposal heads but the model "
                     f"has num_prediction_heads={num_heads}; set it to >= 2.")


def head_targets(tokens: jax.Array, mask: jax.Array, num_heads: int):
  """Splits rows into inputs and per-head targets.

  Args:
    tokens: int [B, S] rows.
    mask: float [B, S]; mask[b, s] = 0 excludes token s as a target.
    num_heads: k.

  Returns:
    inputs [B, T], targets [B, T, k] (int32), weights [B, T, k] (float32),
    with T = S - 1.
  """
  _, s = tokens.shape
  t = s - 1
  padded = jnp.pad(tokens, ((0, 0), (0, num_heads)))
  padded_mask = jnp.pad(mask.astype(jnp.float32), ((0, 0), (0, num_heads)))
  targets = jnp.stack([padded[:, j:j + t] for j in range(1, num_heads + 1)], 2)
  weights = jnp.stack([padded_mask[:, j:j + t] for j in range(1, num_heads + 1)],
                      2)
  return tokens[:, :t].astype(jnp.int32), targets.astype(jnp.int32), weights


def per_head_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """Summed cross-entropy [k] and summed weights [k] of logits [B, T, k, V]."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T, k]
  return jnp.sum(ce * weights, axis=(0, 1)), jnp.sum(weights, axis=(0, 1))


def per_head_losses(logits, targets, weights) -> jax.Array:
  """Mean cross-entropy per head [k] (nats per target token)."""
  ce_sum, w_sum = per_head_sums(logits, targets, weights)
  return ce_sum / jnp.maximum(w_sum, 1.0)


def regime_loss(regime: str, head_losses: jax.Array,
                first_head_weight: float = 1.0) -> jax.Array:
  """The scalar a regime minimises, from per-head losses [k].

  `first_head_weight` (regimes that train all heads) weighs head 1 against
  each proposal head: the loss is (w * L1 + L2 + ... + Lk) / (w + k - 1).
  w = 1 is the plain mean; w = k - 1 gives head 1 half of the loss, which
  keeps the trunk a good next-token model while the heads pull on it.
  """
  heads = REGIMES[regime]["heads"]
  if heads == "first":
    return head_losses[0]
  if heads == "proposals":
    return jnp.mean(head_losses[1:])
  k = head_losses.shape[0]
  return ((first_head_weight * head_losses[0] + jnp.sum(head_losses[1:]))
          / (first_head_weight + k - 1))
