"""Blockwise decoding with refined drafts and multi-draft verification.

Kim et al. (2024) observe that the heads' independent argmaxes make poor
blocks and rescore the heads' top-K lattice (see `lattice.py`,
`rescoring.py`). This loop drafts p blocks per call from the lattice and
verifies all p in one model call:

  1. the p drafts share their first token (head 1's argmax), so they are fed
     as one token tree of T = 1 + p (k - 1) nodes (`DraftTree`): node i sits
     at position offset + depth(i) but in cache slot offset + i, and attends
     to the committed cache and its own ancestors (a tree attention mask);
  2. each draft's prefix is verified against head 1 at its parent nodes; the
     draft with the longest accepted prefix wins (the better-ranked one on
     ties), a in [1, k] tokens are committed;
  3. the winner's keys/values move from their tree slots to slots
     offset .. offset + a - 1 (`compact_fn`, a gather of k entries per layer),
     restoring "slot s holds position s" for the next call;
  4. the heads at the winner's last accepted node give the next lattice,
     which is rescored into the next p drafts.

With p = 1 the tree is a chain: the call is the plain causal block call and
nothing moves. Every accepted token equals head 1's argmax after its
accepted prefix, so with `Exact()` the output equals greedy decoding for any
draft source; only the number of calls changes.

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

from blockdec.decoding.acceptance import accepted_prefix_length
from blockdec.decoding.lattice import DraftTree, top_k_lattice
from blockdec.decoding.ngram import NGramLM
from blockdec.decoding.rescoring import (beam_search, combine_scorers,
                                         neural_scorer, ngram_scorer,
                                         tree_call)
from blockdec.decoding.state import (DecodeOptions, DecodeOutput, DecodeState,
                                     finalize, while_loop_compacting,
                                     write_rows)

# compact(cache, src_slots [B, A], offsets [B], end_index [B]) -> cache:
# moves the entries at src_slots[b, i] to slot offsets[b] + i and sets the
# end index (a "slot s holds position s" cache after a tree call).
CompactFn = Callable[[Any, jax.Array, jax.Array, jax.Array], Any]


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
    score_fn: its scoring callable (static); must accept `parents=` for tree
      calls, like the main model's.
    params: its parameters.
    cache: an empty cache for `score_fn` with room for P + N +
      `DraftOptions.rescorer_slots(k)` positions.
  """

  params: Any
  cache: Any
  score_fn: Callable = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class _State:
  """The blockwise loop state plus the drafts and the small LM's state.

  Attributes:
    base: `DecodeState`; base.proposal [B, k] holds draft 0.
    drafts: [B, p, k] int32, the drafts to verify next.
    rescorer_cache: the small LM's cache (committed tokens), or None.
    prompts: [B, P] the prompts (the n-gram history reads them); in the
      state, not the loop's closure, so that rows can be compacted.
  """

  base: DecodeState
  drafts: jax.Array
  rescorer_cache: Any
  prompts: jax.Array


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


def refined_blockwise_decode(score_fn, params, prompts: jax.Array,
                             prompt_lengths: jax.Array, cache,
                             options: DecodeOptions, drafts: DraftOptions, *,
                             compact_fn: CompactFn | None = None,
                             ngram: NGramLM | None = None,
                             rescorer: NeuralRescorer | None = None
                             ) -> DecodeOutput:
  """Blockwise decoding with p rescored drafts per call (see module docstring).

  Args:
    score_fn: the model's scoring callable, plain (`ScoreFn`) or split into
      trunk and heads; for p > 1 it (or its trunk) must accept a static
      `parents=` tuple for tree calls (see `rescoring.tree_call`).
    params: passed through to `score_fn`.
    prompts: [B, P] int32, right-padded.
    prompt_lengths: [B] int32 in [1, P].
    cache: an empty cache with room for P + N + `drafts.tree_size(k)` slots.
    options: static decoding options (block size k, acceptance, EOS, budget).
    drafts: static draft options.
    compact_fn: moves the accepted path's cache entries; required for p > 1.
    ngram: the n-gram LM when `drafts.ngram_weight` is non-zero.
    rescorer: the small LM when `drafts.neural_weight` is non-zero.

  Returns:
    `DecodeOutput`, as `blockwise_decode`'s.

  Traceable: call it under `jax.jit` with `options` and `drafts` static.
  """
  k, p, width = options.block_size, drafts.num_drafts, drafts.lattice_width
  if drafts.ngram_weight and ngram is None:
    raise ValueError(f"ngram_weight={drafts.ngram_weight} needs an n-gram LM.")
  if drafts.neural_weight and rescorer is None:
    raise ValueError(f"neural_weight={drafts.neural_weight} needs a rescorer.")
  if p > 1 and compact_fn is None:
    raise ValueError(f"num_drafts={p} > 1 needs a compact_fn for the cache.")
  use_ngram = bool(drafts.ngram_weight) and ngram is not None
  use_neural = bool(drafts.neural_weight) and rescorer is not None
  tree = DraftTree(p, k)
  paths = jnp.asarray(tree.paths, jnp.int32)  # [p, k]
  node_depths = jnp.asarray(tree.depths, jnp.int32)  # [T]
  history_len = max(ngram.context_len, 1) if use_ngram else 1
  batch, prompt_len = prompts.shape

  def propose(lattice, offsets, history, rescorer_cache, path_log_probs):
    """The lattice after the last committed token -> drafts [B, p, k]."""
    if not (use_ngram or use_neural) and drafts.beams == 1:
      return lattice.argmax_path()[:, None], rescorer_cache
    scorers, carry = [], []
    if use_ngram:
      scorers.append(ngram_scorer(ngram, history, lattice, drafts.ngram_weight))
      carry.append(None)
    if use_neural:
      scorers.append(neural_scorer(
          rescorer.score_fn, rescorer.params, offsets, path_log_probs,
          lattice, drafts.neural_weight, drafts.beams,
          drafts.neural_parallel))
      carry.append(rescorer_cache)
    scorer = combine_scorers(*scorers) if scorers else None
    out, _, carry = beam_search(lattice, p, drafts.beams, scorer,
                                tuple(carry) if scorers else None)
    if use_neural:
      rescorer_cache = carry[-1]
    return out, rescorer_cache

  def lattice_of(head_logits):  # [B, k, V] -> Lattice
    return top_k_lattice(head_logits[:, :k], min(width, head_logits.shape[-1]))

  def rescorer_commit(cache, committed, count, path, offsets):
    """One small-LM call: commits committed[:, :count] (at `offsets`) and
    reads its distributions along the next argmax path [B, k].

    Feeds [committed[:count], path, junk] (2k tokens, ragged count in [0, k])
    and returns (cache, log-probs [B, k, V]) where entry j is the
    distribution at depth j given the committed tokens and path[:j].
    """
    i = jnp.arange(2 * k)
    path_idx = jnp.clip(i[None, :] - count[:, None], 0, k - 1)
    fed = jnp.where(i[None, :] < count[:, None],
                    jnp.pad(committed, ((0, 0), (0, k)))[:, :2 * k],
                    jnp.take_along_axis(path, path_idx, axis=1))  # [B, 2k]
    head_fn, cache = tree_call(rescorer.score_fn, rescorer.params, fed,
                               offsets[:, None] + i, cache)
    # Depth j's distribution follows path[j-1], fed at count + j - 1; depth
    # 0's (unused: it is not rescored) is read at the same slot as depth 1's.
    nodes = count[:, None] + jnp.maximum(jnp.arange(k) - 1, 0)  # [B, k]
    logits = head_fn(nodes, 1)[:, :, 0]  # [B, k, V]
    return cache, jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

  # Prefill: the prompts, then the first drafts from the last prompt token.
  positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32),
                               (batch, prompt_len))
  head_fn, cache = tree_call(score_fn, params, prompts, positions, cache)
  head_logits = head_fn((prompt_lengths - 1)[:, None], k)[:, 0]  # [B, k, V]
  lattice = lattice_of(head_logits)
  rescorer_cache, path_log_probs = None, None
  if use_neural:
    _, rescorer_cache = tree_call(rescorer.score_fn, rescorer.params, prompts,
                                  positions, rescorer.cache)
    rescorer_cache, path_log_probs = rescorer_commit(
        rescorer_cache, jnp.zeros((batch, k), jnp.int32),
        jnp.zeros_like(prompt_lengths), lattice.argmax_path(), prompt_lengths)
  history = history_tokens(prompts, prompt_lengths,
                           jnp.zeros((batch, 1), jnp.int32),
                           jnp.zeros_like(prompt_lengths), history_len)
  first_drafts, rescorer_cache = propose(lattice, prompt_lengths, history,
                                         rescorer_cache, path_log_probs)
  base = DecodeState.make(prompt_lengths, first_drafts[:, 0], cache, options)
  state = _State(base=base, drafts=first_drafts, rescorer_cache=rescorer_cache,
                 prompts=prompts)

  def cond(state: _State):
    return ~jnp.all(state.base.done) & (state.base.step < options.max_new_tokens)

  def body(state: _State):
    base = state.base
    batch = base.lengths.shape[0]  # Shrinks as rows are compacted.
    offsets = base.positions  # [B]
    if p == 1:
      tokens = state.drafts[:, 0]  # [B, k]
      positions = offsets[:, None] + jnp.arange(k, dtype=jnp.int32)
      head_fn, cache = tree_call(score_fn, params, tokens, positions, base.cache)
    else:
      tokens = tree.flatten(state.drafts)  # [B, T]
      positions = offsets[:, None] + node_depths
      head_fn, cache = tree_call(score_fn, params, tokens, positions, base.cache,
                                 tree.parents)
    nodes = jnp.broadcast_to(paths.reshape(1, p * k), (batch, p * k))
    head1 = head_fn(nodes, 1)[:, :, 0].reshape(batch, p, k, -1)  # [B, p, k, V]
    matches = options.acceptance.matches(state.drafts[:, :, 1:],
                                         head1[:, :, :-1])  # [B, p, k-1]
    per_draft = accepted_prefix_length(matches)  # [B, p]
    best = jnp.argmax(per_draft, axis=-1)  # [B]; ties go to the better draft
    accepted = jnp.take_along_axis(per_draft, best[:, None], axis=1)[:, 0]
    draft = jnp.take_along_axis(state.drafts, best[:, None, None],
                                axis=1)[:, 0]  # [B, k]
    ended = jnp.zeros_like(base.done)
    if options.eos_id is not None:
      is_eos = (draft == options.eos_id) & (jnp.arange(k) < accepted[:, None])
      ended = jnp.any(is_eos, axis=-1)
      accepted = jnp.where(ended, jnp.argmax(is_eos, axis=-1) + 1, accepted)
    accepted = jnp.minimum(accepted, options.max_new_tokens - base.lengths)
    active = ~base.done
    accepted = jnp.where(active, accepted, 0).astype(jnp.int32)
    tokens_out = write_rows(base.tokens, draft, base.lengths)
    lengths = base.lengths + accepted
    done = base.done | (active & ended) | (lengths >= options.max_new_tokens)
    path = paths[best]  # [B, k] nodes of the winning draft
    if p > 1:
      cache = compact_fn(cache, offsets[:, None] + path, offsets,
                         offsets + accepted)
    # The heads after the last accepted token give the next lattice.
    last = jnp.take_along_axis(path, jnp.maximum(accepted - 1, 0)[:, None],
                               axis=1)  # [B, 1]
    lattice = lattice_of(head_fn(last, k)[:, 0])  # heads [B, k, V]
    rescorer_cache, path_log_probs = state.rescorer_cache, None
    if use_neural:
      rescorer_cache, path_log_probs = rescorer_commit(
          rescorer_cache, draft, accepted, lattice.argmax_path(), offsets)
    new_offsets = offsets + accepted
    history = history_tokens(state.prompts, base.prompt_lengths, tokens_out,
                             lengths, history_len)
    new_drafts, rescorer_cache = propose(lattice, new_offsets, history,
                                         rescorer_cache, path_log_probs)
    new_drafts = jnp.where(active[:, None, None], new_drafts, state.drafts)
    hist = base.accepted_hist + (
        active[:, None] & (jnp.arange(k)[None, :] == accepted[:, None] - 1))
    base = base.replace(
        step=base.step + 1, tokens=tokens_out, lengths=lengths,
        proposal=new_drafts[:, 0], done=done,
        num_calls=base.num_calls + active,
        accepted_hist=hist.astype(jnp.int32), cache=cache)
    return state.replace(base=base, drafts=new_drafts,
                         rescorer_cache=rescorer_cache)

  state = while_loop_compacting(cond, body, state, lambda s: s.base.done,
                                options.compact_rows)
  return finalize(state.base, options)
