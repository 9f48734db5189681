"""Adapting an autoregressive model to block diffusion (regime "block_diffusion").

Starting from a trained blockdec LM, one [MASK] token is added to the
vocabulary and the whole model is fine-tuned on two losses computed in one
forward pass over three streams of each training row (T input positions):

    stream 0  x_0 .. x_{T-1}, causal           head 1 at p predicts x_{p+1}:
                                               the autoregressive loss
    stream 1  u_0 .. u_{T-1}, blocks of b      a query in block i sees the
    stream 2  the complement of stream 1       clean stream before the block
                                               and its own block both ways

(`kernels.DiffusionTrainingMask`; every stream at positions 0 .. T-1.) In a
noisy stream the first position of each block holds the clean token (the
decoded token a block starts from, the *root*), and position p of a block
holds x_p or [MASK]. Token shift: the logits at p predict x_{p+1}, so the
targets of block i are x_{ib+1} .. x_{ib+b}; target j is masked with the
block's ratio r ~ U(0, 1) (its input, where it is one, is [MASK]) and the
diffusion loss is the cross-entropy over masked targets. Stream 2 masks
exactly the targets stream 1 keeps (complementary masks), so every target
is learned once per row. Example, b = 2, T = 4, stream 1 masking targets
x_2 and x_3:

    p         0    1      2    3      targets x_1 x_2 | x_3 x_4
    stream 1  x_0  x_1    x_2  [M]    loss at p = 1, 2 (x_2 is no input of
                                      block 0: it is the last target)
    stream 2  x_0  [M]    x_2  x_3    loss at p = 0, 3

That is what a decoding call of `BlockDiffusion` sees: the committed tokens
(causal keys in the cache), then [root, x_1 .. x_{b-1}] with the undecided
ones masked (`blockdec/decoding/drafters/block_diffusion.py`). The loss is
diffusion + ar_weight * autoregressive; the autoregressive term keeps the
model a good autoregressive model (and its keys and values the ones the
decoder caches).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blockdec import api
from blockdec.config import ModelConfig
from blockdec.kernels import masks
from blockdec.models import transformer
from blockdec.training import losses as losses_lib


def adapt_model(base_cfg: ModelConfig, base_params, seed: int):
  """(cfg, params) of the base with a [MASK] token (id = base vocab size).

  The embedding gets one row (and an untied output projection one column)
  initialised like a fresh model's; proposal heads are dropped (the adapted
  model decodes with head 1 only); every other parameter is the base's.
  """
  if base_cfg.mask_token_id is not None:
    raise ValueError(f"the base model already has mask_token_id="
                     f"{base_cfg.mask_token_id}; adapt an autoregressive "
                     "model.")
  vocab = base_cfg.vocab_size
  cfg = base_cfg.replace(vocab_size=vocab + 1, mask_token_id=vocab,
                         num_prediction_heads=1)
  fresh = jax.device_get(api.init_params(cfg, jax.random.key(seed)))
  base = jax.device_get(base_params)

  def merge(new, old, path):
    if isinstance(new, dict):
      return {k: merge(v, old[k], f"{path}/{k}") for k, v in new.items()}
    old = np.asarray(old)
    if old.shape == new.shape:
      return old
    if path == "/embed/embedding" and old.shape == (vocab, new.shape[1]):
      return np.concatenate([old, np.asarray(new)[vocab:]], axis=0)
    if path == "/lm_head/kernel" and old.shape == (new.shape[0], vocab):
      return np.concatenate([old, np.asarray(new)[:, vocab:]], axis=1)
    raise ValueError(f"parameter {path}: base shape {old.shape}, adapted "
                     f"model {new.shape}.")

  try:
    params = merge(fresh, base, "")
  except KeyError as e:
    raise ValueError(f"the base checkpoint lacks parameter {e}.") from None
  return cfg, params


def noisy_streams(tokens: jax.Array, key: jax.Array, block_size: int,
                  mask_id: int):
  """Two complementary noisy copies of the inputs.

  Args:
    tokens: [B, S] int32 rows (inputs are the first T = S - 1).
    key: PRNG key.
    block_size: b.
    mask_id: the [MASK] token.

  Returns:
    (inputs [B, 2, T] int32, masked [B, 2, T] bool): stream s's input and
    whether the target of position p (token p + 1) is masked in it.
  """
  rows, s = tokens.shape
  t = s - 1
  num_blocks = -(-t // block_size)
  ratio_key, mask_key = jax.random.split(key)
  ratio = jax.random.uniform(ratio_key, (rows, num_blocks))
  block = jnp.arange(t) // block_size  # Block of position p (target p + 1).
  # masked1[b, p]: target p + 1 is masked in stream 1 (stream 2: not).
  masked1 = jax.random.uniform(mask_key, (rows, t)) < ratio[:, block]
  masked = jnp.stack([masked1, ~masked1], axis=1)  # [B, 2, T]
  # Input p (not a block's first) is token p, masked iff target p is, i.e.
  # iff position p - 1's target is masked.
  input_masked = jnp.pad(masked[:, :, :-1], ((0, 0), (0, 0), (1, 0)))
  first = (jnp.arange(t) % block_size) == 0
  input_masked = input_masked & ~first
  inputs = jnp.where(input_masked, mask_id,
                     jnp.broadcast_to(tokens[:, None, :t], masked.shape))
  return inputs.astype(jnp.int32), masked


# Keys of a batch's corpus rows (regime "block_diffusion_distill").
CORPUS_PREFIX = "corpus_"


def losses(params, cfg: ModelConfig, batch, key: jax.Array,
           block_size: int):
  """(autoregressive loss, diffusion loss), nats per target token.

  batch: {"tokens", "mask"} [B, S]; mask[b, s] = 0 excludes token s as a
  target (both losses). With "corpus_tokens" and "corpus_mask" too (regime
  "block_diffusion_distill": "tokens" are the base's greedy continuations),
  the autoregressive loss is taken on those corpus rows instead, in a
  causal pass of their own, so the model learns to denoise the base's
  output while its autoregressive head stays fitted to real text.
  """
  tokens = batch["tokens"].astype(jnp.int32)
  rows, s = tokens.shape
  t = s - 1
  weight = batch["mask"][:, 1:].astype(jnp.float32)  # [B, T] of targets
  noisy, masked = noisy_streams(tokens, key, block_size, cfg.mask_token_id)
  inputs = jnp.concatenate([tokens[:, None, :t], noisy], axis=1)  # [B, 3, T]
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (rows, 3, t))
  logits, _ = transformer.apply(
      params, cfg, inputs.reshape(rows, 3 * t), positions.reshape(rows, 3 * t),
      num_heads=1, mask=masks.DiffusionTrainingMask(t, block_size, 2))
  logits = logits[:, :, 0].reshape(rows, 3, t, -1)
  targets = jnp.broadcast_to(tokens[:, None, 1:], (rows, 3, t))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  ar = jnp.sum(ce[:, 0] * weight) / jnp.maximum(jnp.sum(weight), 1.0)
  w = masked.astype(jnp.float32) * weight[:, None]
  diffusion = jnp.sum(ce[:, 1:] * w) / jnp.maximum(jnp.sum(w), 1.0)
  if CORPUS_PREFIX + "tokens" in batch:
    ar = _corpus_ar_loss(params, cfg, batch[CORPUS_PREFIX + "tokens"],
                         batch[CORPUS_PREFIX + "mask"])
  return ar, diffusion


def _corpus_ar_loss(params, cfg: ModelConfig, tokens, mask):
  """Head 1's mean cross-entropy on rows [B, S] (mask as in `losses`)."""
  inputs, targets, weights = losses_lib.head_targets(tokens, mask, 1)
  positions = jnp.broadcast_to(
      jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
  logits, _ = transformer.apply(params, cfg, inputs, positions, num_heads=1)
  return losses_lib.per_head_losses(logits, targets, weights)[0]
