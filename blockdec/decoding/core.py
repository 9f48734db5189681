"""The draft-and-verify core: the one loop every decoding method runs.

Every method of the blockwise family is the same loop; only who drafts and
how verification decides differ:

  prefill   run the prompts; the first token is chosen from head 1 at each
            row's last prompt token (argmax, or a draw with sampling); the
            drafter's `init` sees the heads there.
  loop      while a row is active (and at most N calls):
    propose   the drafter's `propose` -> `Draft`: C chains of D tokens that
              all follow the decided token (the root), optionally with
              their draft distributions q;
    call      the target model once on the root and the drafts (a causal
              block for one chain, a token tree for several);
    verify    the verifier's `Verdict`: kept chain, accepted drafts a in
              [0, D], next token;
    commit    root + a drafts (cut after an EOS, clamped to the budget) are
              written; lengths, done, num_calls and the histogram advance;
              for a tree the kept path's keys and values move into place;
    update    the drafter's `update` sees the call (heads at the last
              committed node, what was committed).
  finalize  mask every row after its end, once.

Speculative prefill (`Drafter.drafts_at_prefill`: a draft model, which
needs no heads to draft): the drafter drafts the K = D + 1 tokens after
each prompt before the target has seen it, and the prompts' call feeds
them after the prompt and verifies them as a call verifies its drafts
(the last prompt token, committed already, standing in for the root). It
commits the accepted drafts, up to K as a call commits, and decides the
next token, so the first round rides on the prefill (K more tokens in a
compute-bound call) instead of costing a call of its own. Where it
commits tokens it counts as a call (in `num_calls` and `accepted_hist`);
where its first draft is rejected it is a plain prefill, which decided the
first token and, like every prefill, counts as no call.

Row compaction (`state.while_loop_compacting`), EOS, ragged prompts, the
budget and the adaptive draft length (`adaptive.AdaptiveBlockSize`) belong
to the loop, so every drafter has them. A drafter's state lives in its own
pytree carry; it must be a scalar or have the batch as leading axis in
every leaf (so rows can be compacted), and a drafter must not close over
per-row arrays.

Randomness (sampling only) is keyed by the run's key, the row's index in the
caller's batch (`LoopState.row_ids`, which compaction carries along) and the
index of the generated token a draw decides (`sampling.token_keys`): a
row's output does not depend on its neighbours or on compaction.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from blockdec.decoding import sampling as sampling_lib
from blockdec.kernels import masks
from blockdec.decoding.lattice import DraftTree, DynamicTree, RowTree
from blockdec.decoding.rescoring import tree_call
from blockdec.decoding.state import (DecodeOptions, DecodeOutput, ScoreFn,
                                     finalize,
                                     while_loop_compacting, write_rows)
from blockdec.decoding.verify import VerifyKeys

# compact(cache, src_slots [B, A], offsets [B], end_index [B]) -> cache:
# moves the entries at src_slots[b, i] to slot offsets[b] + i and sets the
# end index (a "slot s holds position s" cache after a tree call).
CompactFn = Callable[[Any, jax.Array, jax.Array, jax.Array], Any]
# heads(nodes [B, M], num_heads) -> logits [B, M, num_heads, V] at fed nodes.
HeadFn = Callable[[jax.Array, int], jax.Array]


@flax.struct.dataclass
class Draft:
  """What a drafter proposes for one call.

  Attributes:
    tokens: [B, C, D] int32 C chains of D drafted tokens after the root.
    q: [B, C, D, V] float32 the filtered distribution each token was drawn
      from (sampling), or None for deterministic drafts.
    confidence: [B, D] float32 the drafter's probability of chain 0's
      tokens (the adaptive rule's "confidence" estimate), or None.
    length: [B] int32 how many of chain 0's tokens are real proposals (the
      rest is filler the drafter expects to be rejected, e.g. prompt lookup
      without a match); the adaptive rule verifies no filler. None: all D.
    extra: [B, E] int32 tokens of the drafter's extra nodes (`Drafter.extra`)
      fed in the same call but never committed, or None.
    calls: [B] int32 calls of the TARGET model the drafter made for this
      draft through `View.score` (block diffusion's denoising steps); they
      count in `num_calls` beside the verification call. None: 0.
    tree: the rows' own trees (`lattice.RowTree`), required from a drafter
      whose `tree` is a `lattice.DynamicTree`; `tokens` then holds each
      chain's tokens along its path. None otherwise.
    cache: the KV cache the verification call runs on, when the drafter
      wrote into `View.cache` through `View.write_score` (block diffusion's
      sub-block cache); its writes lie past the committed length only, in
      slots the verification call overwrites or no query sees. None: the
      loop's cache.
  """

  tokens: jax.Array
  q: jax.Array | None = None
  confidence: jax.Array | None = None
  length: jax.Array | None = None
  extra: jax.Array | None = None
  calls: jax.Array | None = None
  tree: RowTree | None = None
  cache: Any = None


@dataclasses.dataclass(frozen=True)
class ExtraNodes:
  """Nodes a tree drafter adds to the verification call for itself.

  Lookahead decoding runs its Jacobi window in the same call as the
  verification tree: those nodes are fed, attend through the tree mask and
  give the drafter their head-1 logits (`View.extra_logits`), but are never
  verified or committed. Static.

  Block diffusion's fused self-speculative mode denoises the next block in
  the verification call: extra nodes of one `groups` id also see each other
  both ways (a block of [MASK]s), on top of the tree mask's ancestors.

  Attributes:
    parents: E parent indices into the whole call (the tree's T nodes come
      first, so extra node i is node T + i; -1: the committed prefix only).
    depths: E position offsets from the root's position.
    groups: E group ids, or None: extra nodes with the same id >= 0 see
      each other (-1: ancestors only).
  """

  parents: tuple[int, ...]
  depths: tuple[int, ...]
  groups: tuple[int, ...] | None = None

  def __post_init__(self):
    if len(self.parents) != len(self.depths):
      raise ValueError(f"ExtraNodes has {len(self.parents)} parents but "
                       f"{len(self.depths)} depths.")
    if self.groups is not None and len(self.groups) != len(self.parents):
      raise ValueError(f"ExtraNodes has {len(self.parents)} parents but "
                       f"{len(self.groups)} groups.")

  @property
  def size(self) -> int:
    return len(self.parents)

  def mask(self, tree_parents: tuple[int, ...]) -> masks.BlockMask:
    """The call's static mask: the tree and these nodes under their
    parents, and each group's nodes seeing each other."""
    tree = masks.TreeMask(tuple(tree_parents) + self.parents)
    if self.groups is None:
      return tree
    ids = np.concatenate([np.full(len(tree_parents), -1),
                          np.asarray(self.groups)])
    both_ways = (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)
    return tree | masks.PatternMask(both_ways)


@dataclasses.dataclass(frozen=True)
class Context:
  """What a drafter may read besides its carry (static parts only here).

  Attributes:
    sampling: the run's sampling settings, or None (greedy drafts).
    want_confidence: the adaptive rule reads `Draft.confidence`.
  """

  sampling: sampling_lib.Sampling | None = None
  want_confidence: bool = False


@dataclasses.dataclass
class View:
  """A drafter's view of the call that just ran (or of the prefill).

  Attributes:
    heads: heads [B, n, V] of the target at the last committed node
      (prefill: the last prompt token): head 1 predicts the next token,
      head j the token j - 1 places after it. Call as `heads(n)`. None in
      `propose` (read the heads in `init`/`update`, keep what is needed).
    next_token: [B] int32 the token the next call feeds first.
    lengths: [B] int32 generated tokens committed so far.
    committed: [B, K] int32 this call's committed tokens (valid up to
      `num_committed`); None at prefill.
    num_committed: [B] int32 tokens committed by this call (0 at prefill).
    offsets: [B] int32 position of the first token this call committed.
    prompts: [B, P] int32 and prompt_lengths [B]: the rows' prompts.
    generated: [B, M] int32 generated tokens (valid up to `lengths`).
    keys: [B] per-row keys (sampling), or None.
    context: static settings.
    extra_logits: [B, E, V] head-1 logits at the drafter's extra nodes after
      a call (`Drafter.extra`); None otherwise.
    extra_tokens: [B, E] int32 the tokens fed at those nodes (`Draft.extra`
      of the call); None otherwise.
    features: [B, K, d] the target's final hidden states (after the final
      norm) at this call's committed nodes in order (valid up to
      `num_committed`; the state at node i predicts committed token i + 1,
      the last one `next_token`); at prefill at the prompt positions (valid
      up to `prompt_lengths`). None when the scorer is not split into trunk
      and heads.
    score: `score(tokens [B, T], positions [B, T], mask) -> head-1 logits
      [B, T, V]`: the TARGET model on a block against its committed cache
      (slots before `positions[:, 0]`), under a block mask of
      `blockdec.kernels` (None: causal). Nothing is written: the loop's
      cache is unchanged. A drafter that calls it reports the calls in
      `Draft.calls`.
    cache: the loop's KV cache (in `propose`; None elsewhere).
    write_score: `write_score(cache, tokens, positions, mask) -> (head-1
      logits [B, T, V], cache)`: `score` against `cache` (`View.cache` or
      what an earlier `write_score` returned), returning it with the
      block's keys and values written at slots `positions`. Write only past
      the committed length (`prompt_lengths + lengths`) and hand the cache
      back in `Draft.cache`; a later block sees the written slots before
      its first position (a sub-block cache).
  """

  heads: Callable[[int], jax.Array]
  next_token: jax.Array
  lengths: jax.Array
  committed: jax.Array | None
  num_committed: jax.Array
  offsets: jax.Array
  prompts: jax.Array
  prompt_lengths: jax.Array
  generated: jax.Array
  keys: jax.Array | None
  context: Context
  extra_logits: jax.Array | None = None
  score: Callable[..., jax.Array] | None = None
  features: jax.Array | None = None
  extra_tokens: jax.Array | None = None
  cache: Any = None
  write_score: Callable[..., tuple[jax.Array, Any]] | None = None


class Drafter(abc.ABC):
  """Proposes drafts; a hashable static object with a pytree carry.

  A chain drafter (`tree is None`) proposes one chain (C = 1) of
  `num_drafts` tokens; a tree drafter proposes the chains of `tree` (a
  `lattice.DraftTree`), verified in one tree call; a dynamic-tree drafter
  (`tree` a `lattice.DynamicTree`) proposes each row's own tree
  (`Draft.tree`), verified through a runtime tree mask.
  """

  @property
  @abc.abstractmethod
  def num_drafts(self) -> int:
    """D, tokens drafted per chain after the root (static)."""

  @property
  def tree(self) -> DraftTree | DynamicTree | None:
    """The token tree the chains form, or None for one chain."""
    return None

  @property
  def extra(self) -> ExtraNodes | None:
    """Nodes fed after the tree's for the drafter itself (tree drafters)."""
    return None

  @property
  def cache_slots(self) -> int:
    """Cache slots a call writes past the committed length."""
    if self.tree is None:
      return 1 + self.num_drafts
    return self.tree.size + (0 if self.extra is None else self.extra.size)

  @property
  def prompt_features(self) -> bool:
    """Whether `init` reads the trunk's hidden states (`View.features`) at
    prompt positions before the last (EAGLE does). False: `init`'s view
    holds them at the last prompt token only ([B, 1, d]), and the prefill
    skips the last layer's work at the other prompt tokens (a drafter
    that never reads features should say False)."""
    return True

  @property
  def drafts_at_prefill(self) -> bool:
    """Whether the drafter drafts before the prefill (`prefill_draft`), so
    the prompt's call verifies the first drafts (a chain drafter only)."""
    return False

  def prefill_draft(self, view: View) -> tuple[Any, Draft]:
    """(carry, one chain of D + 1 drafts after each row's prompt), before
    the target has seen the prompts: a speculative prefill (module doc).

    `view` holds the prompts, `lengths` (zeros), `keys` and `context`; no
    heads, and `next_token` is not decided yet. Draft j is generated token
    j - 1 (sampling keys: index j - 1). The carry goes to `update` after
    the prefill, as after a call (it need not have `update`'s structure).
    """
    raise NotImplementedError(f"{type(self).__name__} drafts no tokens "
                              "before the prefill.")

  @abc.abstractmethod
  def init(self, view: View) -> Any:
    """The carry after prefill."""

  @abc.abstractmethod
  def propose(self, carry, view: View) -> Draft:
    """The drafts for the next call (`view` as after the last update)."""

  @abc.abstractmethod
  def update(self, carry, view: View) -> Any:
    """The carry after a call."""


class ViewDrafter(Drafter):
  """A chain drafter whose carry is drafted from the view alone, the same
  after the prefill as after a call (`init` = `update(None, view)`), with
  `block_size - 1` drafts and no prompt features (heads, prompt lookup).
  Subclasses have a `block_size` field and define `update`."""

  block_size: int

  @property
  def num_drafts(self) -> int:
    return self.block_size - 1

  @property
  def prompt_features(self):
    return False  # init reads no hidden states.

  def init(self, view: View):
    return self.update(None, view)


class NoDrafter(Drafter):
  """Drafts nothing: one token per call (ancestral sampling, or greedy)."""

  def __hash__(self):
    return hash(NoDrafter)

  def __eq__(self, other):
    return isinstance(other, NoDrafter)

  @property
  def num_drafts(self):
    return 0

  @property
  def prompt_features(self):
    return False

  def init(self, view):
    return None

  def propose(self, carry, view):
    return Draft(tokens=jnp.zeros((view.lengths.shape[0], 1, 0), jnp.int32))

  def update(self, carry, view):
    return None


@flax.struct.dataclass
class LoopState:
  """Per-row state of the core loop.

  Attributes:
    step: [] int32 calls so far.
    row_ids: [B] int32 each row's index in the caller's batch.
    prompts: [B, P] int32 and prompt_lengths [B] int32.
    tokens: [B, N + K] int32 generated tokens; garbage past `lengths`.
    lengths: [B] int32 committed generated tokens.
    next_token: [B] int32 decided, fed and committed first by the next call.
    done: [B] bool rows that hit EOS or their budget.
    num_calls: [B] int32 calls while the row was active.
    accepted_hist: [B, K] int32; entry a - 1 counts calls committing a
      tokens (K = D + 1).
    cache: the target's cache.
    drafter: the drafter's carry.
    policy: the adaptive rule's carry (None without one).
  """

  step: jax.Array
  row_ids: jax.Array
  prompts: jax.Array
  prompt_lengths: jax.Array
  tokens: jax.Array
  lengths: jax.Array
  next_token: jax.Array
  done: jax.Array
  num_calls: jax.Array
  accepted_hist: jax.Array
  cache: Any
  drafter: Any
  policy: Any

  @property
  def positions(self) -> jax.Array:
    """[B] position of the next token to commit (prompt included)."""
    return self.prompt_lengths + self.lengths


def _view(state: LoopState, heads, committed, num_committed, offsets, keys,
          context, extra_logits=None, score=None, features=None,
          extra_tokens=None, write_score=None) -> View:
  return View(heads=heads, next_token=state.next_token, lengths=state.lengths,
              committed=committed, num_committed=num_committed,
              offsets=offsets, prompts=state.prompts,
              prompt_lengths=state.prompt_lengths, generated=state.tokens,
              keys=keys, context=context, extra_logits=extra_logits,
              score=None if score is None else score(state.cache),
              features=features, extra_tokens=extra_tokens,
              cache=None if write_score is None else state.cache,
              write_score=write_score)


def _features(head_fn, nodes):
  """The trunk's hidden states at nodes [B, M] (None for a plain scorer)."""
  hidden = getattr(head_fn, "hidden", None)
  return None if hidden is None else hidden(nodes)


def _cut(kept: jax.Array, count: jax.Array, eos_id: int | None):
  """(count, ended): the first `count` [B] tokens of kept [B, t] cut after
  the first EOS among them, and whether one was there."""
  if eos_id is None:
    return count, jnp.zeros(count.shape, bool)
  is_eos = (kept == eos_id) & (jnp.arange(kept.shape[1]) < count[:, None])
  ended = jnp.any(is_eos, axis=-1)
  return jnp.where(ended, jnp.argmax(is_eos, axis=-1) + 1, count), ended


def run(score_fn: ScoreFn, params, prompts: jax.Array,
        prompt_lengths: jax.Array, cache, options: DecodeOptions,
        drafter: Drafter, *, key: jax.Array | None = None,
        compact_fn: CompactFn | None = None,
        row_ids: jax.Array | None = None) -> DecodeOutput:
  """Decodes with `drafter` and `options.acceptance` as the verifier.

  Args:
    score_fn: the target's scoring callable (`state.ScoreFn`, or a
      `SplitScoreFn`); it must return at least as many heads as the drafter
      reads.
    params: passed through to `score_fn`.
    prompts: [B, P] int32, right-padded.
    prompt_lengths: [B] int32 in [1, P].
    cache: an empty cache with room for P + N + `drafter.cache_slots`.
    options: static options; `options.acceptance` is the verifier,
      `options.sampling` the sampling settings (None: greedy),
      `options.adaptive` the draft-length rule (chains only).
    drafter: static drafter.
    key: PRNG key (required with sampling).
    compact_fn: moves the kept path's cache entries after a tree call
      (required for tree drafters).
    row_ids: [B] int32 the rows' indices in the caller's batch (keys);
      default 0..B-1.

  Returns:
    `DecodeOutput`; accepted_hist has D + 1 columns.

  Traceable: call it under `jax.jit` with `options` and `drafter` static.
  """
  sampling, verifier, adaptive = (options.sampling, options.acceptance,
                                  options.adaptive)
  d, tree = drafter.num_drafts, drafter.tree
  if sampling is not None and key is None:
    raise ValueError("sampling needs a PRNG key (key=jax.random.key(seed)).")
  if tree is not None and compact_fn is None:
    raise ValueError("a tree drafter needs a compact_fn for the cache.")
  if tree is not None and adaptive is not None:
    raise ValueError("the adaptive draft length works on chains, not trees.")
  extra = drafter.extra
  dynamic = isinstance(tree, DynamicTree)
  if extra is not None and (tree is None or dynamic):
    raise ValueError("extra nodes need a tree drafter (Drafter.tree).")
  if tree is not None and (dynamic or tree.padded) and not verifier.lossless:
    raise ValueError(
        "a draft tree whose chains end at different depths, or a dynamic "
        "one, needs a lossless verifier (Exact() or SpeculativeSampling()); "
        f"got acceptance={verifier!r}.")
  tree_mask = (None if tree is None or dynamic else
               masks.TreeMask(tree.parents) if extra is None else
               extra.mask(tree.parents))
  context = Context(sampling=sampling, want_confidence=(
      adaptive is not None and adaptive.estimate == "confidence"))
  batch = prompts.shape[0]
  if row_ids is None:
    row_ids = jnp.arange(batch, dtype=jnp.int32)
  n = options.max_new_tokens

  def keys_of(state):
    return (None if sampling is None
            else sampling_lib.row_keys(key, state.row_ids))

  def write_score(cache, tokens, positions, mask=None):
    """View.write_score: head-1 logits and the cache with the block written."""
    head_fn, cache = tree_call(score_fn, params, tokens, positions, cache,
                               mask=mask)
    nodes = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                             tokens.shape)
    return head_fn(nodes, 1)[:, :, 0], cache

  def scorer(cache):
    """View.score: write_score against `cache` with the updated cache
    discarded (XLA drops the write), so the loop's cache is as before."""
    def score(tokens, positions, mask=None):
      return write_score(cache, tokens, positions, mask)[0]
    return score

  zeros = jnp.zeros((batch,), jnp.int32)
  state = LoopState(
      step=jnp.zeros((), jnp.int32), row_ids=row_ids.astype(jnp.int32),
      prompts=prompts, prompt_lengths=prompt_lengths.astype(jnp.int32),
      tokens=jnp.full((batch, n + d + 1), options.pad_id, jnp.int32),
      lengths=zeros, next_token=zeros, done=jnp.zeros((batch,), bool),
      num_calls=zeros, accepted_hist=jnp.zeros((batch, d + 1), jnp.int32),
      cache=cache, drafter=None,
      policy=None if adaptive is None else adaptive.init(batch, d + 1))
  speculative = drafter.drafts_at_prefill and d > 0
  if speculative and (tree is not None or drafter.prompt_features):
    raise ValueError("a speculative prefill (Drafter.drafts_at_prefill) is "
                     "for chain drafters that read no prompt features.")

  def prefill(state: LoopState) -> LoopState:
    """The first token comes from head 1 at the last prompt token."""
    positions = jnp.broadcast_to(
        jnp.arange(prompts.shape[1], dtype=jnp.int32), prompts.shape)
    last = (state.prompt_lengths - 1)[:, None]
    # Without prompt features, outputs at the last prompt token only: node 0.
    keep = None if drafter.prompt_features else last
    head_fn, cache = tree_call(score_fn, params, prompts, positions,
                               state.cache, prefill=True, keep=keep)
    prompt_nodes = positions
    if keep is not None:
      last = prompt_nodes = zeros[:, None]
    state = state.replace(cache=cache)
    keys = keys_of(state)
    first_logits = head_fn(last, 1)[:, 0, 0]  # [B, V]
    first_keys = (None if keys is None else
                  sampling_lib.token_keys(keys, zeros, sampling_lib.NEXT))
    state = state.replace(next_token=sampling_lib.choose(
        first_logits, sampling, first_keys))
    heads_at_last = lambda m: head_fn(last, m)[:, 0]
    return state.replace(drafter=drafter.init(
        _view(state, heads_at_last, None, zeros, state.prompt_lengths, keys,
              context, score=scorer,
              features=_features(head_fn, prompt_nodes))))

  def speculative_prefill(state: LoopState) -> LoopState:
    """The prompts' call verifies the drafter's first K = D + 1 drafts
    (module doc): row b feeds its prompt and then its drafts, at positions
    0 .. P_b + K - 1; head 1 at the last prompt token and at each draft
    verifies them."""
    keys = keys_of(state)
    k = d + 1
    carry, draft = drafter.prefill_draft(
        _view(state, None, None, zeros, zeros, keys, context))
    drafts = draft.tokens[:, 0]  # [B, K]
    width = prompts.shape[1] + k
    after = (jnp.arange(width, dtype=jnp.int32)[None]
             - state.prompt_lengths[:, None])  # [B, W]: index past the prompt
    fed = jnp.where(after < 0, jnp.pad(prompts, ((0, 0), (0, k))),
                    jnp.take_along_axis(drafts, jnp.clip(after, 0, k - 1),
                                        axis=1))
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32),
                                 fed.shape)
    # Node 0: the last prompt token; node j: draft j (generated token j - 1).
    nodes = jnp.broadcast_to(jnp.arange(k + 1, dtype=jnp.int32),
                             (batch, k + 1))
    head_fn, cache = tree_call(score_fn, params, fed, positions, state.cache,
                               prefill=True,
                               keep=(state.prompt_lengths - 1)[:, None]
                               + nodes)
    logits = head_fn(nodes, 1)[:, None, :, 0]  # [B, 1, K + 1, V]
    verify_keys = None
    if keys is not None:
      verify_keys = VerifyKeys(
          accept=sampling_lib.token_keys(keys, nodes[:, :k],
                                         sampling_lib.ACCEPT),
          next=sampling_lib.token_keys(keys, nodes, sampling_lib.NEXT))
    verdict = verifier.verify(draft.tokens, logits, draft.q, sampling,
                              verify_keys)
    count, ended = _cut(drafts, verdict.accepted, options.eos_id)
    count = jnp.minimum(count, n)
    done = ended | (count >= n)
    committed = count > 0  # A call; else a plain prefill (no call).
    calls = committed + (0 if draft.calls is None else draft.calls)
    policy = state.policy
    if adaptive is not None:  # Drafts past D are not the rule's depths.
      policy = adaptive.update(policy, jnp.minimum(verdict.accepted, d),
                               d + 1, jnp.ones((batch,), bool))
    new = state.replace(
        tokens=write_rows(state.tokens, drafts, zeros), lengths=count,
        next_token=verdict.next_token, done=done,
        num_calls=calls.astype(jnp.int32),
        accepted_hist=(state.accepted_hist + (
            committed[:, None] & (nodes[:, :k] == count[:, None] - 1))
                       ).astype(jnp.int32),
        cache=cache, policy=policy)
    last = count[:, None]  # The last committed node (0: the prompt's).
    view = _view(new, lambda m: head_fn(last, m)[:, 0], drafts, count,
                 state.prompt_lengths, keys, context, score=scorer,
                 features=_features(head_fn, nodes[:, 1:]))
    # When every row is done, the carry is never read: zeros of its shape
    # stand in for the drafting round.
    shapes = jax.eval_shape(lambda c: drafter.update(c, view), carry)
    carry = jax.lax.cond(
        jnp.all(done),
        lambda c: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes),
        lambda c: drafter.update(c, view), carry)
    return new.replace(drafter=carry)

  state = speculative_prefill(state) if speculative else prefill(state)

  def cond(state: LoopState):
    return ~jnp.all(state.done) & (state.step < n)

  def step(state: LoopState, draft: Draft, t: int) -> LoopState:
    """One call feeding the root and the first t - 1 drafts of each chain."""
    rows = state.lengths.shape[0]  # Shrinks as rows are compacted.
    keys = keys_of(state)
    offsets = state.positions  # [B]
    if draft.cache is not None:  # The drafter's sub-block cache writes.
      state = state.replace(cache=draft.cache)
    drafts = draft.tokens[:, :, :t - 1]  # [B, C, t-1]
    chains = drafts.shape[1]
    q = None if draft.q is None else draft.q[:, :, :t - 1]
    if tree is not None and q is not None and (
        dynamic or not tree.branches_at_root_only):
      raise ValueError(
          "drafts with q (sampled drafts) verify as a tree only when its "
          "chains share nothing but the root (multi-candidate rejection); "
          f"this drafter's tree is {tree!r}. Ranked (top-r) trees are "
          "deterministic drafts: propose them with q=None.")
    root = state.next_token[:, None]
    if tree is not None:  # [B, C, t]: every chain's tokens, root first.
      full = jnp.concatenate(
          [jnp.broadcast_to(root[:, None], (rows, chains, 1)), drafts], axis=2)
    if tree is None:
      fed = jnp.concatenate([root, drafts[:, 0]], axis=1)  # [B, t]
      positions = offsets[:, None] + jnp.arange(t, dtype=jnp.int32)
      head_fn, cache = tree_call(score_fn, params, fed, positions, state.cache)
      paths = jnp.arange(t, dtype=jnp.int32)[None]  # [1, t]
    elif dynamic:  # Each row's own tree, through a runtime mask.
      rt = draft.tree
      fed = rt.tokens.at[:, 0].set(state.next_token)  # [B, T]
      positions = offsets[:, None] + rt.depths
      head_fn, cache = tree_call(score_fn, params, fed, positions, state.cache,
                                 mask=masks.RuntimeTreeMask(rt.parents))
      paths = rt.paths  # [B, C, t]
    else:
      fed = tree.flatten(full)  # [B, T]
      depths = tuple(tree.depths) + (() if extra is None else extra.depths)
      if extra is not None:
        fed = jnp.concatenate([fed, draft.extra.astype(jnp.int32)], axis=1)
      positions = offsets[:, None] + jnp.asarray(depths, jnp.int32)
      head_fn, cache = tree_call(score_fn, params, fed, positions, state.cache,
                                 mask=tree_mask)
      paths = jnp.asarray(tree.paths, jnp.int32)  # [C, t]
    nodes = (paths.reshape(rows, chains * t) if dynamic else
             jnp.broadcast_to(paths.reshape(1, -1), (rows, chains * t)))
    logits = head_fn(nodes, 1)[:, :, 0].reshape(rows, chains, t, -1)
    extra_logits = None
    if extra is not None:
      extra_nodes = tree.size + jnp.arange(extra.size, dtype=jnp.int32)
      extra_logits = head_fn(jnp.broadcast_to(extra_nodes, (rows, extra.size)),
                             1)[:, :, 0]
    verify_keys = None
    if keys is not None:
      index = state.lengths[:, None] + 1 + jnp.arange(t, dtype=jnp.int32)
      verify_keys = VerifyKeys(
          accept=sampling_lib.token_keys(keys, index[:, :t - 1],
                                         sampling_lib.ACCEPT),
          next=sampling_lib.token_keys(keys, index, sampling_lib.NEXT))
    if tree is not None and (dynamic or tree.padded):
      # A chain's padding repeats its leaf: never accepted (no token is -1),
      # and a rejection there draws from p at the leaf (q = 0).
      real = draft.tree.real if dynamic else jnp.asarray(tree.real)
      drafts = jnp.where(real, drafts, -1)
      if q is not None:
        q = jnp.where(real[..., None], q, 0.0)
    verdict = verifier.verify(drafts, logits, q, sampling, verify_keys)

    # Commit the root and the accepted drafts of the kept chain.
    kept = jnp.take_along_axis(full if tree is not None else fed[:, None],
                               verdict.chain[:, None, None], axis=1)[:, 0]
    count, ended = _cut(kept, verdict.accepted + 1, options.eos_id)
    count = jnp.minimum(count, n - state.lengths)
    active = ~state.done
    count = jnp.where(active, count, 0).astype(jnp.int32)
    tokens = write_rows(state.tokens, kept, state.lengths)
    lengths = state.lengths + count
    done = state.done | (active & ended) | (lengths >= n)
    if dynamic:
      path = jnp.take_along_axis(paths, verdict.chain[:, None, None],
                                 axis=1)[:, 0]  # [B, t]
    else:
      path = paths[jnp.zeros_like(verdict.chain) if tree is None
                   else verdict.chain]  # [B, t]
    if tree is not None:
      cache = compact_fn(cache, offsets[:, None] + path, offsets,
                         offsets + count)
    hist = state.accepted_hist + (
        active[:, None]
        & (jnp.arange(d + 1)[None, :] == count[:, None] - 1))
    policy = state.policy
    if adaptive is not None:
      policy = adaptive.update(policy, verdict.accepted, t, active)
    new = state.replace(
        step=state.step + 1, tokens=tokens, lengths=lengths,
        next_token=jnp.where(active, verdict.next_token, state.next_token),
        done=done, num_calls=(state.num_calls + active * (
            1 if draft.calls is None else 1 + draft.calls)).astype(jnp.int32),
        accepted_hist=hist.astype(jnp.int32), cache=cache, policy=policy)
    # The drafter reads the heads at the last committed node.
    last = jnp.take_along_axis(path, jnp.maximum(count - 1, 0)[:, None],
                               axis=1)  # [B, 1]
    view = _view(new, lambda m: head_fn(last, m)[:, 0], kept, count, offsets,
                 keys, context, extra_logits, score=scorer,
                 features=_features(head_fn, path),
                 extra_tokens=None if extra is None else draft.extra)
    # No drafting round after the last call: once every row is done the
    # loop ends, and a draft model's k draft steps would be thrown away.
    carry = jax.lax.cond(jnp.all(done), lambda c: c,
                         lambda c: drafter.update(c, view), state.drafter)
    return new.replace(drafter=carry)

  def propose(state: LoopState) -> Draft:
    # No heads here: a drafter reads them in update() and keeps what it needs.
    return drafter.propose(state.drafter, _view(
        state, None, None, jnp.zeros_like(state.lengths), state.positions,
        keys_of(state), context, score=scorer, write_score=write_score))

  if adaptive is None:
    def body(state):
      return step(state, propose(state), d + 1)
  else:
    sizes = adaptive.candidate_sizes(d + 1)
    branches = [functools.partial(step, t=t) for t in sizes]

    def body(state):
      draft = propose(state)
      which = adaptive.choose(adaptive.survival(state.policy, draft),
                              ~state.done, d + 1)
      return jax.lax.switch(which, branches, state, draft)

  state = while_loop_compacting(cond, body, state, lambda s: s.done,
                                options.compact_rows)
  return finalize(state, options)


__all__ = ["Context", "Draft", "Drafter", "ExtraNodes", "LoopState",
           "NoDrafter", "View", "run"]
