"""Attention masks for a block of T queries written into a KV cache.

A block attention call has a *static* part and a *dynamic* part:

* static: how the T queries of the block see each other, a boolean
  ``pattern[t, u]`` of shape ``[T, T]`` ("query t sees block key u"). It is a
  property of the decoding algorithm (causal verification, tree verification,
  block diffusion), so it is a hashable object that can be a static argument of
  ``jax.jit`` and is evaluated with NumPy outside the trace;
* dynamic: where the block sits in each row's cache, ``offsets[B]`` (int32),
  i.e. the number of committed tokens of row ``b``. It is runtime data.

The kernel combines them. Key position ``s`` is visible to query ``t`` of
row ``b`` iff::

    s < offsets[b]                                   # committed prefix
    or (offsets[b] <= s < offsets[b] + T and pattern[t, s - offsets[b]])

Keys at or after ``offsets[b] + T`` (stale or empty cache slots) are never
visible. Worked example, ``CausalBlockMask(3)`` with ``offsets = [2]`` and a
cache of length 6 (rows: queries at positions 2, 3, 4; columns: keys 0..5)::

    1 1 1 0 0 0
    1 1 1 1 0 0
    1 1 1 1 1 0

Masks combine with ``&`` and ``|`` (element-wise on the pattern)::

    m = CausalBlockMask(4) | BlockBidirectionalMask(4, sub_block_len=2)
    hash(m); m == CausalBlockMask(4) | BlockBidirectionalMask(4, 2)  # True

Two masks are not static (``RuntimeMask``): ``RuntimeTreeMask(parents)`` is
a token tree whose ``parents`` is a (possibly traced) int32 array, for trees
built inside a jitted loop (dynamic draft trees), and
``RuntimePatternMask(pattern)`` is a (possibly traced, possibly per-row)
boolean pattern, for blocks whose pattern depends on decoding state (block
diffusion's sub-block cache). They are pytrees, passed to ``jax.jit`` as
ordinary arguments; their patterns are ``jnp`` arrays of the trace.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BlockMask",
    "CausalBlockMask",
    "TreeMask",
    "BlockBidirectionalMask",
    "PatternMask",
    "DiffusionTrainingMask",
    "RuntimeMask",
    "RuntimeTreeMask",
    "RuntimePatternMask",
    "AndMask",
    "OrMask",
    "materialize_mask",
]


class BlockMask:
  """Base class: a static ``[T, T]`` visibility pattern inside the block.

  Subclasses are frozen dataclasses (hence hashable, compared by value) and
  implement ``block_len`` and ``pattern()``.
  """

  block_len: int  # T; a dataclass field or a property in subclasses

  def pattern(self) -> np.ndarray:
    """Boolean ``[T, T]`` NumPy array: ``pattern[t, u]`` = query t sees key u."""
    raise NotImplementedError

  @property
  def shape(self) -> tuple[int, int]:
    return (self.block_len, self.block_len)

  @property
  def slots_are_positions(self) -> bool:
    """Whether block token i sits at position ``offset + i``, its slot.

    True for masks over consecutive positions (causal block, block
    diffusion): a cache write by position lands in the block's slots. False
    otherwise, e.g. for a tree, whose node i sits at position
    ``offset + depth(i)`` but in slot ``offset + i``; a caller then writes
    the block at slots ``offset + 0 .. T-1``. The base class says False (the
    rule that holds for every mask).
    """
    return False

  def __and__(self, other: BlockMask) -> BlockMask:
    _check_combinable(self, other, "&")
    return AndMask(self, other)

  def __or__(self, other: BlockMask) -> BlockMask:
    _check_combinable(self, other, "|")
    return OrMask(self, other)

  def materialize(self, offsets, seq_len: int) -> np.ndarray:
    """Full ``[B, T, S]`` boolean mask for concrete offsets (NumPy).

    For tests, benchmarks and debugging; kernels never build this array.
    """
    return materialize_mask(self.pattern(), offsets, seq_len)


def _check_combinable(a: BlockMask, b: BlockMask, op: str) -> None:
  if not isinstance(b, BlockMask):
    raise TypeError(f"Cannot combine a mask with {type(b).__name__} using {op};"
                    " both operands must be BlockMask objects.")
  if a.block_len != b.block_len:
    raise ValueError(f"Masks of different block lengths cannot be combined "
                     f"with {op}: {a.block_len=} vs {b.block_len=}.")


def _check_block_len(block_len) -> None:
  if (isinstance(block_len, bool)
      or not isinstance(block_len, (int, np.integer)) or block_len < 1):
    raise ValueError(f"{block_len=} must be a positive int.")


@dataclasses.dataclass(frozen=True)
class CausalBlockMask(BlockMask):
  """Blockwise verification: query t sees block keys 0..t (lower triangle).

  With the prefix rule this is ordinary causal attention over the valid
  cache: the query at position ``offset + t`` sees every position ``<=`` its
  own.
  """

  block_len: int

  def __post_init__(self):
    _check_block_len(self.block_len)

  @property
  def slots_are_positions(self) -> bool:
    return True

  def pattern(self) -> np.ndarray:
    return np.tri(self.block_len, dtype=bool)


@dataclasses.dataclass(frozen=True)
class TreeMask(BlockMask):
  """Tree verification (Medusa-style): node i sees its ancestors and itself.

  ``parents[i]`` is the block index of node i's parent, ``-1`` for a root
  (a child of the last committed token). Parents come before children:
  ``-1 <= parents[i] < i``. A chain ``(-1, 0, 1, ..., T-2)`` equals the causal
  pattern. Example: ``TreeMask((-1, 0, 0, 1))`` is a root with two children
  (nodes 1 and 2) and a grandchild 3 under node 1; node 3 sees nodes 0, 1, 3.
  """

  parents: tuple[int, ...]

  def __init__(self, parents: Sequence[int]):
    parents = tuple(int(p) for p in parents)
    if not parents:
      raise ValueError("TreeMask needs at least one node; got parents=().")
    for i, p in enumerate(parents):
      if not -1 <= p < i:
        raise ValueError(
            f"parents[{i}]={p} is invalid: each parent must precede its child "
            f"(-1 <= parents[i] < i, -1 for a root); got {parents=}.")
    object.__setattr__(self, "parents", parents)

  @property
  def block_len(self) -> int:
    return len(self.parents)

  def pattern(self) -> np.ndarray:
    n = self.block_len
    out = np.eye(n, dtype=bool)
    for i, p in enumerate(self.parents):
      if p >= 0:
        out[i] |= out[p]  # parents precede children: row p is final already
    return out


@dataclasses.dataclass(frozen=True)
class BlockBidirectionalMask(BlockMask):
  """Block diffusion: full attention inside (sub-)blocks, causal across them.

  The T queries are split into consecutive sub-blocks of ``sub_block_len``
  (default: the whole block); a query sees every key of its own sub-block and
  of earlier ones, and (prefix rule) the whole committed cache. With
  ``sub_block_len=1`` this is the causal pattern.
  """

  block_len: int
  sub_block_len: int | None = None

  def __post_init__(self):
    _check_block_len(self.block_len)
    sub = self.sub_block_len
    if sub is None:
      object.__setattr__(self, "sub_block_len", self.block_len)
    elif not isinstance(sub, (int, np.integer)) or sub < 1:
      raise ValueError(f"sub_block_len={sub!r} must be a positive int or None.")

  @property
  def slots_are_positions(self) -> bool:
    return True

  def pattern(self) -> np.ndarray:
    ids = np.arange(self.block_len) // self.sub_block_len
    return ids[None, :] <= ids[:, None]


@dataclasses.dataclass(frozen=True)
class PatternMask(BlockMask):
  """An explicit pattern, stored as a tuple of row tuples to stay hashable."""

  rows: tuple[tuple[bool, ...], ...]

  def __init__(self, pattern):
    arr = np.asarray(pattern, dtype=bool)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
      raise ValueError(f"pattern must be a non-empty square [T, T] array; got "
                       f"shape {arr.shape}.")
    object.__setattr__(self, "rows",
                       tuple(tuple(bool(x) for x in r) for r in arr))

  @property
  def block_len(self) -> int:
    return len(self.rows)

  def pattern(self) -> np.ndarray:
    return np.array(self.rows, dtype=bool)


@dataclasses.dataclass(frozen=True)
class DiffusionTrainingMask(BlockMask):
  """Block-diffusion training on a clean stream and noisy copies of it.

  The model sees ``1 + noisy_streams`` streams of ``length`` tokens side by
  side (the block is ``(1 + noisy_streams) * length`` long, stream s at
  block indices ``s * length + p`` for p = 0 .. length - 1, every stream at
  positions 0 .. length - 1):

  * stream 0, the clean text, is causal (the autoregressive loss);
  * a noisy stream is cut into blocks of ``block_size`` positions; a query
    in block i sees the clean stream before the block (positions
    ``< i * block_size``) and its own noisy block, both ways.

  That is what a decoding call with ``BlockBidirectionalMask(block_size)``
  sees: the committed (causal) cache before the block and the block itself.
  Used without a KV cache (training); ``length=4, block_size=2`` and one
  noisy stream give (rows: queries c0..c3 n0..n3)::

      1 0 0 0  0 0 0 0
      1 1 0 0  0 0 0 0
      1 1 1 0  0 0 0 0
      1 1 1 1  0 0 0 0
      0 0 0 0  1 1 0 0
      0 0 0 0  1 1 0 0
      1 1 0 0  0 0 1 1
      1 1 0 0  0 0 1 1
  """

  length: int
  block_size: int
  noisy_streams: int = 2

  def __post_init__(self):
    _check_block_len(self.length)
    _check_block_len(self.block_size)
    _check_block_len(self.noisy_streams)

  @property
  def block_len(self) -> int:
    return (1 + self.noisy_streams) * self.length

  def pattern(self) -> np.ndarray:
    n, p = self.length, np.arange(self.length)
    out = np.zeros((self.block_len, self.block_len), dtype=bool)
    out[:n, :n] = p[None, :] <= p[:, None]
    blocks = p // self.block_size
    sees_clean = p[None, :] < (blocks * self.block_size)[:, None]
    same_block = blocks[None, :] == blocks[:, None]
    for s in range(1, 1 + self.noisy_streams):
      rows = slice(s * n, (s + 1) * n)
      out[rows, :n] = sees_clean
      out[rows, rows] = same_block
    return out


@dataclasses.dataclass(frozen=True)
class _CombinedMask(BlockMask):
  """Two masks of one block combined element-wise (`combine`)."""
  left: BlockMask
  right: BlockMask

  @staticmethod
  def combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  @property
  def block_len(self) -> int:
    return self.left.block_len

  @property
  def slots_are_positions(self) -> bool:
    return self.left.slots_are_positions and self.right.slots_are_positions

  def pattern(self) -> np.ndarray:
    return self.combine(self.left.pattern(), self.right.pattern())


@dataclasses.dataclass(frozen=True)
class AndMask(_CombinedMask):
  combine = staticmethod(np.logical_and)


@dataclasses.dataclass(frozen=True)
class OrMask(_CombinedMask):
  combine = staticmethod(np.logical_or)


class RuntimeMask:
  """A block mask whose pattern is runtime data (``[T, T]`` or ``[B, T, T]``).

  A pytree with one leaf (the attribute ``_LEAF``, shared by every row at
  rank ``_SHARED_NDIM`` or per row with a leading B dim); ``block_len`` (T,
  the leaf's last dim) and ``slots_are_positions`` are static. Not a
  ``BlockMask``: no hashing, no ``&`` / ``|``. Subclasses set the class
  attributes, validate in ``__init__``, define ``pattern()`` and register
  with ``jax.tree_util.register_pytree_node_class``.
  """

  _LEAF: str          # attribute holding the leaf
  _NAME: str          # the leaf as messages and repr name it
  _SHARED_NDIM: int   # rank of a leaf shared by every row
  _SHAPES: str        # "[T] or [B, T]"-style text for messages

  # Data, never a static argument: unhashable, so `jax.jit` refuses it in
  # `static_argnames` instead of retracing for every new object.
  __hash__ = None

  @property
  def leaf(self) -> jax.Array:
    return getattr(self, self._LEAF)

  @property
  def block_len(self) -> int:
    return self.leaf.shape[-1]

  @property
  def batched(self) -> bool:
    """True when the pattern is per row (the leaf has a leading B dim)."""
    return self.leaf.ndim == self._SHARED_NDIM + 1

  def check_batch(self, batch: int) -> None:
    """Raises unless the leaf is shared or has a leading dim of `batch`."""
    shape = self.leaf.shape
    if (len(shape) not in (self._SHARED_NDIM, self._SHARED_NDIM + 1)
        or (self.batched and shape[0] != batch)):
      raise ValueError(f"{type(self).__name__} {self._NAME} must be "
                       f"{self._SHAPES} with B={batch}, T={self.block_len}; "
                       f"got shape {shape}.")

  def pattern(self) -> jax.Array:
    raise NotImplementedError

  def tree_flatten(self):
    return (self.leaf,), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    obj = object.__new__(cls)  # Leaves may be tracers or placeholders.
    setattr(obj, cls._LEAF, children[0])
    return obj

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self._NAME}={self.leaf!r})"


@jax.tree_util.register_pytree_node_class
class RuntimeTreeMask(RuntimeMask):
  """A token tree whose parents are runtime data (e.g. grown inside jit).

  ``TreeMask`` with ``parents`` an int32 array instead of a static tuple:
  ``[T]`` (one tree for every row) or ``[B, T]`` (a tree per row), same
  convention (``-1`` for a root, ``-1 <= parents[..., i] < i``). Use it when
  the tree's shape is only known at run time, e.g. a dynamic draft tree
  chosen by the drafter's scores; with a tree fixed at trace time prefer
  ``TreeMask``, whose pattern is a compile-time constant.

  It is a pytree whose one leaf is ``parents``, so it travels through
  ``jax.jit``, ``lax.cond`` and loops as an ordinary (traced) argument and
  is never a static one; ``block_len`` (T, the last dim) is static. It is
  not a ``BlockMask``: ``pattern()`` is a ``jnp`` array computed in the
  trace, and it does not combine with ``&`` / ``|``.

  Parents are validated when concrete (NumPy, lists, non-traced arrays);
  traced parents cannot be checked, and parents that break the rule give
  the ancestor closure of whatever graph they describe. Example::

      RuntimeTreeMask(jnp.array([[-1, 0, 0, 1],   # row 0: two children of 0
                                 [-1, 0, 1, 2]])) # row 1: a chain (causal)
  """

  parents: jax.Array  # [T] or [B, T] int32
  _LEAF = _NAME = "parents"
  _SHARED_NDIM, _SHAPES = 1, "[T] or [B, T]"

  def __init__(self, parents):
    if not isinstance(parents, jax.core.Tracer):
      _check_runtime_parents(np.asarray(parents))
    self.parents = jnp.asarray(parents, jnp.int32)

  @property
  def slots_are_positions(self) -> bool:
    return False

  def pattern(self) -> jax.Array:
    """Bool ``[T, T]`` or ``[B, T, T]`` (as ``parents``): node i sees node j.

    The ancestor closure, computed with ``jnp`` from the runtime parents:
    ``reach`` starts as "itself or its parent" (paths of length <= 1) and
    each boolean matrix squaring doubles the path length it covers, so
    ``ceil(log2(T - 1))`` squarings reach every ancestor (depth <= T - 1).
    The products are of 0/1 values summed in float32, exact at any matmul
    precision.
    """
    t = self.block_len
    nodes = jnp.arange(t, dtype=jnp.int32)
    reach = ((self.parents[..., :, None] == nodes)
             | (nodes[:, None] == nodes))                    # [..., T, T]
    for _ in range(max(t - 2, 0).bit_length()):
      r = reach.astype(jnp.float32)
      reach = jnp.einsum("...ij,...jk->...ik", r, r) > 0.5
    return reach


@jax.tree_util.register_pytree_node_class
class RuntimePatternMask(RuntimeMask):
  """A pattern that is runtime data: ``[T, T]`` or ``[B, T, T]`` bool.

  ``pattern[..., t, u]``: query t sees block key u, as for a static mask,
  with the block at slots ``offset + 0 .. T-1`` (slots are positions). Use
  it when the pattern depends on decoding state, e.g. per row; a pattern
  fixed at trace time is a ``PatternMask``. Every query must see at least
  itself. Example (row 0 causal, row 1 both ways)::

      RuntimePatternMask(jnp.stack([jnp.tri(3, dtype=bool),
                                    jnp.ones((3, 3), bool)]))
  """

  pattern_array: jax.Array  # [T, T] or [B, T, T] bool
  _LEAF, _NAME = "pattern_array", "pattern"
  _SHARED_NDIM, _SHAPES = 2, "[T, T] or [B, T, T]"

  def __init__(self, pattern):
    if not isinstance(pattern, jax.core.Tracer):
      arr = np.asarray(pattern)
      if (arr.ndim not in (2, 3) or arr.shape[-1] != arr.shape[-2]
          or arr.shape[-1] == 0):
        raise ValueError(f"RuntimePatternMask pattern must be [T, T] or "
                         f"[B, T, T] with T >= 1; got shape {arr.shape}.")
      if arr.dtype != bool:
        raise ValueError(f"RuntimePatternMask pattern must be bool; got "
                         f"{arr.dtype}.")
    self.pattern_array = jnp.asarray(pattern, bool)

  @property
  def slots_are_positions(self) -> bool:
    return True

  def pattern(self) -> jax.Array:
    return self.pattern_array


def _check_runtime_parents(parents: np.ndarray) -> None:
  if parents.ndim not in (1, 2) or parents.shape[-1] == 0:
    raise ValueError(f"RuntimeTreeMask parents must be [T] or [B, T] with "
                     f"T >= 1; got shape {parents.shape}.")
  if not np.issubdtype(parents.dtype, np.integer):
    raise ValueError(f"RuntimeTreeMask parents must be integers; got "
                     f"{parents.dtype}.")
  nodes = np.arange(parents.shape[-1])
  bad = np.argwhere((parents < -1) | (parents >= nodes))
  if bad.size:
    where = tuple(int(x) for x in bad[0])
    raise ValueError(
        f"parents[{', '.join(map(str, where))}]={int(parents[where])} is "
        f"invalid: each parent must precede its child (-1 <= parents[..., i] "
        f"< i, -1 for a root); got parents={parents.tolist()}.")


def materialize_mask(pattern: np.ndarray, offsets, seq_len: int) -> np.ndarray:
  """NumPy ``[B, T, S]`` mask from a ``[T, T]`` pattern and ``offsets[B]``.

  Applies the rule in the module docstring; block keys that fall at or past
  ``seq_len`` do not exist and are dropped.
  """
  pattern = np.asarray(pattern, dtype=bool)
  offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
  t_len = pattern.shape[0]
  s = np.arange(seq_len)[None, None, :]             # [1, 1, S]
  off = offsets[:, None, None]                       # [B, 1, 1]
  rel = s - off                                      # [B, 1, S]
  in_block = (rel >= 0) & (rel < t_len)
  pat = pattern[np.arange(t_len)[None, :, None], np.clip(rel, 0, t_len - 1)]
  return (s < off) | (in_block & pat)                # [B, T, S]
