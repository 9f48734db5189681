"""The top-K lattice of a block draft (Kim et al. 2024, sec. 3).

After a verification call, the heads' logits at the last accepted position
predict the next block: head 1 the token at depth 0, head j+1 the token at
depth j. Plain blockwise decoding takes each head's argmax independently. The
lattice keeps each head's K most likely tokens instead, so that a rescorer can
pick a better path through them:

  depth      0        1        2        3          (k = 4 heads, K = 3)
  tokens   [ a ]    [ b c d ] [ e f g ] [ h i j ]
  log p     head 1   head 2    head 3    head 4

Depth 0 is head 1's argmax, which exact verification always accepts, so it
is never rescored: the lattice keeps only that one token there (its other K-1
entries repeat it with log-probability -inf and are never chosen).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Lattice:
  """The heads' top-K tokens at each depth of the next block.

  Attributes:
    tokens: [B, k, K] int32; tokens[:, 0, 0] is head 1's argmax.
    log_probs: [B, k, K] float32 head log-probabilities, sorted descending
      along K; -inf for the unused entries at depth 0.
  """

  tokens: jax.Array
  log_probs: jax.Array

  @property
  def depth(self) -> int:
    """k, the number of tokens a path through the lattice has."""
    return self.tokens.shape[1]

  @property
  def width(self) -> int:
    """K, the candidates per depth."""
    return self.tokens.shape[2]

  def argmax_path(self) -> jax.Array:
    """[B, k] the plain blockwise draft: each head's most likely token."""
    return self.tokens[:, :, 0]


def small_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k` for small k: k rounds of max, each masking its pick.

  Same values, indices and tie order (lower index first). Inside the
  decoding loop XLA:CPU lowered `top_k` over the vocabulary to a full sort
  of every row, and `argmax` to a slow (value, index) reduction; a round
  here is two plain reductions (the max, then the lowest index holding it).
  """
  iota = jnp.arange(x.shape[-1], dtype=jnp.int32)
  values, indices = [], []
  for _ in range(k):
    top = jnp.max(x, axis=-1, keepdims=True)
    i = jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)
    values.append(top[..., 0])
    indices.append(i)
    x = jnp.where(iota == i[..., None], -jnp.inf, x)
  return jnp.stack(values, -1), jnp.stack(indices, -1)


def top_k_lattice(head_logits: jax.Array, width: int) -> Lattice:
  """Lattice of the K = `width` most likely tokens of each head.

  Args:
    head_logits: [B, k, V] logits of heads 1..k at one position.
    width: K in [1, V].

  Returns:
    `Lattice` with tokens and log-probabilities [B, k, K].
  """
  vocab = head_logits.shape[-1]
  if not 1 <= width <= vocab:
    raise ValueError(f"lattice width={width} must be in [1, V={vocab}].")
  log_probs = jax.nn.log_softmax(head_logits.astype(jnp.float32), axis=-1)
  top_lp, top_tok = small_top_k(log_probs, width)  # [B, k, K]
  # Depth 0 is fixed to head 1's argmax (the token blockwise decoding feeds,
  # with jnp.argmax's tie-breaking), the only candidate there.
  first = jnp.arange(width) == 0
  top_lp = top_lp.at[:, 0].set(jnp.where(first, top_lp[:, 0, :1], -jnp.inf))
  argmax = jnp.argmax(head_logits[:, 0], axis=-1).astype(top_tok.dtype)  # [B]
  top_tok = top_tok.at[:, 0].set(jnp.broadcast_to(argmax[:, None],
                                                  top_tok[:, 0].shape))
  return Lattice(tokens=top_tok.astype(jnp.int32), log_probs=top_lp)


class DraftTree:
  """A token tree of drafts, verified in one call, seen as root-to-leaf chains.

  Node 0 is the root (the decided token); every other node is a draft whose
  parent comes before it. Node i's `rank` is its index among its siblings:
  tree drafters put their rank-r likeliest token there (`ranked`). The
  verifier and the loop see the tree as its C leaves' paths ("chains"), each
  k = 1 + the tree's depth nodes long; a chain that ends above the deepest
  level is padded by repeating its leaf (`paths`) and its padded drafts are
  marked unreal (`real`), so they are never accepted.

  `DraftTree(p, k)` is the tree of p drafts of k tokens that share only
  their first token (Refined's and lookahead's drafts, EAGLE's sampled
  chains): T = 1 + p (k - 1) nodes, node 0 the shared first token and draft
  c the chain of nodes 1 + c (k-1) .. c (k-1) + k - 1. Example, p = 2,
  k = 3:

      node     0   1   2   3   4
      parent  -1   0   1   0   3      draft 0 = nodes (0, 1, 2)
      depth    0   1   2   1   2      draft 1 = nodes (0, 3, 4)

  `DraftTree.from_parents(parents)` is any tree (Medusa's and Sequoia's
  static trees, `tree_shapes.best_tree`). Example, parents (-1, 0, 0, 1):
  two children of the root (ranks 0 and 1), the first with a child; chains
  (0, 1, 3) and (0, 2, 2), the second's last entry padding. Chains follow
  the leaves depth first, children by rank: chain 0 is the rank-0 spine.

  Static (NumPy and tuples), hashable by its parents: it shapes the
  attention mask of a tree call.
  """

  def __init__(self, num_drafts: int, depth: int):
    if num_drafts < 1 or depth < 1:
      raise ValueError(f"DraftTree needs num_drafts={num_drafts} >= 1 and "
                       f"depth={depth} >= 1.")
    chain = np.arange(1, depth)  # depths 1..k-1
    nodes = 1 + np.arange(num_drafts)[:, None] * (depth - 1) + (chain - 1)
    # paths[c, j] is the node of draft c at depth j.
    paths = np.concatenate(
        [np.zeros((num_drafts, 1), np.int64), nodes], axis=1)  # [p, k]
    size = 1 + num_drafts * (depth - 1)
    parents = np.full(size, -1, np.int64)
    for c in range(num_drafts):
      parents[paths[c, 1:]] = paths[c, :-1]
    self._build(tuple(int(x) for x in parents), paths)

  @classmethod
  def from_parents(cls, parents) -> "DraftTree":
    """The tree with node i under node parents[i] (parents[0] = -1)."""
    parents = tuple(int(p) for p in parents)
    if not parents or parents[0] != -1:
      raise ValueError("a draft tree's node 0 is its root (parent -1); got "
                       f"parents={parents}.")
    for i, p in enumerate(parents[1:], 1):
      if not 0 <= p < i:
        raise ValueError(f"draft tree parents[{i}]={p} must be in [0, {i}): "
                         "one root, every parent before its child; got "
                         f"parents={parents}.")
    children = [[] for _ in parents]
    for i, p in enumerate(parents[1:], 1):
      children[p].append(i)
    k = int(_depths_and_ranks(parents)[0].max()) + 1
    # Leaves in depth-first order, children by rank: chain 0 is the spine
    # of rank-0 nodes.
    leaves, stack = [], [0]
    while stack:
      node = stack.pop()
      if not children[node]:
        leaves.append(node)
      stack.extend(reversed(children[node]))
    paths = np.zeros((len(leaves), k), np.int64)
    for c, leaf in enumerate(leaves):
      path = [leaf]
      while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
      path = path[::-1]
      paths[c] = path + [leaf] * (k - len(path))
    tree = cls.__new__(cls)
    tree._build(parents, paths)
    return tree

  def _build(self, parents: tuple[int, ...], paths: np.ndarray) -> None:
    self.parents, self.paths = parents, paths
    self.num_drafts, self.depth = paths.shape
    self.depths, self.ranks = depths, ranks = _depths_and_ranks(parents)
    # lengths[c]: nodes of chain c, root included (the rest is padding).
    self.lengths = depths[paths[:, -1]] + 1
    self.real = np.arange(1, self.depth)[None] < self.lengths[:, None]  # [C, D]
    self.chain_ranks = ranks[paths[:, 1:]]  # [C, D]
    # Each node's (chain, depth) in the chains: the first chain holding it.
    self._chain_of = np.array([int(np.argmax((paths == i).any(axis=1)))
                               for i in range(len(parents))])

  @property
  def size(self) -> int:
    """T, the number of nodes."""
    return len(self.parents)

  @property
  def width(self) -> int:
    """The most children any node has (the ranks a drafter must rank)."""
    return int(self.ranks.max()) + 1

  @property
  def padded(self) -> bool:
    """Some chain ends above the deepest level."""
    return not bool(self.real.all())

  @property
  def branches_at_root_only(self) -> bool:
    """Every non-root node has at most one child (chains share only the
    root): the shape multi-candidate rejection with q verifies."""
    counts = np.bincount(np.asarray(self.parents[1:], np.int64),
                         minlength=self.size)
    return bool((counts[1:] <= 1).all())

  def __eq__(self, other):
    return isinstance(other, DraftTree) and self.parents == other.parents

  def __hash__(self):
    return hash((DraftTree, self.parents))

  def __repr__(self):
    return f"DraftTree.from_parents({self.parents})"

  def flatten(self, drafts: jax.Array) -> jax.Array:
    """drafts [..., C, k] (root at index 0) -> node tokens [..., T]."""
    return drafts[..., self._chain_of, self.depths]


def _depths_and_ranks(parents) -> tuple[np.ndarray, np.ndarray]:
  """Each node's depth (root 0) and rank among its siblings, by index."""
  depths = np.zeros(len(parents), np.int64)
  ranks = np.zeros(len(parents), np.int64)
  seen = [0] * len(parents)
  for i, p in enumerate(parents):
    if p >= 0:
      depths[i] = depths[p] + 1
      ranks[i], seen[p] = seen[p], seen[p] + 1
  return depths, ranks


def ranked(logits: jax.Array, ranks, width: int | None = None) -> jax.Array:
  """The rank-r likeliest token at each place (ties to the lower token id).

  logits [..., *S, V] whose dims S broadcast against ranks' shape S ->
  tokens [..., *S] int32: place s gets logits' ranks[s]-th token. `ranks`
  are static ints, or a traced array when `width` (above every rank) is
  given.
  """
  if width is None:
    ranks = np.asarray(ranks, np.int32)
    width = int(ranks.max()) + 1
  _, top = small_top_k(logits, width)  # [..., *S', R]
  lead = top.shape[:top.ndim - 1 - ranks.ndim]
  top = jnp.broadcast_to(top, lead + ranks.shape + top.shape[-1:])
  index = jnp.broadcast_to(jnp.asarray(ranks, jnp.int32)[..., None],
                           top.shape[:-1] + (1,))
  return jnp.take_along_axis(top, index, axis=-1)[..., 0].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class DynamicTree:
  """A token tree each row's drafter grows anew every call (EAGLE-2).

  Static part only: `nodes` T (root included) and `top_k` K, the children
  a node is expanded with. Per call, starting from the root, the K most
  likely of the frontier's K x K children (by the product of the
  drafter's probabilities along their path) become the next frontier, for
  block_size - 1 levels; the T - 1 most likely of every node generated
  then form the tree (`grow_tree`). Each row gets its own shape: the
  verification call uses a runtime tree mask, and the drafts travel as a
  `RowTree`.

  Attributes:
    nodes: T >= 2, nodes verified per call.
    top_k: K >= 1, children per expanded node and nodes expanded per level.
  """

  nodes: int = 16
  top_k: int = 4

  def __post_init__(self):
    for name, low in (("nodes", 2), ("top_k", 1)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
          or value < low:
        raise ValueError(f"DynamicTree {name}={value!r} must be an int >= "
                         f"{low}.")
      object.__setattr__(self, name, int(value))

  @property
  def size(self) -> int:
    return self.nodes

  def chains(self) -> int:
    """C: one chain per drafted node (the path to it)."""
    return self.nodes - 1


@flax.struct.dataclass
class RowTree:
  """One call's per-row token trees (a `DynamicTree` drafter's drafts).

  Attributes:
    tokens: [B, T] node tokens (node 0 the root, filled by the loop).
    parents: [B, T] int32, -1 for the root, parents before children.
    depths: [B, T] int32 node depth (root 0).
    paths: [B, C, k] int32 chain c's node at each depth (chain c ends at
      node c + 1, then repeats it).
    real: [B, C, k - 1] bool drafts of chain c that are real nodes.
  """

  tokens: jax.Array
  parents: jax.Array
  depths: jax.Array
  paths: jax.Array
  real: jax.Array


def grow_tree(logits_fn, root: jax.Array, depth: int,
              spec: DynamicTree) -> RowTree:
  """Grows each row's tree EAGLE-2 style (see `DynamicTree`).

  Args:
    logits_fn: (level j in 1..depth, paths [B, K', j] int32: the tokens from
      the root to each of K' frontier nodes) -> the drafter's logits
      [B, K', V] for the token after each.
    root: [B] int32 the decided token.
    depth: D >= 1 levels.
    spec: T and K.

  Returns:
    `RowTree` with C = T - 1 chains of k = D + 1 nodes.
  """
  batch, k_top, keep = root.shape[0], spec.top_k, spec.nodes - 1
  # Level 1: the root's K likeliest children.
  log_q = jax.nn.log_softmax(logits_fn(1, root[:, None, None]).astype(
      jnp.float32), axis=-1)[:, 0]  # [B, V]
  value, token = small_top_k(log_q, k_top)  # [B, K]
  pool_value, pool_token = [value], [token]
  pool_parent = [jnp.full((batch, k_top), -1, jnp.int32)]
  pool_depth = [jnp.ones((batch, k_top), jnp.int32)]
  frontier = jnp.concatenate([jnp.broadcast_to(root[:, None, None],
                                               (batch, k_top, 1)),
                              token[..., None]], axis=2)  # [B, K, 2] paths
  frontier_index, frontier_value, size = (
      jnp.broadcast_to(jnp.arange(k_top, dtype=jnp.int32), (batch, k_top)),
      value, k_top)
  for level in range(2, depth + 1):
    log_q = jax.nn.log_softmax(logits_fn(level, frontier).astype(
        jnp.float32), axis=-1)  # [B, K, V]
    child_value, child_token = small_top_k(log_q, k_top)  # [B, K, K]
    child_value = (frontier_value[..., None] + child_value).reshape(batch, -1)
    child_token = child_token.reshape(batch, -1)
    child_parent = jnp.repeat(frontier_index, k_top, axis=1)  # [B, K K]
    pool_value.append(child_value)
    pool_token.append(child_token)
    pool_parent.append(child_parent)
    pool_depth.append(jnp.full_like(child_token, level))
    best_value, best = small_top_k(child_value, k_top)  # next frontier
    parent_slot = best // k_top  # which frontier node it hangs off
    frontier = jnp.concatenate(
        [jnp.take_along_axis(frontier, parent_slot[..., None], axis=1),
         jnp.take_along_axis(child_token, best, axis=1)[..., None]], axis=2)
    frontier_index, frontier_value = size + best, best_value
    size += k_top * k_top
  value = jnp.concatenate(pool_value, axis=1)  # [B, P], P = pool size
  # Keep the T - 1 likeliest. A child is never likelier than its parent
  # and ties go to the lower (earlier, shallower) index, so the kept set
  # holds every kept node's ancestors; sorting keeps parents first.
  _, kept = jax.lax.top_k(value, keep)
  kept = jnp.sort(kept, axis=1).astype(jnp.int32)  # [B, T - 1]
  take = lambda x: jnp.take_along_axis(jnp.concatenate(x, axis=1), kept,
                                       axis=1)
  tokens, parent_pool, depths = (take(pool_token), take(pool_parent),
                                 take(pool_depth))
  # Pool index -> node index (kept node i is node i + 1; the root is 0).
  node_of = jnp.zeros((batch, value.shape[1]), jnp.int32)
  node_of = node_of.at[jnp.arange(batch)[:, None], kept].set(
      jnp.arange(1, keep + 1, dtype=jnp.int32)[None])
  parents = jnp.where(parent_pool < 0, 0, jnp.take_along_axis(
      node_of, jnp.maximum(parent_pool, 0), axis=1))  # [B, T - 1]
  parents = jnp.concatenate([jnp.full((batch, 1), -1, jnp.int32), parents], 1)
  depths = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), depths], 1)
  tokens = jnp.concatenate([root[:, None], tokens], axis=1).astype(jnp.int32)
  # Chain c is the path to node c + 1: walk up from it, then read the
  # ancestors back from the root (entries past its depth repeat it).
  up = [jnp.broadcast_to(jnp.arange(1, keep + 1, dtype=jnp.int32),
                         (batch, keep))]
  safe_parents = jnp.maximum(parents, 0)
  for _ in range(depth):
    up.append(jnp.take_along_axis(safe_parents, up[-1], axis=1))
  up = jnp.stack(up, axis=2)  # [B, C, D + 1]: up[..., s] = s levels up
  own_depth = depths[:, 1:, None]  # [B, C, 1]
  j = jnp.arange(depth + 1, dtype=jnp.int32)
  steps = jnp.clip(own_depth - j, 0, depth)
  paths = jnp.take_along_axis(up, steps, axis=2)  # [B, C, D + 1]
  real = (j[1:] <= own_depth)  # [B, C, D]
  return RowTree(tokens=tokens, parents=parents, depths=depths, paths=paths,
                 real=real)


def chain_tokens(tree: RowTree) -> jax.Array:
  """[B, C, D] each chain's drafted tokens along its path (padding repeats
  the chain's last node)."""
  batch, chains, k = tree.paths.shape
  flat = tree.paths[:, :, 1:].reshape(batch, chains * (k - 1))
  return jnp.take_along_axis(tree.tokens, flat, axis=1).reshape(
      batch, chains, k - 1)
