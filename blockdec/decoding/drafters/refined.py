"""Refined block drafts (Kim et al. 2024) as a drafter: lattice rescoring and
multi-draft trees.

The heads' independent argmaxes make poor blocks; this drafter keeps each
head's top-K tokens (`lattice.top_k_lattice`) and searches the lattice for
the p best paths under head log-probs plus an n-gram LM's and a small LM's
log-probs (`rescoring.py`). With p = 1 the draft is one chain (a plain
causal block call). With p > 1 the drafts share their root (the token the
verifier chose), so they are verified in one call as a token tree of
T = 1 + p (k - 1) nodes (`lattice.DraftTree`): node i sits at position
offset + depth(i) in cache slot offset + i and sees the committed cache and
its ancestors; the verifier keeps the chain with the longest accepted
prefix (the better-ranked one on ties) and the core moves its keys and
values into place.

Every committed token is still decided by the verifier against head 1, so
with `Exact()` the output equals greedy decoding whatever the drafts; only
the number of calls changes. Drafts are deterministic: with sampling the
verifier matches them against the target's own draws (chain or tree).

Why a tree in one row and not p batch rows: the rows would each need a copy
of the whole prefix cache (p times the memory, and a copy per call), while
the tree shares the prefix and costs T extra cache slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from blockdec.decoding.core import Draft, Drafter, View
from blockdec.decoding.lattice import DraftTree, Lattice, top_k_lattice
from blockdec.decoding.ngram import NGramLM
from blockdec.decoding.rescoring import (beam_search, combine_scorers,
                                         neural_scorer, ngram_scorer,
                                         tree_call)


@dataclasses.dataclass(frozen=True)
class DraftOptions:
  """How drafts are made from the lattice (static, hashable).

  Attributes:
    num_drafts: p, drafts verified per call.
    lattice_width: K, candidates per head in the lattice.
    beam_width: W >= p beams of the lattice search; None means p.
    ngram_weight: lambda of the n-gram LM's log-probs (needs an n-gram LM).
    neural_weight: lambda of the small LM's log-probs (needs a rescorer).
    neural_parallel: False: the small LM reads each beam's own prefix (k-2
      extra small-LM calls per step); True: it reads the heads' argmax
      prefix, from the one call that commits the accepted tokens (no extra
      calls; see `rescoring.neural_scorer`).
  """

  num_drafts: int = 1
  lattice_width: int = 4
  beam_width: int | None = None
  ngram_weight: float = 0.0
  neural_weight: float = 0.0
  neural_parallel: bool = False

  def __post_init__(self):
    for name in ("num_drafts", "lattice_width"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int.")
    if self.beam_width is not None and (
        isinstance(self.beam_width, bool) or not isinstance(self.beam_width, int)
        or self.beam_width < self.num_drafts):
      raise ValueError(f"beam_width={self.beam_width!r} must be None or an int "
                       f">= num_drafts={self.num_drafts}.")

  @property
  def beams(self) -> int:
    """W, the beam width actually used."""
    return self.num_drafts if self.beam_width is None else self.beam_width

  def tree_size(self, block_size: int) -> int:
    """Cache slots one verification call writes: T = 1 + p (k - 1)."""
    return DraftTree(self.num_drafts, block_size).size

  def rescorer_slots(self, block_size: int) -> int:
    """Slots past the committed length that the small LM's calls write."""
    return max(2 * block_size, DraftTree(self.beams, block_size).size)


@flax.struct.dataclass
class NeuralRescorer:
  """A small LM that rescores the lattice left to right.

  Attributes:
    score_fn: its scoring callable (static); must accept `mask=` for tree
      calls, like the main model's.
    params: its parameters.
    cache: an empty cache for `score_fn` with room for P + N +
      `DraftOptions.rescorer_slots(k)` positions.
  """

  params: Any
  cache: Any
  score_fn: Callable = flax.struct.field(pytree_node=False)


def history_tokens(prompts, prompt_lengths, generated, lengths, size: int):
  """The last `size` committed tokens per row [B, size], -1 before the start.

  prompts [B, P]; generated [B, M] (valid up to lengths [B]).
  """
  committed = prompt_lengths + lengths  # [B]
  q = committed[:, None] - size + jnp.arange(size)  # [B, size] positions
  from_prompt = jnp.take_along_axis(
      prompts, jnp.clip(q, 0, prompts.shape[1] - 1), axis=1)
  from_gen = jnp.take_along_axis(
      generated, jnp.clip(q - prompt_lengths[:, None], 0, generated.shape[1] - 1),
      axis=1)
  tokens = jnp.where(q < prompt_lengths[:, None], from_prompt, from_gen)
  return jnp.where(q >= 0, tokens, -1).astype(jnp.int32)


class RefinedDrafter(Drafter):
  """p rescored lattice drafts of k tokens (root included) per call.

  Built inside the jitted decode (it holds the n-gram tables and the small
  LM's parameters, which are traced). Carry: drafts [B, p, k] int32 (column
  0 the root) and the small LM's cache (or None).
  """

  def __init__(self, block_size: int, drafts: DraftOptions,
               ngram: NGramLM | None = None,
               rescorer: NeuralRescorer | None = None):
    if drafts.ngram_weight and ngram is None:
      raise ValueError(f"ngram_weight={drafts.ngram_weight} needs an n-gram LM.")
    if drafts.neural_weight and rescorer is None:
      raise ValueError(f"neural_weight={drafts.neural_weight} needs a rescorer.")
    self.k, self.options = block_size, drafts
    self.ngram = ngram if drafts.ngram_weight else None
    self.rescorer = rescorer if drafts.neural_weight else None
    self._tree = (DraftTree(drafts.num_drafts, block_size)
                  if drafts.num_drafts > 1 else None)
    self.history_len = (max(self.ngram.context_len, 1)
                        if self.ngram is not None else 1)

  @property
  def num_drafts(self) -> int:
    return self.k - 1

  @property
  def tree(self):
    return self._tree

  def _lattice(self, view: View) -> tuple[Lattice, jax.Array]:
    """The heads' lattice after the last committed token, rooted at the
    token the verifier chose (head 1's argmax under greedy decoding), and
    the heads' logits [B, k, V]."""
    heads = view.heads(self.k)  # [B, k, V]
    lattice = top_k_lattice(heads, min(self.options.lattice_width,
                                       heads.shape[-1]))
    root = jnp.broadcast_to(view.next_token[:, None], lattice.tokens[:, 0].shape)
    return lattice.replace(tokens=lattice.tokens.at[:, 0].set(root)), heads

  def _carry(self, drafts, heads, rescorer_cache, view: View):
    carry = {"drafts": drafts, "rescorer_cache": rescorer_cache}
    if view.context.want_confidence:
      # The heads' probability of draft 0's tokens (adaptive length).
      log_p = jax.nn.log_softmax(heads[:, 1:].astype(jnp.float32), axis=-1)
      carry["confidence"] = jnp.exp(jnp.take_along_axis(
          log_p, drafts[:, 0, 1:, None], axis=-1)[..., 0])  # [B, k-1]
    return carry

  def _rescorer_commit(self, cache, committed, count, path, offsets):
    """One small-LM call: commits committed[:, :count] (at `offsets`) and
    reads its distributions along the next argmax path [B, k].

    Feeds [committed[:count], path, junk] (2k tokens, ragged count in [0, k])
    and returns (cache, log-probs [B, k, V]) where entry j is the
    distribution at depth j given the committed tokens and path[:j].
    """
    k, rescorer = self.k, self.rescorer
    i = jnp.arange(2 * k)
    path_idx = jnp.clip(i[None, :] - count[:, None], 0, k - 1)
    width = committed.shape[1]
    padded = jnp.pad(committed, ((0, 0), (0, 2 * k - width)))
    fed = jnp.where(i[None, :] < count[:, None], padded,
                    jnp.take_along_axis(path, path_idx, axis=1))  # [B, 2k]
    head_fn, cache = tree_call(rescorer.score_fn, rescorer.params, fed,
                               offsets[:, None] + i, cache)
    # Depth j's distribution follows path[j-1], fed at count + j - 1; depth
    # 0's (unused: it is not rescored) is read at the same slot as depth 1's.
    nodes = count[:, None] + jnp.maximum(jnp.arange(k) - 1, 0)  # [B, k]
    logits = head_fn(nodes, 1)[:, :, 0]  # [B, k, V]
    return cache, jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

  def _drafts(self, lattice, view: View, rescorer_cache, path_log_probs):
    """The lattice -> drafts [B, p, k] (and the small LM's cache)."""
    opts = self.options
    if self.ngram is None and self.rescorer is None and opts.beams == 1:
      return lattice.argmax_path()[:, None], rescorer_cache
    scorers, carry = [], []
    if self.ngram is not None:
      history = history_tokens(view.prompts, view.prompt_lengths,
                               view.generated, view.lengths, self.history_len)
      scorers.append(ngram_scorer(self.ngram, history, lattice,
                                  opts.ngram_weight))
      carry.append(None)
    if self.rescorer is not None:
      scorers.append(neural_scorer(
          self.rescorer.score_fn, self.rescorer.params,
          view.prompt_lengths + view.lengths, path_log_probs, lattice,
          opts.neural_weight, opts.beams, opts.neural_parallel))
      carry.append(rescorer_cache)
    scorer = combine_scorers(*scorers) if scorers else None
    out, _, carry = beam_search(lattice, opts.num_drafts, opts.beams, scorer,
                                tuple(carry) if scorers else None)
    if self.rescorer is not None:
      rescorer_cache = carry[-1]
    return out, rescorer_cache

  @property
  def prompt_features(self):
    return False  # init reads no hidden states.

  def init(self, view: View):
    lattice, heads = self._lattice(view)
    rescorer_cache = path_log_probs = None
    if self.rescorer is not None:
      batch, p = view.prompts.shape
      positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (batch, p))
      _, rescorer_cache = tree_call(self.rescorer.score_fn,
                                    self.rescorer.params, view.prompts,
                                    positions, self.rescorer.cache)
      rescorer_cache, path_log_probs = self._rescorer_commit(
          rescorer_cache, jnp.zeros((batch, self.k), jnp.int32),
          jnp.zeros_like(view.prompt_lengths), lattice.argmax_path(),
          view.prompt_lengths)
    drafts, rescorer_cache = self._drafts(lattice, view, rescorer_cache,
                                          path_log_probs)
    return self._carry(drafts, heads, rescorer_cache, view)

  def update(self, carry, view: View):
    lattice, heads = self._lattice(view)
    rescorer_cache, path_log_probs = carry["rescorer_cache"], None
    if self.rescorer is not None:
      rescorer_cache, path_log_probs = self._rescorer_commit(
          rescorer_cache, view.committed, view.num_committed,
          lattice.argmax_path(), view.offsets)
    drafts, rescorer_cache = self._drafts(lattice, view, rescorer_cache,
                                          path_log_probs)
    return self._carry(drafts, heads, rescorer_cache, view)

  def propose(self, carry, view: View) -> Draft:
    return Draft(tokens=carry["drafts"][:, :, 1:],
                 confidence=carry.get("confidence"))
