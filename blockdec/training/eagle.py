"""Training the EAGLE-style drafter on a frozen trunk (regime "eagle").

The drafter (`models.transformer.EagleDrafter`) reads the trunk's final
hidden state h_t beside the embedding of token t + 1 and predicts h_{t+1}
(Li et al. 2024). On a batch of text the frozen trunk gives every h_t in
one forward pass without gradients; the drafter runs over the whole
sequence once, causally, on those true states (teacher forcing), and is
scored two ways at every position:

  feature loss  smooth L1 between the predicted and the true h_{t+1}
                (averaged over the d features), which keeps its
                predictions usable as its own next inputs;
  token loss    cross-entropy of the target's head-1 distribution at t + 1
                (softmax of the true h_{t+1}'s logits) against the
                distribution of the predicted state's logits: the drafter
                learns what the TARGET would say, which is what
                verification accepts.

Drafting feeds the drafter its own predictions after the first draft, so
the inputs are perturbed with uniform noise of half-width `noise` during
training (as EAGLE does), and a second pass (`unroll=2`) feeds each
position the first pass's prediction of its state instead of the true one,
which is what a depth-2 draft sees. Everything outside `eagle` stays
frozen: head 1 and the trunk, so greedy decoding, are bit-for-bit the
base's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from blockdec.config import ModelConfig
from blockdec.models import transformer


def losses(params, cfg: ModelConfig, batch, key: jax.Array, *,
           feature_weight: float = 1.0, noise: float = 0.1,
           unroll: int = 2):
  """(loss, metrics) of the EAGLE drafter on batch {"tokens", "mask"} [B, S]
  (and "hidden" [B, S, d], the frozen trunk's states of the rows, where the
  Trainer computed them once).

  Args:
    params: the model's parameters (the trunk is treated as a constant).
    cfg: its config (eagle_layers >= 1).
    batch: tokens and a 0/1 mask of scored positions [B, S].
    key: PRNG key of the input noise.
    feature_weight: weight of the feature loss beside the token loss.
    noise: half-width of the uniform noise added to input states.
    unroll: 1 (teacher forcing only) or 2 (plus a pass on the drafter's
      own first predictions); the loss is the mean over passes.

  Returns:
    (scalar loss, dict of per-pass "token_loss" [unroll], "feature_loss"
    [unroll] and "top1" [unroll]: the share of positions whose predicted
    argmax is the target's).
  """
  if unroll not in (1, 2):
    raise ValueError(f"unroll={unroll} must be 1 or 2.")
  tokens, mask = batch["tokens"], batch["mask"]
  model = transformer.Transformer(cfg)
  positions = jnp.broadcast_to(
      jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  if "hidden" in batch:  # The frozen trunk's states, computed once
    hidden = batch["hidden"]  # (`Trainer.frozen_trunk_features`).
  else:
    hidden, _ = model.apply({"params": params}, tokens, positions,
                            method="trunk")
  hidden = jax.lax.stop_gradient(hidden)  # [B, S, d]
  teacher = jax.lax.stop_gradient(model.apply(
      {"params": params}, hidden, method="vocab_logits"))  # [B, S, V]
  # Position t reads (h_t, x_{t+1}) and is scored against h_{t+1}.
  inputs, after = hidden[:, :-1], tokens[:, 1:]
  target_h, target_logits = hidden[:, 1:], teacher[:, 1:]
  weights = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
  if unroll == 2:
    # The second pass needs a first-pass prediction of its input state, so
    # its first position has none and is not scored.
    weights2 = weights.at[:, 0].set(0.0)
  target_p = jax.nn.softmax(target_logits, axis=-1)
  target_top = jnp.argmax(target_logits, axis=-1)

  def score(states, weights):
    pred, _ = model.apply({"params": params}, states, after,
                          positions[:, :-1], method="eagle_step")
    logits = model.apply({"params": params}, pred, method="vocab_logits")
    ce = optax.softmax_cross_entropy(logits, target_p)  # [B, S-1]
    feat = optax.huber_loss(pred.astype(jnp.float32),
                            target_h.astype(jnp.float32)).mean(-1)
    top1 = (jnp.argmax(logits, -1) == target_top).astype(jnp.float32)
    norm = jnp.maximum(weights.sum(), 1.0)
    return pred, ((ce * weights).sum() / norm, (feat * weights).sum() / norm,
                  (top1 * weights).sum() / norm)

  keys = jax.random.split(key, unroll)
  jitter = lambda x, k: x + jax.random.uniform(
      k, x.shape, x.dtype, -noise, noise) if noise else x
  pred, first = score(jitter(inputs, keys[0]), weights)
  passes = [first]
  if unroll == 2:
    # Position t now reads the first pass's prediction of h_t (made at
    # t - 1); position 0 keeps the true state and is not scored.
    own = jnp.concatenate([inputs[:, :1], pred[:, :-1]], axis=1)
    _, second = score(jitter(jax.lax.stop_gradient(own), keys[1]), weights2)
    passes.append(second)
  ce, feat, top1 = (jnp.stack(x) for x in zip(*passes))
  loss = jnp.mean(ce + feature_weight * feat)
  return loss, {"token_loss": ce, "feature_loss": feat, "top1": top1}
