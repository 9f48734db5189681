"""Hydra's dependent heads as a drafter (Ankner et al. 2024).

Stern's head j sees only the trunk's state h at the last committed node, so
it cannot know what heads 2..j-1 drafted before it; deep drafts of a block
often contradict the ones before them. A Hydra head also reads the tokens
before its target: head j gets h and the embeddings of the decided token
(the root) and drafts 1..j-2, and drafts token j - 1 of the chain. The
drafts therefore come one after the other, each a small feed-forward step
(`models.transformer.HydraHead`), all from the same h:

    root r (decided)     head 2 (h, r)             -> draft 1
                         head 3 (h, r, draft 1)    -> draft 2
                         ...
                         head k (h, r, .., draft k-2) -> draft k - 1

Greedy drafts are argmaxes; with sampling each is drawn from its filtered
distribution q (keyed by its generated index), which depends on the drafts
before it, as the speculative-sampling verifier allows. h is the target's
final hidden state at the last committed node (`View.features`), the state
head 1 read to decide the root.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from blockdec.decoding import sampling as sampling_lib
from blockdec.decoding.core import Draft, Drafter, View

# head(h [B, d], tokens [B, j - 1], j) -> head j's logits [B, V]: the
# model's Hydra head j bound to its parameters (`methods.Hydra` binds
# `models.transformer.Transformer.hydra_head`; j is static).
HydraHeadFn = Callable[[jax.Array, jax.Array, int], jax.Array]


class HydraDrafter(Drafter):
  """Drafts `block_size - 1` tokens with Hydra heads 2..block_size.

  Built inside the jitted decode (`head` closes over the target's traced
  parameters). Carry: tokens [B, D]; q [B, D, V] with sampling; confidence
  [B, D] for the adaptive rule's "confidence" estimate.
  """

  def __init__(self, block_size: int, head: HydraHeadFn):
    self.block_size, self._head = block_size, head

  @property
  def num_drafts(self) -> int:
    return self.block_size - 1

  def _draft(self, h: jax.Array, view: View):
    """The chain after the root from h [B, d] at the last committed node."""
    sampling, batch = view.context.sampling, view.lengths.shape[0]
    if self.num_drafts == 0:
      return {"tokens": jnp.zeros((batch, 0), jnp.int32)}
    chain, qs, confidence = [view.next_token], [], []
    for j in range(2, self.block_size + 1):
      logits = self._head(h, jnp.stack(chain, axis=1), j)  # [B, V]
      # Draft j - 1 is generated token lengths + j - 1 (the root: lengths).
      token, q = sampling_lib.draft(logits, sampling, view.keys,
                                    view.lengths + j - 1)
      chain.append(token)
      if q is not None:
        qs.append(q)
      if view.context.want_confidence:
        probs = jax.nn.softmax(logits.astype(jnp.float32)) if q is None else q
        confidence.append(jnp.take_along_axis(probs, token[:, None],
                                              axis=-1)[:, 0])
    out = {"tokens": jnp.stack(chain[1:], axis=1).astype(jnp.int32)}
    if qs:
      out["q"] = jnp.stack(qs, axis=1)
    if confidence:
      out["confidence"] = jnp.stack(confidence, axis=1)
    return out

  @staticmethod
  def _state_at(features: jax.Array | None, index: jax.Array) -> jax.Array:
    if features is None:
      raise ValueError("Hydra drafts from the target's hidden states; the "
                       "scorer must be split into trunk and heads "
                       "(api.model_score_fn).")
    return jnp.take_along_axis(features, index[:, None, None], axis=1)[:, 0]

  def init(self, view: View):
    return self._draft(self._state_at(view.features, view.prompt_lengths - 1),
                       view)

  def update(self, carry, view: View):
    del carry
    last = jnp.maximum(view.num_committed - 1, 0)
    return self._draft(self._state_at(view.features, last), view)

  def propose(self, carry, view: View) -> Draft:
    q = carry.get("q")
    return Draft(tokens=carry["tokens"][:, None],
                 q=None if q is None else q[:, None],
                 confidence=carry.get("confidence"))
