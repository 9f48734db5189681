"""Lookahead decoding (Fu et al. 2024) as a drafter: no draft model, no heads.

Jacobi iteration guesses many future tokens at once and refines them every
call; the guesses are rarely right where they stand, but the n-grams they
pass through often recur. Lookahead decoding keeps a 2D window of guesses,
collects the n-grams it produces in a pool, and verifies the pool's
n-grams that start with the decided next token, all in one model call.

One call feeds, after the root r (the decided next token, position pos):

  verification  G chains of N - 1 tokens: the pool's most recent n-grams
                starting with r (a token tree, `lattice.DraftTree(G, N)`);
  lookahead     the window: N - 1 levels of W guesses. Guess (l, j) sits
                at pos + 1 + l + j and sees the prefix, r, level 0's guesses
                0..j and the guesses above it in column j, so column j down
                to level l reads as one sequence:

                    level 0:   a0 a1 a2 a3        (W = 4, N = 3)
                    level 1:      b0 b1 b2 b3

                (b1 sees r a0 a1 b1). These are the drafter's extra nodes
                (`core.ExtraNodes`): fed and attended, never committed.

After the call, the head-1 argmax o_j at the last level's guess j is the
next Jacobi guess of the position after it. Column j then yields the n-gram
(a_j, b_j, ..., o_j), added to the row's pool (a ring buffer of
`pool_size` distinct n-grams); the window drops level 0 and appends the
o's as its new last level. Every committed token is still decided by the
verifier, so the output is greedy's whatever the guesses.

The window starts from prompt tokens and drifts with the text: its
positions are relative to each call's root, as in the paper.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from blockdec.decoding.core import Draft, Drafter, ExtraNodes, View
from blockdec.decoding.lattice import DraftTree


def window_nodes(tree_size: int, window: int, ngram: int) -> ExtraNodes:
  """The lookahead window as extra nodes after a tree of `tree_size` nodes;
  guess (l, j) is extra node l * window + j."""
  parents, depths = [], []
  for level in range(ngram - 1):
    for j in range(window):
      if level > 0:
        parent = tree_size + (level - 1) * window + j
      else:
        parent = 0 if j == 0 else tree_size + j - 1
      parents.append(parent)
      depths.append(1 + level + j)
  return ExtraNodes(tuple(parents), tuple(depths))


def add_to_pool(pool: jax.Array, next_slot: jax.Array, grams: jax.Array):
  """Adds the distinct new n-grams to each row's ring buffer.

  Args:
    pool: [B, S, N] int32 n-grams (-1: empty).
    next_slot: [B] int32 the slot the next new n-gram is written to.
    grams: [B, W, N] int32 candidates.

  Returns:
    (pool, next_slot) with every gram not already pooled (nor repeated
    earlier in `grams`) written in order, overwriting the oldest.
  """
  pool, grams = jnp.asarray(pool), jnp.asarray(grams)
  size, width = pool.shape[1], grams.shape[1]
  pooled = jnp.any(jnp.all(grams[:, :, None] == pool[:, None], -1), -1)
  same = jnp.all(grams[:, :, None] == grams[:, None], -1)  # [B, W, W]
  earlier = jnp.tril(jnp.ones((width, width), bool), -1)
  repeated = jnp.any(same & earlier[None], -1)
  keep = ~(pooled | repeated)
  order = jnp.cumsum(keep, axis=1) - 1  # [B, W]
  slots = jnp.where(keep, (next_slot[:, None] + order) % size, size)
  rows = jnp.arange(pool.shape[0])[:, None]
  pool = pool.at[rows, slots].set(grams, mode="drop")
  return pool, ((next_slot + keep.sum(1)) % size).astype(jnp.int32)


def pool_candidates(pool: jax.Array, next_slot: jax.Array, first: jax.Array,
                    guesses: int):
  """The `guesses` most recent pooled n-grams starting with `first` [B].

  Returns (continuations [B, G, N - 1] int32, found [B, G] bool); slots
  without a match repeat the best one (or hold zeros).
  """
  size = pool.shape[1]
  recency = (jnp.arange(size)[None, :] - next_slot[:, None]) % size
  match = pool[:, :, 0] == first[:, None]
  score = jnp.where(match, recency, -1)
  top, index = jax.lax.top_k(score, guesses)  # [B, G]
  found = top >= 0
  index = jnp.where(found, index, index[:, :1])
  grams = jnp.take_along_axis(pool, index[:, :, None], axis=1)[:, :, 1:]
  grams = jnp.where(found[:, :1, None], grams, 0)
  return grams.astype(jnp.int32), found


@dataclasses.dataclass(frozen=True)
class LookaheadDrafter(Drafter):
  """Lookahead decoding with a W x (N - 1) window and G guesses per call.

  Carry: window [B, N - 1, W], pool [B, S, N], next_slot [B], drafts
  [B, G, N - 1].
  """

  window: int
  ngram: int
  guesses: int
  pool_size: int

  @property
  def num_drafts(self) -> int:
    return self.ngram - 1

  @property
  def tree(self) -> DraftTree:
    return DraftTree(self.guesses, self.ngram)

  @property
  def extra(self) -> ExtraNodes:
    return window_nodes(self.tree.size, self.window, self.ngram)

  @property
  def prompt_features(self):
    return False  # init reads no hidden states.

  def init(self, view: View):
    batch = view.prompts.shape[0]
    # The first guesses: prompt tokens, cycled.
    index = (jnp.arange(self.ngram - 1)[:, None]
             + jnp.arange(self.window)[None, :])  # [N - 1, W]
    index = index[None] % view.prompt_lengths[:, None, None]
    window = jnp.take_along_axis(
        view.prompts, index.reshape(batch, -1), axis=1).reshape(index.shape)
    pool = jnp.full((batch, self.pool_size, self.ngram), -1, jnp.int32)
    next_slot = jnp.zeros((batch,), jnp.int32)
    return self._carry(window.astype(jnp.int32), pool, next_slot, view)

  def _carry(self, window, pool, next_slot, view: View):
    drafts, _ = pool_candidates(pool, next_slot, view.next_token, self.guesses)
    return {"window": window, "pool": pool, "next_slot": next_slot,
            "drafts": drafts}

  def update(self, carry, view: View):
    batch = view.lengths.shape[0]
    guesses = jnp.argmax(view.extra_logits, axis=-1).astype(jnp.int32)
    last = guesses.reshape(batch, self.ngram - 1, self.window)[:, -1]  # [B, W]
    window = carry["window"]
    grams = jnp.concatenate([jnp.swapaxes(window, 1, 2), last[:, :, None]],
                            axis=2)  # [B, W, N]: column j's n-gram
    pool, next_slot = add_to_pool(carry["pool"], carry["next_slot"], grams)
    window = jnp.concatenate([window[:, 1:], last[:, None]], axis=1)
    return self._carry(window, pool, next_slot, view)

  def propose(self, carry, view: View) -> Draft:
    return Draft(tokens=carry["drafts"],
                 extra=carry["window"].reshape(carry["window"].shape[0], -1))
