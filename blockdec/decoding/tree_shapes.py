"""Static token-tree shapes from measured acceptance (Sequoia-style).

A static tree drafter (`Blockwise(tree=...)`, `Eagle(tree=...)`) puts at a
node of rank r at depth j its r-th likeliest token for depth j. How good a
shape is depends on how often such a node holds the target's token. Sequoia
(Chen et al. 2024) models that with a positional acceptance vector; here it
is a matrix measured per depth and rank:

  acceptance[j - 1, r] = P(the target's token at depth j is the drafter's
                           rank-r candidate | the path to depth j - 1 was
                           accepted)

Under that model a node is reached with the product of its path's entries,
the expected tokens per call of a tree is 1 + the sum of those products over
its drafted nodes, and, because a child is never more likely to be reached
than its parent, the best tree of n nodes is found best-first: grow from the
root, always adding the most likely node not yet in the tree whose parent
and elder sibling are (`best_tree`). Sequoia's dynamic program solves the
same problem under a depth limit; best-first is exact for a node budget.

`measure_acceptance` estimates the matrix on real decoding with any static
tree drafter: probe trees (a rank-0 spine of the given depth with r younger
siblings at every level) for r = 0 .. width - 1, greedy decoding, and the
accepted-length histograms the decode returns; no drafter internals.

    acc = tree_shapes.measure_acceptance(
        lambda tree: blockdec.decode(params, cfg, prompts, lengths, 128,
                                     method=blockdec.Eagle(tree=tree)),
        depth=7, width=4)
    tree = tree_shapes.best_tree(acc, budget=24)
    out = blockdec.decode(..., method=blockdec.Eagle(tree=tree))
"""

from __future__ import annotations

import heapq
from typing import Callable

import numpy as np

from blockdec.decoding.lattice import DraftTree


def _check_acceptance(acceptance) -> np.ndarray:
  acc = np.asarray(acceptance, np.float64)
  if acc.ndim != 2 or acc.size == 0:
    raise ValueError(f"acceptance must be a [depth, width] matrix; got shape "
                     f"{acc.shape}.")
  if not np.all(np.isfinite(acc)) or acc.min() < 0 or acc.max() > 1:
    raise ValueError("acceptance entries must be probabilities in [0, 1]; "
                     f"got {acc.tolist()}.")
  return acc


def best_tree(acceptance, budget: int) -> DraftTree:
  """The tree of `budget` nodes (root included) with the most expected
  tokens per call under `acceptance` [depth, width] (see the module).

  Ties go to the shallower, lower-rank node. The tree is at most
  acceptance's depth deep and wide; a node's children are ranks 0, 1, ...
  in order (the ranks a drafter fills).
  """
  acc = _check_acceptance(acceptance)
  if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) \
      or budget < 2:
    raise ValueError(f"budget={budget!r} must be an int >= 2 (the root and "
                     "at least one draft).")
  depth, width = acc.shape
  parents, reach = [-1], [1.0]
  # Frontier: (-reach, depth, rank, order, parent node); order breaks ties.
  frontier, order = [(-acc[0, 0], 1, 0, 0, 0)], 1
  while len(parents) < budget and frontier:
    neg, d, r, _, parent = heapq.heappop(frontier)
    node = len(parents)
    parents.append(parent)
    reach.append(-neg)
    if r + 1 < width:  # The next younger sibling.
      heapq.heappush(frontier, (-reach[parent] * acc[d - 1, r + 1], d, r + 1,
                                order, parent))
      order += 1
    if d < depth:  # The eldest child.
      heapq.heappush(frontier, (-reach[node] * acc[d, 0], d + 1, 0, order,
                                node))
      order += 1
  return DraftTree.from_parents(parents)


def expected_tokens(tree: DraftTree, acceptance) -> float:
  """Tokens per call `tree` commits on average under `acceptance`: 1 (the
  decided token) + the probability of reaching each drafted node."""
  acc = _check_acceptance(acceptance)
  if tree.depth - 1 > acc.shape[0] or tree.width > acc.shape[1]:
    raise ValueError(f"tree {tree!r} (depth {tree.depth - 1}, width "
                     f"{tree.width}) exceeds acceptance's {acc.shape}.")
  reach = np.ones(tree.size)
  for i, p in enumerate(tree.parents):
    if p >= 0:
      reach[i] = reach[p] * acc[tree.depths[i] - 1, tree.ranks[i]]
  return float(reach.sum())


def probe_tree(depth: int, siblings: int) -> DraftTree:
  """A rank-0 spine of `depth` drafts with `siblings` younger siblings
  (ranks 1..siblings, leaves) beside every spine node."""
  if depth < 1 or siblings < 0:
    raise ValueError(f"probe_tree needs depth={depth} >= 1 and "
                     f"siblings={siblings} >= 0.")
  parents, spine = [-1], 0
  for _ in range(depth):
    parents.append(spine)
    node = len(parents) - 1
    parents.extend([spine] * siblings)
    spine = node
  return DraftTree.from_parents(parents)


def acceptance_from_histograms(hists) -> np.ndarray:
  """acceptance [D, R] from the accepted-length histograms of greedy decodes
  with `probe_tree(D, r)`, r = 0 .. R - 1 (each [D + 1] call counts: entry a
  counts calls that accepted a drafts).

  With siblings r the call accepts >= j drafts iff the spine held the
  target's tokens at depths 1..j-1 and depth j's token is among ranks
  0..r: P_r(a >= j) = S_{j-1} H_j(r), S the spine's (r = 0) survival; so
  acceptance[j - 1, r] = (P_r(a >= j) - P_{r-1}(a >= j)) / S_{j-1}. Depths
  the spine never reached get zero acceptance.
  """
  hists = [np.asarray(h, np.float64) for h in hists]
  if not hists or any(h.ndim != 1 or h.shape != hists[0].shape for h in hists):
    raise ValueError("hists must be equal-length 1-d call counts, one per "
                     "probe width.")
  depth = hists[0].shape[0] - 1
  survive = []
  for h in hists:
    if h.sum() <= 0:
      raise ValueError("a probe decode made no calls; decode more tokens.")
    tail = np.cumsum(h[::-1])[::-1] / h.sum()  # tail[a] = P(accepted >= a)
    survive.append(tail[1:])  # [D]: P(accepted >= j), j = 1..D
  survive = np.stack(survive)  # [R, D]
  spine = np.concatenate([[1.0], survive[0][:-1]])  # S_{j-1}
  reached = spine > 0
  h = np.where(reached, survive / np.where(reached, spine, 1.0), 0.0)
  h = np.clip(np.maximum.accumulate(h, axis=0), 0.0, 1.0)  # monotone in r
  acc = np.diff(np.concatenate([np.zeros((1, depth)), h]), axis=0)  # [R, D]
  return acc.T


def measure_acceptance(decode: Callable[[DraftTree], object], depth: int,
                       width: int, progress: bool = False) -> np.ndarray:
  """Measures acceptance [depth, width] with greedy probe decodes.

  Args:
    decode: tree -> a `DecodeOutput` of greedy decoding with a static-tree
      drafter on that tree (e.g. `Blockwise(tree=tree)` or
      `Eagle(tree=tree)`), the same prompts every time.
    depth: D, the deepest draft level to measure (block_size - 1).
    width: R, ranks per level.
    progress: show a tqdm bar over the R decodes.
  """
  if depth < 1 or width < 1:
    raise ValueError(f"measure_acceptance needs depth={depth} >= 1 and "
                     f"width={width} >= 1.")
  ranks = range(width)
  if progress:
    import tqdm
    ranks = tqdm.tqdm(ranks, desc="probe trees", unit="tree")
  hists = [np.asarray(decode(probe_tree(depth, r)).accepted_hist).sum(0)
           for r in ranks]
  return acceptance_from_histograms(hists)


__all__ = ["acceptance_from_histograms", "best_tree", "expected_tokens",
           "measure_acceptance", "probe_tree"]
