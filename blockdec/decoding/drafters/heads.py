"""Stern et al.'s proposal heads as a drafter (blockwise parallel decoding).

After a call, the heads at the last committed node predict the next block:
head 1 the next token (the verifier decides that one), head j + 1 the token
j places after it. The drafts are their argmaxes under greedy decoding, and
draws from their filtered distributions q with sampling (which the
speculative-sampling verifier needs). Heads do not see each other's drafts:
head j's q is the same whatever heads 2..j-1 drew, which is still a valid
draft distribution.

With a token tree (`tree`, a `lattice.DraftTree` of depth k - 1; Medusa's
static trees, `tree_shapes.best_tree`) a node of rank r at depth j holds
head j + 1's r-th likeliest token; with a `lattice.DynamicTree` each row
grows its own tree every call from the heads' probabilities (EAGLE-2's
expansion; a path's probability is the product of its heads'). Tree
drafts are deterministic under sampling too (the verifier matches them
against the target's own draws).

Worked example, k = 3, greedy: after the call the heads at the last
committed node read [the, cat, sat]; "the" is head 1's (the next token,
chosen by the verifier), so the next call feeds [the, cat, sat] with drafts
[cat, sat].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from blockdec.decoding import sampling as sampling_lib
from blockdec.decoding.core import Draft, View, ViewDrafter
from blockdec.decoding.lattice import (DraftTree, DynamicTree, chain_tokens,
                                      grow_tree, ranked)


@dataclasses.dataclass(frozen=True)
class HeadsDrafter(ViewDrafter):
  """Drafts `block_size - 1` tokens with heads 2..block_size.

  Carry: tokens [B, D] int32 the next drafts ([B, C, D] with a tree); q
  [B, D, V] their filtered distributions (sampling, chains only);
  confidence [B, D] (adaptive "confidence" estimate only).
  """

  block_size: int
  # Of depth block_size - 1 (k tokens a chain), or grown per row and call.
  tree: DraftTree | DynamicTree | None = None

  def update(self, carry, view: View):
    del carry
    d = self.num_drafts
    context = view.context
    batch = view.lengths.shape[0]
    if d == 0:
      return {"tokens": jnp.zeros((batch, 0), jnp.int32)}
    logits = view.heads(self.block_size)[:, 1:]  # [B, D, V] heads 2..k
    if isinstance(self.tree, DynamicTree):
      rows = grow_tree(lambda level, paths: jnp.broadcast_to(
          logits[:, None, level - 1], paths.shape[:2] + logits.shape[-1:]),
                       view.next_token, d, self.tree)
      return {"tokens": chain_tokens(rows), "tree": rows}
    if self.tree is not None:  # [B, C, D]: chain c's rank at each depth.
      return {"tokens": ranked(logits[:, None], self.tree.chain_ranks)}
    if context.sampling is None:
      tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      out = {"tokens": tokens}
      if context.want_confidence:
        logits = logits.astype(jnp.float32)
        out["confidence"] = 1.0 / jnp.sum(
            jnp.exp(logits - logits.max(-1, keepdims=True)), -1)
      return out
    log_q = context.sampling.log_probs(logits)  # [B, D, V]
    # Draft j is generated token lengths + j (the next token is `lengths`).
    index = view.lengths[:, None] + 1 + jnp.arange(d, dtype=jnp.int32)
    keys = sampling_lib.token_keys(view.keys, index, sampling_lib.DRAFT)
    tokens = sampling_lib.sample(keys, log_q)
    q = jnp.exp(log_q)
    out = {"tokens": tokens, "q": q}
    if context.want_confidence:
      out["confidence"] = jnp.take_along_axis(q, tokens[..., None], -1)[..., 0]
    return out

  def propose(self, carry, view: View) -> Draft:
    q = carry.get("q")
    if self.tree is not None:
      return Draft(tokens=carry["tokens"], tree=carry.get("tree"))
    return Draft(tokens=carry["tokens"][:, None],
                 q=None if q is None else q[:, None],
                 confidence=carry.get("confidence"))
