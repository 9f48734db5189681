"""Decoding methods as hashable specs for `blockdec.decode`.

A spec says who drafts and how drafts are verified; `blockdec.decode` binds
it to the model and runs the draft-and-verify core
(`blockdec/decoding/core.py`). Adding a method is one drafter file under
`blockdec/decoding/drafters/` plus a spec here whose `drafter(...)` builds
it.

    Autoregressive()                      one token per call (greedy, or
                                          ancestral sampling)
    Blockwise(block_size, acceptance,     Stern et al.'s heads draft
              adaptive)                   block_size - 1 tokens per call
    Refined(block_size, num_drafts, ...)  Kim et al.'s rescored lattice
                                          drafts, several as a token tree

Specs that hold arrays (an n-gram LM, a rescorer's parameters) keep them out
of their hash and equality; `decode` passes them to the compiled function
as arguments (`arrays()` / `without_arrays()`), so a new n-gram LM of the
same shape does not recompile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from blockdec.config import ModelConfig
from blockdec.decoding import (AdaptiveBlockSize, DraftOptions, Exact,
                               NGramLM, Verifier)
from blockdec.decoding.core import Drafter, NoDrafter
from blockdec.decoding.drafters import HeadsDrafter, RefinedDrafter


class Method:
  """Base class of the specs (see the module docstring)."""

  acceptance: Verifier = Exact()
  adaptive: AdaptiveBlockSize | None = None
  # Drafts with the model's proposal heads: block_size <= num_prediction_heads.
  reads_heads: bool = False

  def resolve_block_size(self, cfg: ModelConfig) -> int:
    """Tokens fed per call: the root and the drafts of one chain."""
    return 1

  def arrays(self) -> Any:
    """The spec's arrays (traced arguments of the compiled decode)."""
    return None

  def without_arrays(self) -> "Method":
    """The spec with its arrays removed (a static argument)."""
    return self

  def drafter(self, cfg: ModelConfig, block_size: int, arrays: Any, *,
              batch: int, cache_length: int, make_cache, score_fn) -> Drafter:
    """The drafter, built inside the compiled decode."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Autoregressive(Method):
  """One token per model call: greedy decoding, or ancestral sampling."""

  def drafter(self, cfg, block_size, arrays, **kw):
    return NoDrafter()


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

  Attributes:
    block_size: k in [1, num_prediction_heads]: the decided token plus the
      drafts of heads 2..k; None: all heads.
    acceptance: the verifier: `Exact()` (lossless: greedy output, or
      speculative sampling with `sampling`), `Typical(...)`, or Stern's lossy
      greedy rules `TopK(n)`, `Distance(eps)`, `MinBlock(l)`.
    adaptive: `AdaptiveBlockSize(...)` verifies per call only as many drafts
      as they are likely to pay for; None verifies all of them.
  """

  block_size: int | None = None
  acceptance: Verifier = Exact()
  adaptive: AdaptiveBlockSize | None = None
  reads_heads = True

  def __post_init__(self):
    _check_block_size(self.block_size)

  def resolve_block_size(self, cfg):
    return cfg.num_prediction_heads if self.block_size is None \
        else self.block_size

  def drafter(self, cfg, block_size, arrays, **kw):
    return HeadsDrafter(block_size)


@dataclasses.dataclass(frozen=True)
class Refined(Method):
  """Refined block drafts (Kim et al. 2024): rescored lattice paths.

  The heads' top-`lattice_width` tokens per depth are searched (beam width
  `beam_width`, default `num_drafts`) for the `num_drafts` best paths under
  head log-probs + `ngram_weight` * n-gram log-probs + `rescorer_weight` *
  small-LM log-probs; several drafts are verified in one call as a token
  tree and the longest accepted one is kept. Whatever the drafts, `Exact()`
  keeps the output lossless; with sampling only one draft per call
  (`num_drafts=1`) is supported.

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
              make_cache, score_fn):
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
