"""Corpora, deterministic splits, packing and reproducible batches.

A corpus is a list of `Document`s read from one or more sources:

  "stdlib"            the running interpreter's standard library `.py` files
                      (`sysconfig.get_paths()["stdlib"]`), without `test/`,
                      `tests/`, `idlelib/`, `site-packages/` and caches;
  a file              read as one document;
  a folder            every regular file below it (`*.py` by default);
  a glob              e.g. "src/**/*.py" (recursive `**` allowed).

`sources` is a list of those or one comma-separated string
("stdlib,notes/*.md"). Every document has a stable `name` (the path relative to
its source), and `split_of(name)` assigns it to train / valid / test from a
hash of the name alone: the split does not depend on the machine, the order
files are listed in, or which other files exist.

Batches are reproducible by construction: batch `i` of epoch `e` is a pure
function of (seed, e, i), so a resumed run sees exactly the batches an
uninterrupted run would have seen.

    docs = load_corpus("stdlib")
    splits = split_corpus(docs)
    stream = token_stream(splits["train"], ByteTokenizer())
    batches = CorpusBatches(stream, seq_len=256, batch_size=16, seed=0)
    batch = batches.batch(step)   # {"tokens": [16, 257], "mask": [16, 257]}
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import pathlib
import sysconfig
from typing import Sequence

import numpy as np

SPLITS = ("train", "valid", "test")
_STDLIB_EXCLUDE = frozenset({"test", "tests", "idlelib", "site-packages",
                             "__pycache__", "dist-packages"})


@dataclasses.dataclass(frozen=True)
class Document:
  name: str  # Stable id, e.g. "stdlib/json/decoder.py"; decides the split.
  text: str


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[tuple[str, pathlib.Path]]:
  root = stdlib_root()
  if not root.is_dir():
    raise FileNotFoundError(f"the standard library folder {root} is missing.")
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDE)
    for f in sorted(filenames):
      if f.endswith(".py"):
        path = pathlib.Path(dirpath) / f
        out.append(("stdlib/" + path.relative_to(root).as_posix(), path))
  return out


def _source_files(source: str, pattern: str) -> list[tuple[str, pathlib.Path]]:
  if source == "stdlib":
    return _stdlib_files()
  path = pathlib.Path(source).expanduser()
  if path.is_file():
    return [(path.name, path)]
  if path.is_dir():
    return [(p.relative_to(path).as_posix(), p)
            for p in sorted(path.rglob(pattern)) if p.is_file()]
  if glob.has_magic(source):
    matches = sorted(pathlib.Path(p) for p in glob.glob(os.path.expanduser(source),
                                                        recursive=True))
    base = pathlib.Path(os.path.expanduser(source.split("*")[0].split("?")[0]
                                           .split("[")[0])).parent
    return [(os.path.relpath(p, base).replace(os.sep, "/"), p)
            for p in matches if p.is_file()]
  raise FileNotFoundError(
      f"corpus source {source!r} is not 'stdlib', an existing file or folder, "
      "or a glob pattern.")


def parse_sources(sources: str | Sequence[str]) -> list[str]:
  if isinstance(sources, str):
    sources = [s.strip() for s in sources.split(",")]
  sources = [s for s in sources if s]
  if not sources:
    raise ValueError("no corpus sources given; use 'stdlib' or name files, "
                     "folders or globs.")
  return list(sources)


def load_corpus(sources: str | Sequence[str] = "stdlib", *,
                pattern: str = "*.py") -> list[Document]:
  """Reads every document of `sources` (see module docstring) as UTF-8 text.

  Args:
    sources: a list of sources or one comma-separated string.
    pattern: the file pattern used inside folders.

  Raises:
    FileNotFoundError: a source does not exist.
    ValueError: a source holds no files, a file is not UTF-8 text, or every
      file is empty.
  """
  docs, seen = [], set()
  for source in parse_sources(sources):
    files = _source_files(source, pattern)
    if not files:
      raise ValueError(f"corpus source {source!r} matches no files"
                       + ("" if source == "stdlib" else f" (pattern {pattern!r})")
                       + ".")
    for name, path in files:
      if name in seen:
        continue
      seen.add(name)
      try:
        text = path.read_bytes().decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {path} is not UTF-8 text ({e}); remove "
                         "it from the sources or convert it.") from None
      except OSError as e:
        raise ValueError(f"corpus file {path} cannot be read: {e}") from None
      if text:
        docs.append(Document(name, text))
  if not docs:
    raise ValueError(f"corpus {sources!r} is empty: every file has 0 bytes.")
  return docs


def split_of(name: str, valid_fraction: float = 0.02,
             test_fraction: float = 0.02) -> str:
  """"train", "valid" or "test" from a stable hash of the document name."""
  u = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8],
                     "big") / 2.0**64
  if u < valid_fraction:
    return "valid"
  if u < valid_fraction + test_fraction:
    return "test"
  return "train"


def check_split_fractions(valid_fraction: float, test_fraction: float):
  """Raises ValueError unless both are in [0, 1) and sum to less than 1."""
  for name, value in (("valid_fraction", valid_fraction),
                      ("test_fraction", test_fraction)):
    if not 0.0 <= value < 1.0:
      raise ValueError(f"{name}={value!r} must be in [0, 1).")
  if valid_fraction + test_fraction >= 1.0:
    raise ValueError(f"valid_fraction + test_fraction = "
                     f"{valid_fraction + test_fraction} must be < 1.")


def split_corpus(docs: Sequence[Document], valid_fraction: float = 0.02,
                 test_fraction: float = 0.02) -> dict[str, list[Document]]:
  """Splits by document; raises if train or valid ends up empty."""
  check_split_fractions(valid_fraction, test_fraction)
  splits = {s: [] for s in SPLITS}
  for d in docs:
    splits[split_of(d.name, valid_fraction, test_fraction)].append(d)
  for s in ("train", "valid"):
    if not splits[s]:
      raise ValueError(
          f"the {s} split is empty: {len(docs)} document(s) split by a hash of "
          f"their names with valid_fraction={valid_fraction}, "
          f"test_fraction={test_fraction}. Add files or change the fractions.")
  return splits


def token_stream(docs: Sequence[Document], tokenizer) -> np.ndarray:
  """Concatenated token ids [n] (int32) of `docs` in order."""
  if not docs:
    return np.zeros((0,), np.int32)
  return np.concatenate(tokenizer.encode_many([d.text for d in docs])
                        ).astype(np.int32)


def _check_batching(seq_len, batch_size):
  for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive integer.")


class CorpusBatches:
  """Packs a token stream into [batch_size, seq_len + 1] training batches.

  Each epoch starts packing at an offset in [0, seq_len] and visits the packed
  sequences in a permutation, both drawn from `np.random.default_rng([seed,
  epoch])`, so different epochs see different cuts and orders, and
  `batch(step)` needs no state. Rows hold `seq_len + 1` tokens: inputs are the
  first `seq_len`, targets the rest (losses.head_targets).
  """

  def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int,
               seed: int = 0):
    _check_batching(seq_len, batch_size)
    self.stream = np.asarray(stream, np.int32)
    self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
    width = seq_len + 1
    # Sequences per epoch, the same for every offset.
    self.num_sequences = max(0, (len(self.stream) - seq_len) // width)
    if self.num_sequences < batch_size:
      raise ValueError(
          f"the training stream has {len(self.stream)} tokens: "
          f"{self.num_sequences} sequence(s) of seq_len + 1 = {width}, fewer "
          f"than batch_size={batch_size}. Use a larger corpus or smaller "
          "seq_len / batch_size.")
    self.steps_per_epoch = self.num_sequences // batch_size
    self._epoch, self._order = None, None

  def _epoch_plan(self, epoch):
    if epoch != self._epoch:
      rng = np.random.default_rng([self.seed, epoch])
      offset = int(rng.integers(0, self.seq_len + 1))
      self._order = (offset, rng.permutation(self.num_sequences))
      self._epoch = epoch
    return self._order

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """{"tokens": int32 [B, S+1], "mask": float32 [B, S+1]} for global `step`."""
    epoch, i = divmod(int(step), self.steps_per_epoch)
    offset, order = self._epoch_plan(epoch)
    rows = order[i * self.batch_size:(i + 1) * self.batch_size]
    width = self.seq_len + 1
    starts = offset + rows * width
    tokens = self.stream[starts[:, None] + np.arange(width)[None, :]]
    return {"tokens": tokens, "mask": np.ones(tokens.shape, np.float32)}


class ZippedBatches:
  """Two batch sources stepped together.

  `batch(step)` is `first.batch(step)` plus `second.batch(step)` with its
  keys prefixed (`prefix + key`): e.g. distilled rows for one loss and
  corpus rows for another in the same optimizer step. Each source keeps its
  own epochs, so the pair is as deterministic in `step` as its parts.
  """

  def __init__(self, first, second, prefix: str):
    self.first, self.second, self.prefix = first, second, prefix

  def batch(self, step: int) -> dict[str, np.ndarray]:
    out = dict(self.first.batch(step))
    out.update({self.prefix + k: v for k, v in self.second.batch(step).items()})
    return out


class ArrayBatches:
  """Batches from fixed sequences [N, S] with target masks [N, S].

  Used for distillation data (a corpus prefix + the model's continuation,
  mask = 1 on the continuation). Epoch `e` visits the rows in the permutation
  `default_rng([seed, e])`. `extra`: more per-row arrays [N, ...] that
  each batch carries beside its rows under their keys (the frozen trunk's
  states of the rows, `Trainer.frozen_trunk_features`).
  """

  def __init__(self, tokens: np.ndarray, mask: np.ndarray, batch_size: int,
               seed: int = 0, extra: dict[str, np.ndarray] | None = None):
    _check_batching(tokens.shape[1] if tokens.ndim == 2 else 0, batch_size)
    if tokens.shape != mask.shape:
      raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} differ.")
    if tokens.shape[0] < batch_size:
      raise ValueError(f"{tokens.shape[0]} sequences are fewer than "
                       f"batch_size={batch_size}.")
    self.tokens = np.asarray(tokens, np.int32)
    self.mask = np.asarray(mask, np.float32)
    self.extra = dict(extra or {})
    for key, value in self.extra.items():
      if key in ("tokens", "mask") or len(value) != len(self.tokens):
        raise ValueError(f"extra[{key!r}] has {len(value)} rows; it needs a "
                         f"key other than 'tokens' and 'mask' and "
                         f"{len(self.tokens)} rows, one per sequence.")
    self.batch_size, self.seed = batch_size, seed
    self.steps_per_epoch = tokens.shape[0] // batch_size
    self._epoch, self._order = None, None

  def batch(self, step: int) -> dict[str, np.ndarray]:
    epoch, i = divmod(int(step), self.steps_per_epoch)
    if epoch != self._epoch:
      self._order = np.random.default_rng([self.seed, epoch]).permutation(
          self.tokens.shape[0])
      self._epoch = epoch
    rows = self._order[i * self.batch_size:(i + 1) * self.batch_size]
    return {"tokens": self.tokens[rows], "mask": self.mask[rows],
            **{key: value[rows] for key, value in self.extra.items()}}


def eval_batches(stream: np.ndarray, seq_len: int, batch_size: int,
                 max_batches: int) -> list[dict[str, np.ndarray]]:
  """Held-out batches: the stream cut from its start, in order, no shuffling.

  The last batch is padded with mask-0 rows, so every batch has the same
  shape (one compilation). Raises if the stream is shorter than one sequence.
  """
  _check_batching(seq_len, batch_size)
  width = seq_len + 1
  n = min(len(stream) // width, batch_size * max_batches)
  if n < 1:
    raise ValueError(f"the held-out stream has {len(stream)} tokens, fewer than "
                     f"seq_len + 1 = {width}; add held-out files or lower "
                     "seq_len.")
  tokens = np.asarray(stream[:n * width], np.int32).reshape(n, width)
  out = []
  for start in range(0, n, batch_size):
    rows = tokens[start:start + batch_size]
    mask = np.ones(rows.shape, np.float32)
    pad = batch_size - rows.shape[0]
    if pad:
      rows = np.concatenate([rows, np.zeros((pad, width), np.int32)])
      mask = np.concatenate([mask, np.zeros((pad, width), np.float32)])
    out.append({"tokens": rows, "mask": mask})
  return out


def heldout_prompts(docs: Sequence[Document], num: int, *, min_bytes: int = 128,
                    max_bytes: int = 256, seed: int = 0) -> list[str]:
  """`num` prompts cut from `docs` at line boundaries (for decoding demos).

  Each prompt starts at the beginning of a line and ends after a newline,
  holding between `min_bytes` and `max_bytes` UTF-8 bytes. Documents are
  visited in a seeded order, one prompt per document while possible.
  """
  rng = np.random.default_rng(seed)
  prompts = []
  order = rng.permutation(len(docs)) if docs else []
  for _ in range(4):  # Passes over the documents.
    for d in (docs[i] for i in order):
      data = d.text.encode("utf-8")
      starts = [0] + [i + 1 for i, c in enumerate(data) if c == 10][:-1]
      rng_starts = rng.permutation(len(starts))[:8]
      for s in (starts[j] for j in rng_starts):
        end = data.rfind(b"\n", s, s + max_bytes)
        if end - s + 1 >= min_bytes:
          try:
            prompts.append(data[s:end + 1].decode("utf-8"))
          except UnicodeDecodeError:
            continue
          break
      if len(prompts) == num:
        return prompts
  raise ValueError(f"could cut only {len(prompts)} of {num} prompts of "
                   f"{min_bytes}..{max_bytes} bytes from {len(docs)} documents.")
