"""Block diffusion as a drafter: the model denoises a block of [MASK] tokens.

A model adapted for block diffusion (`configs/block_diffusion.py`) predicts
a masked position from the logits of the position before it (token shift,
so its head 1 keeps its autoregressive meaning), attending to the committed
cache causally and to its own block both ways. One block of b tokens after
the decided token (the root) at position `pos`:

    feed   [root, x_1, .., x_{b-1}] at pos .. pos + b - 1 with
           BlockBidirectionalMask(b); x_j is [MASK] until decided
    read   logits at i predict x_{i+1}; confidence = its largest probability
           ([MASK] itself excluded)
    decide every undecided x_j whose confidence is >= threshold, and at
           least the most confident one; repeat until the block is decided

These denoising calls go through `View.score`, which writes nothing to the
target's cache, and are reported in `Draft.calls`. The block then goes to
the core's ordinary verification call, a causal call on [root, x_1 .. x_b]
that writes the block's clean (autoregressive) keys and values:

  * `AcceptAll(mask)`: the drafts are the output (block diffusion proper;
    lossy), and the call's last logits decide the token after the block;
  * `Exact()`: the model in autoregressive mode verifies its own diffusion
    draft (self-speculative, as S2D2): the output is the adapted model's
    greedy output token for token.

With `stop_token` (AdaBlock-style adaptive block size) the block ends after
the first decided `stop_token` (e.g. a newline) whose preceding positions
are all decided: the positions after it become [MASK] filler, never
accepted, and are decoded in the next block with that line as context.

Sub-block caching (Fast-dLLM v2 reuses the keys and values of a block's
finished sub-blocks between denoising steps) is not done: every denoising
step recomputes the whole block, which is exact with respect to the mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from blockdec.decoding.core import Draft, Drafter, View
from blockdec.kernels import masks


class BlockDiffusionDrafter(Drafter):
  """Drafts a block of `block_size` tokens by parallel denoising.

  Args:
    block_size: b, tokens drafted per block (after the root).
    threshold: confidence at which a masked position is decided; 1.0
      decides one position per denoising call, 0.0 all of them in one.
    mask_id: the model's [MASK] token.
    stop_token: end a block after this token (None: fixed blocks).
  """

  def __init__(self, block_size: int, threshold: float, mask_id: int,
               stop_token: int | None = None):
    self.block_size, self.threshold = block_size, threshold
    self.mask_id, self.stop_token = mask_id, stop_token

  @property
  def num_drafts(self) -> int:
    return self.block_size

  def init(self, view: View):
    return None

  def update(self, carry, view: View):
    return None

  def denoise_step(self, logits, tokens, decided):
    """One denoising decision.

    Args:
      logits: [B, b, V] head-1 logits of the fed block (i predicts x_{i+1}).
      tokens: [B, b] int32 the block's tokens ([MASK] where undecided).
      decided: [B, b] bool.

    Returns:
      (tokens, decided, confidence [B, b]) after deciding every undecided
      position at or above the threshold, and at least the most confident.
    """
    logits = logits.at[..., self.mask_id].set(-jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    confidence = jnp.max(probs, axis=-1)
    predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    pending = ~decided
    best = jnp.argmax(jnp.where(pending, confidence, -1.0), axis=-1)
    first = jax.nn.one_hot(best, self.block_size, dtype=bool)
    decide = pending & ((confidence >= self.threshold) | first)
    tokens = jnp.where(decide, predicted, tokens)
    decided = decided | decide
    if self.stop_token is not None:
      ready = jnp.cumprod(decided.astype(jnp.int32), axis=-1).astype(bool)
      stop = ready & (tokens == self.stop_token)
      after = (jnp.arange(self.block_size)[None]
               > jnp.argmax(stop, axis=-1)[:, None])
      cut = jnp.any(stop, axis=-1, keepdims=True) & after
      tokens = jnp.where(cut, self.mask_id, tokens)
      decided = decided | cut
    return tokens, decided, confidence

  def propose(self, carry, view: View) -> Draft:
    b, rows = self.block_size, view.lengths.shape[0]
    root = view.next_token.astype(jnp.int32)
    positions = ((view.prompt_lengths + view.lengths)[:, None]
                 + jnp.arange(b, dtype=jnp.int32))
    mask = masks.BlockBidirectionalMask(b)

    def cond(c):
      _, decided, _ = c
      return ~jnp.all(decided)

    def body(c):
      tokens, decided, calls = c
      fed = jnp.concatenate([root[:, None], tokens[:, :b - 1]], axis=1)
      logits = view.score(fed, positions, mask)
      calls = calls + jnp.any(~decided, axis=-1)
      tokens, decided, _ = self.denoise_step(logits, tokens, decided)
      return tokens, decided, calls.astype(jnp.int32)

    # Every step decides at least one position of every unfinished row, so
    # the loop ends after at most b steps.
    tokens, _, calls = jax.lax.while_loop(
        cond, body, (jnp.full((rows, b), self.mask_id, jnp.int32),
                     jnp.zeros((rows, b), bool),
                     jnp.zeros((rows,), jnp.int32)))
    return Draft(tokens=tokens[:, None], calls=calls)
