"""Decoding methods as hashable specs for `blockdec.decode`.

A spec says who drafts and how drafts are verified; `blockdec.decode` binds
it to the model and runs the draft-and-verify core
(`blockdec/decoding/core.py`). Adding a method is one drafter file under
`blockdec/decoding/drafters/` plus a spec here whose `drafter(...)` builds
it.

    Autoregressive()                      one token per call (greedy, or
                                          ancestral sampling)
    Blockwise(block_size, acceptance,     the model's proposal heads draft
              adaptive, tree)             block_size - 1 tokens per call
                                          (Stern's, or Hydra's dependent
                                          heads one after the other), or a
                                          static token tree
    Refined(block_size, num_drafts, ...)  Kim et al.'s rescored lattice
                                          drafts, several as a token tree
    DraftModel(draft_cfg, draft_params,   a small model drafts
               block_size)                block_size - 1 tokens (speculative
                                          decoding)
    Eagle(block_size, num_drafts, tree)   the model's EAGLE-style drafter
                                          (a decoder layer on the trunk's
                                          features) drafts block_size - 1,
                                          as a chain or a token tree
    PromptLookup(ngram, block_size)       drafts what followed the last
                                          n-gram earlier in the row's text
    Lookahead(window, ngram, guesses)     Jacobi guesses feed an n-gram pool
                                          whose n-grams are verified
    BlockDiffusion(block_size, threshold) the model denoises a block of
                                          [MASK]s (a block-diffusion-adapted
                                          model); verified or not

Specs that hold arrays (an n-gram LM, a rescorer's parameters) keep them out
of their hash and equality; `decode` passes them to the compiled function
as arguments (`arrays()` / `without_arrays()`), so a new n-gram LM of the
same shape does not recompile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from blockdec import validation
from blockdec.config import ModelConfig
from blockdec.decoding import (AcceptAll, AdaptiveBlockSize, DraftOptions,
                               Exact, NGramLM, Verifier)
from blockdec.decoding.core import Drafter, NoDrafter
from blockdec.decoding.lattice import DraftTree, DynamicTree
from blockdec.models import transformer
from blockdec.decoding.drafters import (BlockDiffusionDrafter,
                                        DraftModelDrafter, EagleDrafter,
                                        HeadsDrafter, HydraDrafter,
                                        LookaheadDrafter, PromptLookupDrafter,
                                        RefinedDrafter)


class Method:
  """Base class of the specs (see the module docstring)."""

  acceptance: Verifier = Exact()
  adaptive: AdaptiveBlockSize | None = None
  # Drafts with the model's proposal heads: block_size <= num_prediction_heads.
  reads_heads: bool = False

  def resolve_block_size(self, cfg: ModelConfig) -> int:
    """Tokens fed per call: the root and the drafts of one chain."""
    return 1

  def cache_slots(self, block_size: int) -> int:
    """Target cache slots one call writes past the committed length."""
    return block_size

  def verifier(self, cfg: ModelConfig) -> Verifier:
    """The verifier of this spec on `cfg` (default: `acceptance`)."""
    return self.acceptance

  def check(self, cfg: ModelConfig, sampling, *, positions: int) -> None:
    """Raises a clear error if the spec cannot decode `cfg` (its arrays
    included) with `sampling` up to `positions` positions."""

  def arrays(self) -> Any:
    """The spec's arrays (traced arguments of the compiled decode)."""
    return None

  def without_arrays(self) -> "Method":
    """The spec with its arrays removed (a static argument)."""
    return self

  def arrays_for(self, params, cfg: ModelConfig, block_size: int) -> Any:
    """The traced arguments the drafter gets as `arrays` when decoding
    these weights: `arrays()`, or arrays derived from the weights."""
    del params, cfg, block_size
    return self.arrays()

  def drafter(self, cfg: ModelConfig, block_size: int, arrays: Any, *,
              batch: int, cache_length: int, make_cache, score_fn,
              params) -> Drafter:
    """The drafter, built inside the compiled decode (`params`: the
    target's, traced)."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Autoregressive(Method):
  """One token per model call: greedy decoding, or ancestral sampling."""

  def drafter(self, cfg, block_size, arrays, **kw):
    return NoDrafter()


def _as_ints(spec, *names) -> None:
  """NumPy integers in spec fields become Python ints (hashable, JSON)."""
  for name in names:
    value = getattr(spec, name)
    if validation.is_int(value):
      object.__setattr__(spec, name, int(value))


def _check_block_size(block_size, cfg: ModelConfig | None = None) -> None:
  if block_size is None:
    return
  if isinstance(block_size, bool) or not isinstance(block_size, int) \
      or block_size < 1:
    raise ValueError(f"block_size={block_size!r} must be None (all heads) or "
                     "a positive int.")


@dataclasses.dataclass(frozen=True)
class Blockwise(Method):
  """Blockwise parallel decoding with the model's proposal heads.

  Stern's independent heads (`head_type="stern"`) draft at once from the
  last committed node (`blockdec/decoding/drafters/heads.py`); Hydra's
  dependent heads (`head_type="hydra"`, `configs/heads_hydra.py`) draft one
  after the other, each reading the drafts before it
  (`blockdec/decoding/drafters/hydra.py`).

  Attributes:
    block_size: k in [1, num_prediction_heads]: the decided token plus the
      drafts of heads 2..k; None: all heads.
    acceptance: the verifier: `Exact()` (lossless: greedy output, or
      speculative sampling with `sampling`), `Typical(...)`, or Stern's lossy
      greedy rules `TopK(n)`, `Distance(eps)`, `MinBlock(l)`.
    adaptive: `AdaptiveBlockSize(...)` verifies per call only as many drafts
      as they are likely to pay for; None verifies all of them.
    tree: a static token tree (`blockdec.DraftTree.from_parents(...)`, e.g.
      from `blockdec.tree_shapes.best_tree`) verified in one call: a node of
      rank r at depth j holds head j + 1's r-th likeliest token (Medusa's
      trees; with Hydra heads, given the node's own path). block_size
      defaults to the tree's depth + 1 and must equal it. Drafts are
      deterministic, so sampling stays lossless by matching the target's
      own draws. Or `blockdec.DynamicTree(nodes, top_k)`: each row grows
      its own tree every call from the heads' probabilities (EAGLE-2's
      expansion, block_size - 1 levels; block_size defaults to all heads).
      No adaptive rule; lossless verifiers only.
  """

  block_size: int | None = None
  acceptance: Verifier = Exact()
  adaptive: AdaptiveBlockSize | None = None
  tree: DraftTree | DynamicTree | None = None
  reads_heads = True

  def __post_init__(self):
    _as_ints(self, "block_size")
    _check_block_size(self.block_size)
    _check_tree(self, self.tree, self.block_size)

  def resolve_block_size(self, cfg):
    if isinstance(self.tree, DraftTree):
      return self.tree.depth
    return cfg.num_prediction_heads if self.block_size is None \
        else self.block_size

  def cache_slots(self, block_size):
    return block_size if self.tree is None else self.tree.size

  def check(self, cfg, sampling, *, positions):
    _check_tree_vocab(self.tree, cfg)
    _check_dynamic_tree(self.tree, self.resolve_block_size(cfg))

  def arrays_for(self, params, cfg, block_size):
    """Hydra's slot tables (`transformer.hydra_slot_tables`), built once per
    set of weights; None for Stern's heads or tables past the budget."""
    if cfg.head_type != "hydra":
      return None
    from blockdec import api  # pylint: disable=g-import-not-at-top
    return api._hydra_tables(params, cfg, block_size)  # pylint: disable=protected-access

  def drafter(self, cfg, block_size, arrays, *, params, **kw):
    if cfg.head_type != "hydra":
      return HeadsDrafter(block_size, self.tree)
    model = transformer.Transformer(cfg)
    tables = arrays  # From `arrays_for`: the slot tables, or None.

    def head(h, tokens, j):
      if tables is not None:
        return transformer.hydra_head_from_slots(
            params, cfg, h, tables[f"head_{j}"], tokens, j)
      return model.apply({"params": params}, h, tokens, j,
                         method=transformer.Transformer.hydra_head)

    return HydraDrafter(block_size, head, self.tree)


def _check_tree(spec, tree, block_size) -> None:
  """A spec's `tree`: a DraftTree of depth block_size - 1, no adaptive
  rule, a lossless verifier."""
  if tree is None:
    return
  name = type(spec).__name__
  if not isinstance(tree, (DraftTree, DynamicTree)):
    raise TypeError(f"{name} tree={tree!r} must be None, a "
                    "blockdec.DraftTree (DraftTree.from_parents(parents)) "
                    "or a blockdec.DynamicTree(nodes, top_k).")
  if spec.adaptive is not None:
    raise ValueError(f"the adaptive draft length works on one chain; got "
                     f"{name}(tree=...) with adaptive={spec.adaptive!r}.")
  if not spec.acceptance.lossless:
    raise ValueError(f"{name}(tree=...) verifies with Exact() (lossless); "
                     f"got acceptance={spec.acceptance!r}.")
  if isinstance(tree, DynamicTree):
    return
  if tree.size < 2:
    raise ValueError(f"{name} tree={tree!r} has no drafts; use a chain.")
  if block_size is not None and block_size != tree.depth:
    raise ValueError(f"{name} block_size={block_size} must be the tree's "
                     f"depth + 1 = {tree.depth} (or None).")


def _check_tree_vocab(tree, cfg) -> None:
  width = (tree.top_k if isinstance(tree, DynamicTree) else
           None if tree is None else tree.width)
  if width is not None and width > cfg.vocab_size:
    raise ValueError(f"tree={tree!r} ranks {width} tokens at a node but "
                     f"vocab_size={cfg.vocab_size}.")


def _check_dynamic_tree(tree, block_size: int) -> None:
  """A DynamicTree grows block_size - 1 >= 1 levels holding >= nodes - 1."""
  if not isinstance(tree, DynamicTree):
    return
  depth, k = block_size - 1, tree.top_k
  if depth < 1:
    raise ValueError(f"{tree!r} needs block_size >= 2; got {block_size}.")
  grown = k + (depth - 1) * k * k
  if grown < tree.nodes - 1:
    raise ValueError(f"{tree!r} keeps {tree.nodes - 1} drafted nodes but "
                     f"{depth} levels of top_k={k} grow only {grown}; lower "
                     "nodes or raise top_k or block_size.")


@dataclasses.dataclass(frozen=True)
class Refined(Method):
  """Refined block drafts (Kim et al. 2024): rescored lattice paths.

  The heads' top-`lattice_width` tokens per depth are searched (beam width
  `beam_width`, default `num_drafts`) for the `num_drafts` best paths under
  head log-probs + `ngram_weight` * n-gram log-probs + `rescorer_weight` *
  small-LM log-probs; several drafts are verified in one call as a token
  tree and the longest accepted one is kept. Whatever the drafts, `Exact()`
  keeps the output lossless; with sampling the deterministic drafts are
  matched against the target's own draws (chain or tree).

  Attributes:
    block_size: k (root included); None: all heads.
    num_drafts: p drafts per call.
    lattice_width: K candidates per head.
    beam_width: W >= p, or None (= p).
    ngram: a `blockdec.NGramLM` over the model's vocabulary, or None.
    ngram_weight: its weight.
    rescorer: `(rescorer_cfg, rescorer_params)` of a small blockdec model
      with the same vocabulary, or None.
    rescorer_weight: its weight.
    rescorer_parallel: False: the small LM reads each beam's own prefix
      (k - 2 extra small-LM calls per step); True: the heads' argmax prefix
      from one call per step (cheaper, approximate).
    acceptance, adaptive: as in `Blockwise` (adaptive needs num_drafts=1).
  """

  block_size: int | None = None
  num_drafts: int = 1
  lattice_width: int = 4
  beam_width: int | None = None
  ngram: NGramLM | None = dataclasses.field(default=None, compare=False)
  ngram_weight: float = 1.0
  rescorer: tuple | None = dataclasses.field(default=None, compare=False)
  rescorer_weight: float = 1.0
  rescorer_parallel: bool = False
  acceptance: Verifier = Exact()
  adaptive: AdaptiveBlockSize | None = None
  # Static facts of the stripped arrays (so equal specs compile alike).
  rescorer_cfg: ModelConfig | None = None
  has_ngram: bool = False
  reads_heads = True

  def __post_init__(self):
    _as_ints(self, "block_size", "num_drafts", "lattice_width", "beam_width")
    _check_block_size(self.block_size)
    if self.ngram is not None:
      if not isinstance(self.ngram, NGramLM):
        raise TypeError(f"ngram must be a blockdec.NGramLM, got "
                        f"{type(self.ngram).__name__}.")
      object.__setattr__(self, "has_ngram", True)
    if self.rescorer is not None:
      if not (isinstance(self.rescorer, tuple) and len(self.rescorer) == 2
              and isinstance(self.rescorer[0], ModelConfig)):
        raise TypeError("rescorer must be a (ModelConfig, params) pair, got "
                        f"{type(self.rescorer).__name__}.")
      object.__setattr__(self, "rescorer_cfg", self.rescorer[0])
    # Validates num_drafts, lattice_width and beam_width.
    self.draft_options()

  def resolve_block_size(self, cfg):
    return cfg.num_prediction_heads if self.block_size is None \
        else self.block_size

  def cache_slots(self, block_size):
    return self.draft_options().tree_size(block_size)

  def draft_options(self) -> DraftOptions:
    return DraftOptions(
        num_drafts=self.num_drafts, lattice_width=self.lattice_width,
        beam_width=self.beam_width,
        ngram_weight=float(self.ngram_weight) if self.has_ngram else 0.0,
        neural_weight=(float(self.rescorer_weight)
                       if self.rescorer_cfg is not None else 0.0),
        neural_parallel=bool(self.rescorer_parallel))

  def arrays(self):
    drafts = self.draft_options()
    return (self.ngram if drafts.ngram_weight else None,
            self.rescorer[1] if drafts.neural_weight else None)

  def without_arrays(self):
    return dataclasses.replace(self, ngram=None, rescorer=None,
                               has_ngram=self.has_ngram,
                               rescorer_cfg=self.rescorer_cfg)

  def drafter(self, cfg, block_size, arrays, *, batch, cache_length,
              make_cache, score_fn, **kw):
    from blockdec.decoding import NeuralRescorer  # pylint: disable=g-import-not-at-top
    drafts = self.draft_options()
    ngram, rescorer_params = arrays
    rescorer = None
    if drafts.neural_weight:
      rescorer = NeuralRescorer(
          params=rescorer_params,
          cache=make_cache(self.rescorer_cfg, batch,
                           cache_length + drafts.rescorer_slots(block_size)),
          score_fn=score_fn(self.rescorer_cfg, 1))
    return RefinedDrafter(block_size, drafts, ngram, rescorer)


def _check_positive(spec, name: str) -> None:
  """Checks spec.<name> is an int >= 1 (NumPy ints become Python ints)."""
  object.__setattr__(spec, name, validation.check_int(
      f"{type(spec).__name__} {name}", getattr(spec, name), low=1))


@dataclasses.dataclass(frozen=True)
class DraftModel(Method):
  """Speculative decoding with a small draft model (Leviathan et al. 2023).

  The draft model (any blockdec model with the target's vocabulary, e.g. one
  trained by `configs/draft_model.py` or read with `load_hf_checkpoint`)
  drafts `block_size - 1` tokens one at a time with its own KV cache; one
  target call verifies them. Greedy: exact. With sampling: lossless, q being
  the draft's filtered distribution.

  Attributes:
    draft_cfg: the draft model's `ModelConfig`.
    draft_params: its parameters (passed to the compiled decode as an
      argument: new weights of the same shape do not recompile).
    block_size: k >= 1, the decided token plus k - 1 drafts per call.
    acceptance, adaptive: as in `Blockwise`. The "confidence" estimate
      reads the draft model's probability of each drafted token (greedy:
      its softmax maximum; sampling: q of the drawn token).
    stop_below: None (draft all k - 1 tokens), or a probability in (0, 1):
      a row's draft ends at its first token the draft model gives less
      than this (that token included), and drafting stops once every row
      has ended (transformers' `assistant_confidence_threshold`). The
      draft steps after the end are saved; with `adaptive` the call also
      verifies no token past a row's end. Exact (greedy) and lossless
      (sampling) either way.
    speculative_prefill: True (default): the draft model drafts the first
      k tokens from the prompts alone, and the target's prompt call
      verifies them beside the prompt (`decoding/core.py`), so the first
      round costs k more tokens in the prefill instead of a call of its
      own. It counts as a call in `num_calls` where it commits a token
      (not where its first draft is rejected). False: the first drafts
      follow the token the prefill decides.
  """

  draft_cfg: ModelConfig | None = None
  draft_params: Any = dataclasses.field(default=None, compare=False,
                                        repr=False)
  block_size: int = 4
  acceptance: Verifier = Exact()
  adaptive: AdaptiveBlockSize | None = None
  stop_below: float | None = None
  speculative_prefill: bool = True

  def __post_init__(self):
    if not isinstance(self.speculative_prefill, bool):
      raise TypeError("DraftModel(speculative_prefill="
                      f"{self.speculative_prefill!r}): allowed True or False.")
    if not isinstance(self.draft_cfg, ModelConfig):
      raise TypeError("DraftModel(draft_cfg=...) must be a blockdec."
                      f"ModelConfig, got {type(self.draft_cfg).__name__}.")
    _check_positive(self, "block_size")
    if self.stop_below is not None and not (
        isinstance(self.stop_below, (int, float))
        and not isinstance(self.stop_below, bool)
        and 0.0 < self.stop_below < 1.0):
      raise ValueError(f"DraftModel(stop_below={self.stop_below!r}): allowed "
                       "None or a probability strictly between 0 and 1.")

  def resolve_block_size(self, cfg):
    return self.block_size

  def arrays(self):
    return self.draft_params

  def without_arrays(self):
    return dataclasses.replace(self, draft_params=None)

  def check(self, cfg, sampling, *, positions):
    from blockdec.api import check_params  # pylint: disable=g-import-not-at-top
    if self.draft_params is None:
      raise ValueError("DraftModel(draft_params=None): pass the draft "
                       "model's parameters.")
    check_params(self.draft_params, self.draft_cfg)
    if self.draft_cfg.vocab_size != cfg.vocab_size:
      raise ValueError(f"the draft model's vocab_size="
                       f"{self.draft_cfg.vocab_size} differs from the "
                       f"target's {cfg.vocab_size}; they must share a "
                       "vocabulary.")
    if positions > self.draft_cfg.max_seq_len:
      raise ValueError(f"prompt width + max_new_tokens = {positions} exceeds "
                       f"the draft model's max_seq_len="
                       f"{self.draft_cfg.max_seq_len}.")

  def drafter(self, cfg, block_size, arrays, *, batch, cache_length,
              make_cache, score_fn, **kw):
    return DraftModelDrafter(
        block_size, score_fn(self.draft_cfg, 1), arrays,
        make_cache(self.draft_cfg, batch, cache_length + block_size + 1),
        stop_below=None if self.stop_below is None else float(
            self.stop_below), speculative_prefill=self.speculative_prefill)


@dataclasses.dataclass(frozen=True)
class Eagle(Method):
  """EAGLE-style drafting (Li et al. 2024) with the model's own drafter.

  The model's `eagle` drafter (`cfg.eagle_layers >= 1`, trained on the
  frozen trunk by `configs/eagle.py`) predicts the trunk's next hidden
  state from this one and the next token, and drafts `block_size - 1`
  tokens through the model's own vocabulary projection; one target call
  verifies them. The trunk and head 1 are untouched, so greedy decoding is
  exact and sampling (q = the drafter's filtered distribution) lossless.

  Attributes:
    block_size: k >= 1, the decided token plus k - 1 drafts per chain.
    num_drafts: C >= 1 chains per call. Above 1, C first tokens (the
      drafter's likeliest; with sampling, independent draws) each start a
      chain and all C are verified in one call as a token tree of
      1 + C (k - 1) nodes (no adaptive rule). Greedy keeps the longest
      accepted chain; sampling stays lossless through the verifier's
      multi-candidate rejection.
    acceptance, adaptive: as in `Blockwise` (the adaptive rule uses the
      "history" estimate).
    tree: a static token tree instead of `num_drafts` chains
      (`blockdec.DraftTree.from_parents(...)`, e.g. from
      `blockdec.tree_shapes.best_tree`): a node of rank r holds the
      drafter's r-th likeliest token given its path; block_size defaults to
      the tree's depth + 1 and must equal it. Drafts are ranked under
      sampling too (the verifier matches them against the target's draws).
  """

  block_size: int | None = None
  num_drafts: int = 1
  acceptance: Verifier = Exact()
  adaptive: AdaptiveBlockSize | None = None
  tree: DraftTree | None = None

  def __post_init__(self):
    if isinstance(self.tree, DynamicTree):
      raise ValueError(
          "Eagle drafts static trees only (its drafter steps each chain on "
          "its own cache copy); for a dynamic tree use "
          "blockdec.Blockwise(tree=blockdec.DynamicTree(...)) on Stern or "
          "Hydra heads.")
    if self.block_size is None:
      object.__setattr__(self, "block_size",
                         4 if self.tree is None else self.tree.depth)
    _check_positive(self, "block_size")
    _check_positive(self, "num_drafts")
    if self.num_drafts > 1 and self.block_size < 2:
      raise ValueError(f"Eagle(num_drafts={self.num_drafts}) drafts a tree, "
                       f"which needs block_size >= 2; got {self.block_size}.")
    if self.tree is not None and self.num_drafts > 1:
      raise ValueError(f"Eagle takes num_drafts={self.num_drafts} chains or "
                       "a tree, not both.")
    _check_tree(self, self.tree, self.block_size)

  def resolve_block_size(self, cfg):
    return self.block_size

  def cache_slots(self, block_size):
    if self.tree is not None:
      return self.tree.size
    return 1 + self.num_drafts * (block_size - 1)

  def check(self, cfg, sampling, *, positions):
    _check_tree_vocab(self.tree, cfg)
    if self.num_drafts > 1:
      if self.adaptive is not None:
        raise ValueError("the adaptive draft length works on one chain; got "
                         f"Eagle(num_drafts={self.num_drafts}).")
      if self.num_drafts > cfg.vocab_size:
        raise ValueError(f"Eagle num_drafts={self.num_drafts} exceeds "
                         f"vocab_size={cfg.vocab_size}.")
    if not cfg.eagle_layers:
      raise ValueError("Eagle needs a model with an EAGLE drafter "
                       "(cfg.eagle_layers >= 1, trained by configs/eagle.py); "
                       "this one has eagle_layers=0.")
    if self.adaptive is not None and self.adaptive.estimate != "history":
      raise ValueError("Eagle reports no confidence; use "
                       "AdaptiveBlockSize(estimate='history').")

  def drafter(self, cfg, block_size, arrays, *, batch, cache_length,
              params, **kw):
    model = transformer.Transformer(cfg)

    def step(features, tokens, positions, cache, empty):
      hidden, cache = model.apply({"params": params}, features, tokens,
                                  positions, cache, empty,
                                  method=transformer.Transformer.eagle_step)
      logits = model.apply({"params": params}, hidden,
                           method=transformer.Transformer.vocab_logits)
      return hidden, logits, cache

    return EagleDrafter(block_size, step, transformer.make_eagle_cache(
        cfg, batch, cache_length + block_size + 1), chains=self.num_drafts,
                        tree=self.tree)


@dataclasses.dataclass(frozen=True)
class PromptLookup(Method):
  """Prompt lookup: no model drafts, the row's own text does.

  The last `ngram` tokens (fewer on a miss) are looked up in the row's
  prompt and generated text; what followed the longest, most recent match
  is drafted (`blockdec/decoding/drafters/prompt_lookup.py`). Greedy: exact;
  with sampling: lossless (the drafts count as one-hot q).

  Attributes:
    ngram: the longest n-gram matched, >= 1.
    block_size: k >= 1, the decided token plus k - 1 drafts per call.
    acceptance: as in `Blockwise`.
    adaptive: `AdaptiveBlockSize(...)` verifies drafts only where a match
      of at least `min_match` tokens was found and only as many as survive
      in the row's history; None always verifies k - 1 (filler where
      nothing matched).
    min_match: in [1, ngram]; with `adaptive`, a match shorter than this
      proposes nothing (the row takes a one-token step). One shared token
      predicts little: on the demo model's byte-level code a 1-token match
      kept 0.3 of its drafts per call, a 2-token match 1.7-2.3, a 3-token
      one 6-9 (experiments/results/prompt_lookup_policy.md).
  """

  ngram: int = 3
  block_size: int = 5
  acceptance: Verifier = Exact()
  adaptive: AdaptiveBlockSize | None = None
  min_match: int = 1

  def __post_init__(self):
    _check_positive(self, "ngram")
    _check_positive(self, "block_size")
    object.__setattr__(self, "min_match", validation.check_int(
        "PromptLookup min_match", self.min_match, low=1, high=self.ngram,
        hint=" (at most ngram, the longest match looked up)"))

  def resolve_block_size(self, cfg):
    return self.block_size

  def check(self, cfg, sampling, *, positions):
    if self.adaptive is not None and self.adaptive.estimate != "history":
      raise ValueError("PromptLookup reports no confidence; use "
                       "AdaptiveBlockSize(estimate='history').")

  def drafter(self, cfg, block_size, arrays, **kw):
    return PromptLookupDrafter(self.ngram, block_size, self.min_match)


@dataclasses.dataclass(frozen=True)
class Lookahead(Method):
  """Lookahead decoding (Fu et al. 2024): no draft model, no heads.

  A window of `window` x (`ngram` - 1) Jacobi guesses is refined every call
  and feeds a pool of n-grams; up to `guesses` pooled n-grams that start
  with the decided token are verified in the same call, as a token tree
  beside the window (`blockdec/decoding/drafters/lookahead.py`). Greedy:
  exact. With sampling: lossless (the guesses are matched against the
  target's own draws).

  Attributes:
    window: W >= 1 guesses per level.
    ngram: N >= 2, the n-gram length (N - 1 drafts per guess).
    guesses: G >= 1 n-grams verified per call.
    pool_size: distinct n-grams kept per row (oldest overwritten).
    acceptance: as in `Blockwise`.
  """

  window: int = 5
  ngram: int = 4
  guesses: int = 5
  pool_size: int = 64
  acceptance: Verifier = Exact()

  def __post_init__(self):
    for name in ("window", "guesses", "pool_size"):
      _check_positive(self, name)
    object.__setattr__(self, "ngram", validation.check_int(
        "Lookahead ngram", self.ngram, low=2))

  def resolve_block_size(self, cfg):
    return self.ngram

  def cache_slots(self, block_size):
    return self._drafter().cache_slots

  def _drafter(self) -> LookaheadDrafter:
    return LookaheadDrafter(self.window, self.ngram, self.guesses,
                            self.pool_size)

  def check(self, cfg, sampling, *, positions):
    reach = positions + self.ngram + self.window
    if cfg.position == "learned" and reach > cfg.max_seq_len:
      raise ValueError(f"Lookahead's window reaches position {reach} (prompt "
                       "width + max_new_tokens + ngram + window), past the "
                       f"model's learned max_seq_len={cfg.max_seq_len}.")

  def drafter(self, cfg, block_size, arrays, **kw):
    return self._drafter()


@dataclasses.dataclass(frozen=True)
class BlockDiffusion(Method):
  """Block diffusion with a model adapted for it (`configs/block_diffusion.py`).

  Each block of `block_size` tokens starts as [MASK]s; every denoising call
  (the model with `BlockBidirectionalMask`, attending causally to the
  committed cache) decides the masked positions whose confidence reaches
  `threshold` (at least one), until the block is decided
  (`blockdec/decoding/drafters/block_diffusion.py`). Then one causal call
  writes the block's keys and values and decides the token after it.

  Attributes:
    block_size: b >= 1 tokens per block (b + 1 are fed in the causal call).
    threshold: in [0, 1]; 1.0 decides one position per denoising call.
    acceptance: None (the default): the diffusion draft is the output
      (`AcceptAll`; lossy: not the model's autoregressive output).
      `Exact()`: self-speculative, the model in autoregressive mode
      verifies its own draft; the output is its greedy output token for
      token (with sampling, lossless speculative sampling). Any other
      verifier applies as for `Blockwise`.
    stop_token: AdaBlock-style adaptive block size: a block ends after the
      first decided `stop_token` (e.g. the newline's id) once the positions
      before it are decided. None: fixed blocks.
    next_block_guesses: r >= 0; with a verifier that rejects (`Exact()`,
      or a lossy one such as `Typical(...)`), the verification call also
      denoises the next block for each number of accepted drafts and each
      of the denoiser's r runner-ups there as the next token (fused
      drafting, b * r * b extra nodes per call); a row whose next token was
      guessed starts its next block with that denoising step done, one
      call fewer. A tuple (r_0, r_1, ..) gives r_a guesses after a
      accepted drafts (at most b entries; the rest 0): spend them where
      blocks end (on the demo adaptation at b = 8, (0, 3, 2, 1) reaches
      r = 2's tokens per call with 6 groups instead of 16;
      experiments/results/block_diffusion_corpus.md). 0 (default): off. The
      output is the unfused run's with the same verifier.
    order: which undecided positions a denoising call may decide.
      "confidence" (default; Fast-dLLM): any position at or above the
      threshold, and at least the most confident one. "left_to_right":
      only a run of such positions that starts at the first undecided one,
      and at least that first one, so the block fills as a prefix, in the
      order the autoregressive head reads it (as semi-autoregressive
      block decoders do); threshold 1.0 then decides one token per call,
      left to right.
    sub_block_size: s in [1, block_size], or None (default: off). The
      sub-block cache (as Fast-dLLM v2's, but exact): once a row's decided
      tokens cover whole sub-blocks of s at the start of the block, those
      positions attend causally, like committed text, and their keys and
      values are cached instead of recomputed; a denoising call then feeds
      only the rest of the block (ceil(b / s) compiled widths). Reading the
      cache equals recomputing (tested); the causal rule for decided
      sub-blocks is what changes the output against s = None
      (experiments/results/block_diffusion.md). s = block_size: off.

  Calls counted in `DecodeOutput.num_calls`: the denoising calls and the
  causal call.
  """

  block_size: int = 8
  threshold: float = 0.9
  acceptance: Verifier | None = None
  stop_token: int | None = None
  next_block_guesses: int | tuple[int, ...] = 0
  order: str = "confidence"
  sub_block_size: int | None = None

  def __post_init__(self):
    _check_positive(self, "block_size")
    object.__setattr__(self, "sub_block_size", validation.check_int(
        "BlockDiffusion sub_block_size", self.sub_block_size, low=1,
        high=self.block_size, optional=True))
    if self.order not in BlockDiffusionDrafter.ORDERS:
      raise ValueError(f"BlockDiffusion order={self.order!r}; allowed: "
                       f"{BlockDiffusionDrafter.ORDERS}.")
    object.__setattr__(self, "threshold", validation.check_number(
        "BlockDiffusion threshold", self.threshold, low=0.0, high=1.0))
    object.__setattr__(self, "stop_token", validation.check_int(
        "BlockDiffusion stop_token", self.stop_token, low=0, optional=True))
    r = self.next_block_guesses
    if isinstance(r, (tuple, list)):
      r = tuple(validation.check_int(
          f"BlockDiffusion next_block_guesses[{a}]", x, low=0)
          for a, x in enumerate(r))
      if len(r) > self.block_size:
        raise ValueError(
            f"BlockDiffusion next_block_guesses={r} has {len(r)} entries; "
            f"at most block_size={self.block_size} (one per accepted length "
            f"0..{self.block_size - 1}).")
    else:
      r = validation.check_int("BlockDiffusion next_block_guesses", r, low=0)
    object.__setattr__(self, "next_block_guesses", r)
    if self._guesses_per_length() and self.acceptance is None:
      raise ValueError(
          f"BlockDiffusion next_block_guesses={self.next_block_guesses} "
          "needs a verifier that can reject drafts (acceptance=Exact(), "
          "or a lossy rule such as Typical(...)): "
          "with the default (every draft kept) no guessed block is used.")

  def resolve_block_size(self, cfg):
    return self.block_size + 1

  def _guesses_per_length(self) -> tuple[int, ...]:
    """(r_0, .., r_{b-1}), or () when fused drafting is off."""
    r = self.next_block_guesses
    r = (r,) * self.block_size if isinstance(r, int) else r
    return r if any(r) else ()

  def cache_slots(self, block_size):
    b = self.block_size
    return b + 1 + sum(self._guesses_per_length()) * b

  def _mask_id(self, cfg: ModelConfig) -> int:
    if cfg.mask_token_id is None:
      raise ValueError(
          "BlockDiffusion needs a model adapted for block diffusion "
          "(ModelConfig.mask_token_id is None); adapt one with "
          "configs/block_diffusion.py.")
    return cfg.mask_token_id

  def verifier(self, cfg):
    if self.acceptance is None:
      return AcceptAll(stop_id=self._mask_id(cfg))
    return self.acceptance

  def check(self, cfg, sampling, *, positions):
    mask_id = self._mask_id(cfg)
    if self.stop_token is not None and self.stop_token >= cfg.vocab_size:
      raise ValueError(f"BlockDiffusion stop_token={self.stop_token} is "
                       f"outside the vocabulary [0, {cfg.vocab_size}).")
    if self.stop_token == mask_id:
      raise ValueError(f"BlockDiffusion stop_token={self.stop_token} is the "
                       "model's [MASK] token.")
    guesses = self._guesses_per_length()
    if guesses and max(guesses) + 2 > cfg.vocab_size:
      raise ValueError(
          f"BlockDiffusion next_block_guesses={self.next_block_guesses}: at "
          f"most {cfg.vocab_size - 2} runner-ups exist in a vocabulary of "
          f"{cfg.vocab_size} with a [MASK].")
    reach = positions + 2 * self.block_size
    if (guesses and cfg.position == "learned"
        and reach > cfg.max_seq_len):
      raise ValueError(
          f"BlockDiffusion with next_block_guesses denoises the next block "
          f"up to position {reach} (prompt width + max_new_tokens + 2 * "
          f"block_size), past the model's learned max_seq_len="
          f"{cfg.max_seq_len}.")

  def drafter(self, cfg, block_size, arrays, **kw):
    return BlockDiffusionDrafter(self.block_size, self.threshold,
                                 self._mask_id(cfg), self.stop_token,
                                 self._guesses_per_length(), self.order,
                                 self.sub_block_size)
