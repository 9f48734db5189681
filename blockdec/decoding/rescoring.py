"""Rescoring the top-K lattice into p drafts (Kim et al. 2024, sec. 4).

A path through the lattice picks one candidate per depth. Its score is

  sum_j  log p_head_j(t_j)  +  lambda_ngram  * log P_ngram(t_j | history, t_<j)
                            +  lambda_neural * log P_small(t_j | history, t_<j)

Global rescoring (the n-gram term) and local rescoring (a small neural LM
read left to right) are both terms of this one score, found by beam search
left to right over the depths: at depth j every beam is extended by the K
candidates and the W best extensions are kept. The p <= W best final beams
are the drafts; draft 0 is the best. With no rescoring terms and W = 1 this
is the plain blockwise draft (each head's argmax); with W >= p and no
rescoring terms the depths are independent and beam search returns the exact
p best paths. With an n-gram term it is exact once W >= K^(k-2) (every
prefix kept), and a good approximation below that.

The scorers are functions `scorer(j, beams, carry) -> (scores, carry)`:
`j` the depth (traced int32 in [1, k)), `beams` [B, W, k] int32 tokens with
depths < j filled in, `scores` [B, W, K] the extra score of each lattice
candidate at depth j after each beam, `carry` any pytree the scorer threads
through (the small LM's cache).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from blockdec.decoding.lattice import DraftTree, Lattice
from blockdec.decoding.ngram import NGramLM
from blockdec.kernels.masks import TreeMask

PathScorer = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def beam_search(lattice: Lattice, num_drafts: int, beam_width: int,
                scorer: PathScorer | None = None, carry: Any = None):
  """The `num_drafts` best paths through `lattice` by beam search.

  Args:
    lattice: tokens and head log-probs [B, k, K]; depth 0 has one candidate.
    num_drafts: p >= 1, drafts returned.
    beam_width: W >= p, beams kept per depth.
    scorer: extra path scores (see module docstring), or None.
    carry: the scorer's initial carry.

  Returns:
    (drafts [B, p, k] int32 best first, scores [B, p] float32, carry). If the
    lattice has fewer than p paths, the missing drafts repeat draft 0 (with
    score -inf): duplicates cost verification work but never correctness.
  """
  if not 1 <= num_drafts <= beam_width:
    raise ValueError(f"need 1 <= num_drafts={num_drafts} <= "
                     f"beam_width={beam_width}.")
  batch, k, width = lattice.tokens.shape
  beams = jnp.zeros((batch, beam_width, k), jnp.int32)
  beams = beams.at[:, :, 0].set(lattice.tokens[:, :1, 0])
  # Only beam 0 is alive at the start; the others join at depth 1.
  scores = jnp.where(jnp.arange(beam_width)[None, :] == 0,
                     lattice.log_probs[:, :1, 0], -jnp.inf)  # [B, W]
  scores = scores.astype(jnp.float32)

  def extend(j, state):
    beams, scores, carry = state
    tokens = jax.lax.dynamic_index_in_dim(lattice.tokens, j, 1,
                                          keepdims=False)  # [B, K]
    log_probs = jax.lax.dynamic_index_in_dim(lattice.log_probs, j, 1,
                                             keepdims=False)  # [B, K]
    cand = scores[:, :, None] + log_probs[:, None, :]  # [B, W, K]
    if scorer is not None:
      extra, carry = scorer(j, beams, carry)
      cand = cand + extra
    best, flat = jax.lax.top_k(cand.reshape(batch, beam_width * width),
                               beam_width)  # [B, W]
    parent, choice = flat // width, flat % width
    beams = jnp.take_along_axis(beams, parent[:, :, None], axis=1)
    new = jnp.take_along_axis(tokens, choice, axis=1)  # [B, W]
    beams = jax.lax.dynamic_update_index_in_dim(beams, new[:, :, None], j, 2)
    return beams, best, carry

  beams, scores, carry = jax.lax.fori_loop(1, k, extend,
                                           (beams, scores, carry))
  drafts, scores = beams[:, :num_drafts], scores[:, :num_drafts]
  drafts = jnp.where(jnp.isneginf(scores)[:, :, None], drafts[:, :1], drafts)
  return drafts, scores, carry


def combine_scorers(*scorers: PathScorer) -> PathScorer:
  """Sum of several scorers; the carry is the tuple of their carries."""

  def scorer(j, beams, carry):
    total, out = 0.0, []
    for fn, c in zip(scorers, carry):
      s, c = fn(j, beams, c)
      total, out = total + s, out + [c]
    return total, tuple(out)

  return scorer


def ngram_scorer(ngram: NGramLM, history: jax.Array, lattice: Lattice,
                 weight: float) -> PathScorer:
  """Global rescoring: weight * log P_ngram(candidate | history + beam).

  Args:
    ngram: the n-gram LM.
    history: [B, H] int32, the last H >= n-1 committed tokens (oldest
      first; -1 where the sequence is shorter).
    lattice: supplies the candidates.
    weight: lambda_ngram.

  The carry is passed through untouched.
  """
  n1 = ngram.context_len
  if history.shape[-1] < n1:
    raise ValueError(f"history holds {history.shape[-1]} tokens; the order-"
                     f"{ngram.order} n-gram LM needs {n1}.")
  history = history[:, history.shape[1] - n1:]  # [B, n-1]

  def scorer(j, beams, carry):
    if n1 == 0:
      context = beams[..., :0]
    else:
      seq = jnp.concatenate(
          [jnp.broadcast_to(history[:, None], beams.shape[:2] + (n1,)), beams],
          axis=-1)  # [B, W, n-1+k]; the n-1 tokens before depth j end at n1+j
      context = jax.lax.dynamic_slice_in_dim(seq, j, n1, axis=2)
    tokens = jax.lax.dynamic_index_in_dim(lattice.tokens, j, 1,
                                          keepdims=False)  # [B, K]
    tokens = jnp.broadcast_to(tokens[:, None], beams.shape[:2] + tokens.shape[1:])
    return weight * ngram.log_prob(context, tokens), carry

  return scorer


def _at_nodes(x: jax.Array, nodes: jax.Array) -> jax.Array:
  """x [B, T, ...] at block positions nodes [B, M] -> [B, M, ...]."""
  return jnp.take_along_axis(
      x, nodes.reshape(nodes.shape + (1,) * (x.ndim - 2)), axis=1)


def tree_call(score_fn, params, tokens, positions, cache, mask=None, *,
              prefill: bool = False, keep: jax.Array | None = None):
  """Runs `score_fn` on a block; returns (head_fn, cache).

  `head_fn(nodes [B, M], num_heads) -> logits [B, M, num_heads, V]` gives the
  heads at chosen block positions. A split scorer (one with `.trunk` and
  `.heads`, see `state.SplitScoreFn`) computes heads only there, and
  `head_fn.hidden(nodes) -> [B, M, d]` gives the trunk's final hidden states
  there (the features an EAGLE drafter reads); a plain one computes every
  head everywhere, `head_fn` slices and has no `hidden`. `mask` is forwarded
  as `mask=` (and only when set, so scorers that take no mask still serve
  causal calls): a block mask of `blockdec.kernels`, e.g.
  `TreeMask(tree.parents)` (static, see `DraftTree`) or `RuntimeTreeMask`
  (traced parents) makes the call a tree call: block position i holds a
  node at `positions[:, i]` that attends to the committed cache and its
  ancestors only. None is the ordinary causal block. `prefill=True` (a
  causal call on a cache that holds nothing committed, e.g. the prompts)
  uses the split scorer's `prefill` trunk where it has one. `keep` (with
  `prefill=True` only; [B, M] block positions): the call's outputs are
  wanted at those positions only, and `head_fn`'s nodes then index them
  (node m is block position keep[:, m]); a prefill trunk skips the work
  at the rest (`state.SplitScoreFn.prefill`).
  """
  kw = {} if mask is None else {"mask": mask}
  if keep is not None and (not prefill or mask is not None):
    raise ValueError("tree_call: keep= is for a causal prefill call "
                     "(prefill=True, mask=None).")
  if hasattr(score_fn, "trunk") and hasattr(score_fn, "heads"):
    trunk = score_fn.trunk
    prefill_trunk = getattr(score_fn, "prefill", None)
    if prefill and mask is None and prefill_trunk:
      trunk = prefill_trunk
    if keep is not None and prefill_trunk:
      hidden, cache = trunk(params, tokens, positions, cache, keep=keep)
    else:
      hidden, cache = trunk(params, tokens, positions, cache, **kw)
      if keep is not None:
        hidden = _at_nodes(hidden, keep)

    def hidden_at(nodes):
      return _at_nodes(hidden, nodes)

    def head_fn(nodes, num_heads):
      return score_fn.heads(params, hidden_at(nodes), num_heads)

    head_fn.hidden = hidden_at
  else:
    logits, cache = score_fn(params, tokens, positions, cache, **kw)
    if keep is not None:
      logits = _at_nodes(logits, keep)

    def head_fn(nodes, num_heads):
      return _at_nodes(logits, nodes)[:, :, :num_heads]
  return head_fn, cache


def neural_scorer(score_fn, params, offsets: jax.Array,
                  path_log_probs: jax.Array, lattice: Lattice, weight: float,
                  beam_width: int, parallel: bool = False) -> PathScorer:
  """Local rescoring: weight * log P_small(candidate | committed + beam).

  The small LM is a scoring callable like the main model's, with its own
  cache holding the committed tokens (slots < offsets); that cache is the
  carry. `path_log_probs[:, j]` is its distribution at depth j after the
  committed tokens and the lattice's argmax path up to depth j-1 (computed
  by the loop in the call that commits the accepted tokens).

  Autoregressive (default): depth 1 uses that table (its only prefix is the
  shared first token); each later depth j is one tree call of the small LM
  on all W beams at once (`DraftTree(W, k)`: the shared first token plus each
  beam's chain, T = 1 + W (k-1) nodes, positions offset + depth) whose head 1
  at each beam's depth j-1 node scores the depth-j candidates. Nodes past
  depth j-1 hold not-yet-chosen tokens that no earlier node sees.
  Parallel (`parallel=True`): every depth uses the table, i.e. the small LM
  conditions on the argmax prefix instead of each beam's own prefix; no
  extra small-LM calls at all (cheaper, approximate).

  Args:
    score_fn: the small LM's scoring callable (tree calls via `mask=`).
    params: its parameters.
    offsets: [B] position of depth 0 (the committed length).
    path_log_probs: [B, k, V] log P_small at each depth given the argmax path.
    lattice: supplies the candidates.
    weight: lambda_neural.
    beam_width: W, for the tree's shape.
    parallel: see above.
  """
  k = lattice.depth
  tree = DraftTree(beam_width, k)
  positions = offsets[:, None] + jnp.asarray(tree.depths, jnp.int32)  # [B, T]
  paths = jnp.asarray(tree.paths, jnp.int32)  # [W, k]

  def candidates(log_probs, j):  # [B, W, V] -> [B, W, K] at lattice depth j
    tokens = jax.lax.dynamic_index_in_dim(lattice.tokens, j, 1,
                                          keepdims=False)  # [B, K]
    tokens = jnp.broadcast_to(tokens[:, None], log_probs.shape[:2] + tokens.shape[1:])
    return jnp.take_along_axis(log_probs, tokens, axis=-1)

  def from_table(j, beams, cache):
    table = jax.lax.dynamic_index_in_dim(path_log_probs, j, 1,
                                         keepdims=False)  # [B, V]
    log_probs = jnp.broadcast_to(table[:, None], (beams.shape[0], beam_width,
                                                  table.shape[-1]))
    return weight * candidates(log_probs, j), cache

  def later(j, beams, cache):
    head_fn, cache = tree_call(score_fn, params, tree.flatten(beams), positions,
                               cache, mask=TreeMask(tree.parents))
    nodes = jnp.broadcast_to(
        jax.lax.dynamic_index_in_dim(paths, j - 1, 1, keepdims=False),
        (beams.shape[0], beam_width))  # [B, W]
    logits = head_fn(nodes, 1)[:, :, 0]  # [B, W, V]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return weight * candidates(log_probs, j), cache

  def scorer(j, beams, cache):
    if parallel:
      return from_table(j, beams, cache)
    return jax.lax.cond(j == 1, from_table, later, j, beams, cache)

  return scorer
