"""Tokenizers: raw bytes (the default) and byte-level BPE trained with HF `tokenizers`.

Both map text to int32 ids and back, and save themselves into a checkpoint
folder so a checkpoint always carries the tokenizer it was trained with:

  tokenizer_config.json   {"type": "bytes"} or {"type": "bpe", "file": "tokenizer.json"}
                          (+ "encode_special_tokens": true, see below)
  tokenizer.json          the HF tokenizer (BPE only)

    tok = train_bpe(["def f(x):\\n    return x\\n"] * 50, vocab_size=300)
    tok.save(folder)
    assert load_tokenizer(folder).decode(tok.encode("x = 1")) == "x = 1"

Byte-level BPE decodes back to exactly the input text (no normalisation, no
added prefix space), so held-out loss can be reported per byte for either.

`train_bpe(..., special_tokens=("<pad>", "<s>", "</s>"))` reserves ids 0, 1, 2
for those tokens. They are never produced from text: a text that contains
"</s>" encodes as its bytes, not as the special id (HF's
`encode_special_tokens`, which `tokenizer.json` does not store, so the config
file records it), and `decode` leaves special ids out.
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CONFIG_FILE = "tokenizer_config.json"
HF_FILE = "tokenizer.json"
KINDS = ("bytes", "bpe")


class ByteTokenizer:
  """One token per UTF-8 byte; vocabulary 256, no special tokens."""

  kind = "bytes"
  vocab_size = 256

  def encode(self, text: str | bytes) -> np.ndarray:
    """text -> int32 ids [n] (the UTF-8 bytes)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    """ids [n] -> text; invalid UTF-8 (a cut multi-byte char) becomes U+FFFD."""
    return self.decode_bytes(ids).decode("utf-8", errors="replace")

  def decode_bytes(self, ids) -> bytes:
    return np.asarray(ids, np.int64).astype(np.uint8).tobytes()

  def save(self, directory) -> None:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps({"type": "bytes"}) + "\n")


class BPETokenizer:
  """A byte-level BPE `tokenizers.Tokenizer` behind the same interface."""

  kind = "bpe"

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(text).ids, np.int32)

  def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32)
            for e in self.tokenizer.encode_batch(list(texts))]

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def decode_bytes(self, ids) -> bytes:
    return self.decode(ids).encode("utf-8")

  def save(self, directory) -> None:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self.tokenizer.save(str(directory / HF_FILE))
    spec = {"type": "bpe", "file": HF_FILE}
    if self.tokenizer.encode_special_tokens:  # Not kept by tokenizer.json.
      spec["encode_special_tokens"] = True
    (directory / CONFIG_FILE).write_text(json.dumps(spec) + "\n")


def train_bpe(texts: Iterable[str], vocab_size: int,
              min_frequency: int = 2,
              special_tokens: Sequence[str] = ()) -> BPETokenizer:
  """Trains a byte-level BPE on `texts` (e.g. the training split only).

  The 256 byte symbols are always in the vocabulary, so any text encodes;
  `vocab_size` must therefore be at least 257 (256 bytes + one merge), plus
  one per special token. `special_tokens` get ids 0, 1, ... in order and are
  never produced from text (see the module docstring).
  """
  special_tokens = list(special_tokens)
  smallest = 257 + len(special_tokens)
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
      or vocab_size < smallest:
    specials = (f"{len(special_tokens)} special token(s), "
                if special_tokens else "")
    raise ValueError(f"bpe vocab_size={vocab_size!r} must be an int >= "
                     f"{smallest} ({specials}the 256 byte symbols plus at "
                     "least one merge).")
  if len(set(special_tokens)) != len(special_tokens) or "" in special_tokens:
    raise ValueError(f"special_tokens={special_tokens!r} must be distinct "
                     "non-empty strings.")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=special_tokens, show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  if special_tokens:
    tok.encode_special_tokens = True
  return BPETokenizer(tok)


def make_tokenizer(kind: str, texts: Iterable[str] = (),
                   bpe_vocab_size: int = 1024):
  """`kind` "bytes" or "bpe" (trained on `texts`)."""
  if kind == "bytes":
    return ByteTokenizer()
  if kind == "bpe":
    return train_bpe(texts, bpe_vocab_size)
  raise ValueError(f"tokenizer={kind!r} is not supported; allowed: {KINDS}.")


def load_tokenizer(directory):
  """Loads the tokenizer saved in `directory` (see module docstring).

  A folder with only an HF `tokenizer.json` (e.g. an imported checkpoint)
  loads that file.
  """
  directory = pathlib.Path(directory)
  config_path = directory / CONFIG_FILE
  if config_path.exists():
    spec = json.loads(config_path.read_text())
  elif (directory / HF_FILE).exists():
    spec = {"type": "bpe", "file": HF_FILE}
  else:
    raise FileNotFoundError(
        f"no tokenizer in {directory}: expected {CONFIG_FILE} or {HF_FILE}.")
  kind = spec.get("type")
  if kind == "bytes":
    return ByteTokenizer()
  if kind == "bpe":
    path = directory / spec.get("file", HF_FILE)
    if not path.exists():
      raise FileNotFoundError(f"{config_path} names {path}, which is missing.")
    tok = Tokenizer.from_file(str(path))
    if spec.get("encode_special_tokens"):
      tok.encode_special_tokens = True
    return BPETokenizer(tok)
  raise ValueError(f"{config_path} has type={kind!r}; allowed: {KINDS}.")
