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
  """p drafts of k tokens that share their first token, as one token tree.

  Every draft starts with head 1's argmax, so the drafts form a tree of
  T = 1 + p (k - 1) nodes: node 0 is the shared first token, and draft c
  continues with the chain of nodes 1 + c (k-1) .. c (k-1) + k - 1 hanging
  off it. Example, p = 2, k = 3:

      node     0   1   2   3   4
      parent  -1   0   1   0   3      draft 0 = nodes (0, 1, 2)
      depth    0   1   2   1   2      draft 1 = nodes (0, 3, 4)

  Static (NumPy and tuples): it shapes the attention mask of a tree call.
  """

  def __init__(self, num_drafts: int, depth: int):
    if num_drafts < 1 or depth < 1:
      raise ValueError(f"DraftTree needs num_drafts={num_drafts} >= 1 and "
                       f"depth={depth} >= 1.")
    self.num_drafts, self.depth = num_drafts, depth
    chain = np.arange(1, depth)  # depths 1..k-1
    nodes = 1 + np.arange(num_drafts)[:, None] * (depth - 1) + (chain - 1)
    # paths[c, j] is the node of draft c at depth j.
    self.paths = np.concatenate(
        [np.zeros((num_drafts, 1), np.int64), nodes], axis=1)  # [p, k]
    size = 1 + num_drafts * (depth - 1)
    parents = np.full(size, -1, np.int64)
    depths = np.zeros(size, np.int64)
    for c in range(num_drafts):
      parents[self.paths[c, 1:]] = self.paths[c, :-1]
      depths[self.paths[c]] = np.arange(depth)
    self.parents = tuple(int(x) for x in parents)
    self.depths = depths

  @property
  def size(self) -> int:
    """T, the number of nodes."""
    return len(self.parents)

  def flatten(self, drafts: jax.Array) -> jax.Array:
    """drafts [..., p, k] -> node tokens [..., T] (draft 0's first token at 0)."""
    lead = drafts.shape[:-2]
    rest = drafts[..., 1:].reshape(lead + (self.num_drafts * (self.depth - 1),))
    return jnp.concatenate([drafts[..., 0, :1], rest], axis=-1)
