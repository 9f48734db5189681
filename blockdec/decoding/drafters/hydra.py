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

With a token tree (`tree`, a `lattice.DraftTree`) a node of rank r holds
the r-th likeliest token of its head given its own path (every chain's
heads read that chain's tokens), so the drafts are deterministic under
sampling too (the verifier matches them against the target's draws).
With a `lattice.DynamicTree` each row grows its own tree every call
(EAGLE-2's expansion): the K likeliest paths of each level are expanded
with their heads' K likeliest tokens, and the T - 1 likeliest nodes are
verified.

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
from blockdec.decoding.lattice import (DraftTree, DynamicTree, chain_tokens,
                                      grow_tree, ranked)

# head(h [B, d], tokens [B, j - 1], j) -> head j's logits [B, V]: the
# model's Hydra head j bound to its parameters (`methods.Hydra` binds
# `models.transformer.Transformer.hydra_head`; j is static).
HydraHeadFn = Callable[[jax.Array, jax.Array, int], jax.Array]


class HydraDrafter(Drafter):
  """Drafts `block_size - 1` tokens with Hydra heads 2..block_size.

  Built inside the jitted decode (`head` closes over the target's traced
  parameters). Carry: tokens [B, D] ([B, C, D] with a tree); q [B, D, V]
  with sampling (chains only); confidence [B, D] for the adaptive rule's
  "confidence" estimate.
  """

  def __init__(self, block_size: int, head: HydraHeadFn,
               tree: DraftTree | DynamicTree | None = None):
    self.block_size, self._head, self._tree = block_size, head, tree

  @property
  def num_drafts(self) -> int:
    return self.block_size - 1

  @property
  def tree(self) -> DraftTree | DynamicTree | None:
    return self._tree

  def _grow(self, h: jax.Array, view: View):
    """Each row's own tree (`lattice.grow_tree`) from Hydra's heads."""
    def logits_fn(level, paths):  # paths [B, K', level]
      batch, width = paths.shape[:2]
      logits = self._head(jnp.repeat(h, width, axis=0),
                          paths.reshape(batch * width, level), level + 1)
      return logits.reshape(batch, width, -1)

    rows = grow_tree(logits_fn, view.next_token, self.num_drafts, self._tree)
    return {"tokens": chain_tokens(rows), "tree": rows}

  def _draft_tree(self, h: jax.Array, view: View):
    """Every chain of the tree, head after head, each from its own path."""
    tree, batch = self._tree, view.lengths.shape[0]
    if isinstance(tree, DynamicTree):
      return self._grow(h, view)
    chains = tree.num_drafts
    h = jnp.repeat(h, chains, axis=0)  # [B C, d]
    chain = [jnp.repeat(view.next_token, chains)]
    for j in range(2, self.block_size + 1):
      logits = self._head(h, jnp.stack(chain, axis=1), j)  # [B C, V]
      token = ranked(logits.reshape(batch, chains, -1),
                     tree.chain_ranks[:, j - 2])  # [B, C]
      chain.append(token.reshape(-1))
    tokens = jnp.stack(chain[1:], axis=1).reshape(batch, chains, -1)
    return {"tokens": tokens.astype(jnp.int32)}

  def _draft(self, h: jax.Array, view: View):
    """The chain after the root from h [B, d] at the last committed node."""
    sampling, batch = view.context.sampling, view.lengths.shape[0]
    if self._tree is not None:
      return self._draft_tree(h, view)
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

  @property
  def prompt_features(self):
    return False  # init reads the last prompt token's state only.

  def init(self, view: View):
    # The view holds the last prompt token's state only (node 0).
    return self._draft(
        self._state_at(view.features, jnp.zeros_like(view.prompt_lengths)),
        view)

  def update(self, carry, view: View):
    del carry
    last = jnp.maximum(view.num_committed - 1, 0)
    return self._draft(self._state_at(view.features, last), view)

  def propose(self, carry, view: View) -> Draft:
    q = carry.get("q")
    if self._tree is not None:
      return Draft(tokens=carry["tokens"], tree=carry.get("tree"))
    return Draft(tokens=carry["tokens"][:, None],
                 q=None if q is None else q[:, None],
                 confidence=carry.get("confidence"))
