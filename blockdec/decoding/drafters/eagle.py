"""An EAGLE-style drafter: a small decoder on the target's own features.

Li et al. 2024 (EAGLE): drafting is easier one level below the tokens. The
drafter (`models.transformer.EagleDrafter`, `cfg.eagle_layers` decoder
blocks) reads, at position t, the target trunk's final hidden state h_t
(the state head 1 turns into token t + 1) and the embedding of token t + 1,
and predicts h_{t+1}; the target's own vocabulary projection turns that
into the draft of token t + 2. Its inputs at committed positions are the
TARGET's states, which every verification call computes anyway
(`View.features`); along a draft it feeds its own predictions. It keeps its
own KV cache in the carry, with the target's slot convention (slot s holds
position s), so a rejected draft is rolled back by writing over it.

One drafting round, after a call committed c tokens at positions
o .. o + c - 1 and decided the root at p = o + c:

    block    feed the c committed states, each beside the token after it
             (the last one beside the root), at positions o .. p - 1: one
             drafter call on the call's t >= c fed nodes (the rejected
             ones' slots are written over below) -> h^_p -> draft 1
    step j   feed (h^_{p+j-1}, draft j) at p + j - 1 -> h^_{p+j} -> draft
             j + 1                                         (j = 1 .. D - 1)

D drafter calls per round, each a fraction of a target call (one layer, no
proposal heads). As a token tree every chain (root-to-leaf path of the
tree) steps on its own copy of the drafter's cache; the target verifies
all chains in one tree call. Prefill feeds the prompt the same way. Trees:

  chains C > 1       draft 1 is C tokens, each continued on its own
                     (`lattice.DraftTree(C, k)`, one branching level);
  tree               any static shape (`DraftTree.from_parents`, e.g.
                     `tree_shapes.best_tree`): a node of rank r holds the
                     drafter's r-th likeliest token given its path.

Greedy drafts are argmaxes (ranked: a node of rank r the r-th likeliest)
and the longest accepted chain is kept. With sampling a chain's drafts are
drawn from the filtered distribution q of the drafter's logits (the run's
`Sampling`); C chains' first tokens are independent draws (the row's key
with the chain folded in), which is what the speculative-sampling
verifier's multi-candidate rejection needs to keep the output distributed
as the target's. A `tree`'s drafts stay ranked under sampling
(deterministic drafts, which the verifier matches against the target's own
draws).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from blockdec.decoding import sampling as sampling_lib
from blockdec.decoding.core import Draft, Drafter, View
from blockdec.decoding.lattice import DraftTree, ranked

# step(features [B, T, d], tokens [B, T], positions [B, T], cache, empty)
#   -> (predicted next states [B, T, d], their logits [B, T, V], cache):
# the drafter's network bound to its parameters (`methods.Eagle` binds
# `models.transformer.Transformer.eagle_step`); `empty` (static): the cache
# holds nothing committed yet.
EagleStepFn = Callable[..., tuple[jax.Array, jax.Array, Any]]


class EagleDrafter(Drafter):
  """Drafts `block_size - 1` tokens with the model's EAGLE drafter.

  Built inside the jitted decode (its step closes over the target's
  parameters, which are traced). Carry: cache (the drafter's), tokens
  [B, D], and q [B, D, V] with sampling.

  Args:
    block_size: k, the root plus D = k - 1 drafts per chain.
    step: the drafter's network (`EagleStepFn`).
    cache: its empty cache with room for P + N + k positions.
    chains: C; above 1 the drafts form a token tree (`DraftTree(C, k)`):
      C first tokens (the likeliest, or independent draws with sampling),
      each continued by its own steps.
    tree: a static token tree of depth block_size - 1 (ranked drafts);
      replaces `chains`.
  """

  def __init__(self, block_size: int, step: EagleStepFn, cache: Any,
               chains: int = 1, tree: DraftTree | None = None):
    self.block_size, self._step, self.cache = block_size, step, cache
    if tree is None and chains > 1:
      tree = DraftTree(chains, block_size)
    self._tree, self._given_tree = tree, tree is not None and chains == 1
    self.chains = 1 if tree is None else tree.num_drafts

  @property
  def num_drafts(self) -> int:
    return self.block_size - 1

  @property
  def tree(self) -> DraftTree | None:
    return self._tree

  def _choose(self, logits, keys, lengths, sampling, depth):
    """Draft at `depth` (1-based; generated index lengths + depth, the root
    being `lengths`) from logits [R, V] -> (tokens [R], q or None)."""
    return sampling_lib.draft(logits, sampling, keys, lengths + depth)

  def _chain_keys(self, view: View):
    """Per (row, chain) keys [B C] and lengths [B C]: the row's key with the
    chain folded in, so a tree's chains draw independently."""
    chains, lengths = self.chains, view.lengths
    if chains == 1 or view.keys is None:
      return view.keys, lengths
    keys = jax.vmap(lambda k: jax.vmap(lambda c: jax.random.fold_in(k, c))(
        jnp.arange(chains)))(view.keys).reshape(-1)
    return keys, jnp.repeat(lengths, chains)

  def _draft(self, cache, view: View, features, tokens, offsets, last,
             empty=False):
    """A drafting round: the block (features [B, T, d] beside tokens
    [B, T] at offsets + 0..T-1; `last` [B] indexes the node whose
    prediction is draft 1), then D - 1 single steps per chain.

    The steps' entries (slots from the root's position on) are
    overwritten by the next block before anything reads them: a chain
    keeps the cache the steps wrote (updated in place), a tree the cache
    as the block left it (its chains step on copies).
    """
    d, chains = self.num_drafts, self.chains
    batch = view.lengths.shape[0]
    if d == 0:
      return {"cache": cache,
              "tokens": jnp.zeros((batch, chains, 0), jnp.int32)}
    positions = offsets[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    hidden, logits, cache = self._step(features, tokens, positions, cache,
                                       empty)
    take = lambda x: jnp.take_along_axis(
        x, last.reshape((batch,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]
    hidden, logits = take(hidden), take(logits)
    pos = view.prompt_lengths + view.lengths  # the root's position
    sampling = view.context.sampling
    keys, lengths = self._chain_keys(view)
    steps_cache = cache
    # Ranked drafts (a node of rank r: the r-th likeliest): greedy trees,
    # and given trees under sampling too.
    rank = chains > 1 and (sampling is None or self._given_tree)
    if chains == 1:
      token, q = self._choose(logits, keys, lengths, sampling, 1)
    else:  # Each chain on its own copy of the cache.
      copies = lambda x: jnp.repeat(x, chains, axis=0)
      hidden, pos = copies(hidden), copies(pos)
      steps_cache = jax.tree_util.tree_map(copies, cache)
      if rank:
        token, q = ranked(logits[:, None],
                          self._tree.chain_ranks[:, 0]).reshape(-1), None
      else:  # C independent draws from q (the tree verifier's contract).
        token, q = self._choose(copies(logits), keys, lengths, sampling, 1)
    chain_ranks = None if not rank else jnp.asarray(self._tree.chain_ranks)

    def step(carry, depth):
      cache, hidden, token = carry
      hidden, logits, cache = self._step(hidden[:, None], token[:, None],
                                         (pos + depth - 1)[:, None], cache,
                                         False)
      if rank:  # Draft depth + 1 of chain c: its rank at that depth.
        token = ranked(logits[:, 0].reshape(batch, chains, -1),
                       chain_ranks[:, depth], self._tree.width).reshape(-1)
        q = None
      else:
        token, q = self._choose(logits[:, 0], keys, lengths, sampling,
                                depth + 1)
      return (cache, hidden[:, 0], token), (token, q)

    (steps_cache, _, _), (rest, rest_q) = jax.lax.scan(
        step, (steps_cache, hidden, token), jnp.arange(1, d, dtype=jnp.int32))
    tokens = jnp.concatenate([token[:, None], rest.T], axis=1)  # [B C, D]
    out = {"cache": steps_cache if chains == 1 else cache,
           "tokens": tokens.astype(jnp.int32).reshape(batch, chains, d)}
    if q is not None:
      q = jnp.concatenate([q[:, None], jnp.moveaxis(rest_q, 0, 1)], axis=1)
      out["q"] = q.reshape(batch, chains, d, -1)  # [B, C, D, V]
    return out

  def _features(self, view: View):
    if view.features is None:
      raise ValueError("Eagle drafts from the target's hidden states; the "
                       "scorer must be split into trunk and heads "
                       "(api.model_score_fn).")
    return view.features

  def init(self, view: View):
    prompts, lengths = view.prompts, view.prompt_lengths
    p = prompts.shape[1]
    # Position i reads token i + 1: the prompt's next token, or the first
    # generated one after the prompt's last.
    after = jnp.concatenate([prompts[:, 1:], prompts[:, :1]], axis=1)
    after = jnp.where(jnp.arange(p)[None] == (lengths - 1)[:, None],
                      view.next_token[:, None], after)
    return self._draft(self.cache, view, self._features(view), after,
                       jnp.zeros_like(lengths), lengths - 1, empty=True)

  def update(self, carry, view: View):
    count = view.num_committed
    committed = view.committed  # [B, t]
    t = committed.shape[1]
    after = jnp.concatenate([committed[:, 1:], committed[:, :1]], axis=1)
    after = jnp.where(jnp.arange(t)[None] == (count - 1)[:, None],
                      view.next_token[:, None], after)
    # A finished row commits nothing; its drafts are never used.
    return self._draft(carry["cache"], view, self._features(view), after,
                       view.offsets, jnp.maximum(count - 1, 0))

  def propose(self, carry, view: View) -> Draft:
    return Draft(tokens=carry["tokens"], q=carry.get("q"))
