"""Translation as a training task: gettext pairs for an encoder-decoder.

The trainer (`training/train.py`) runs a config whose `data.kind` is
"translation" on sentence pairs instead of an LM token stream. This module
turns the installed gettext catalogs (`gettext_corpus.load_pairs`) into what
the trainer consumes:

  batches   {"tokens": target [B, T+1] (BOS, y, EOS, PAD...), "mask" [B,
            T+1] (1 at y and EOS: the tokens the heads predict), "source"
            [B, S], "source_lengths" [B]}; head j at target position t is
            trained on token t + j, exactly as for an LM (losses.head_targets),
            with the decoder cross-attending to the source.
  eval      in-order batches of the valid split (the last one padded with
            rows whose mask is 0), so every pair is scored once.
  distill   sequence-level knowledge distillation (Stern et al. sec. 6.1):
            the base's greedy translations of training sources replace the
            references (cut at the length budget when they run on), cached
            on disk by the base's weights.

The shared BPE vocabulary (ids 0, 1, 2 = PAD, BOS, EOS) is trained on both
sides of the training split by the base run and saved with every checkpoint.
"""

from __future__ import annotations

import hashlib
import pathlib

import jax
import numpy as np
from tqdm.auto import tqdm

from blockdec import api
from blockdec.training import gettext_corpus as corpus

PAD_ID, BOS_ID, EOS_ID = corpus.PAD_ID, corpus.BOS_ID, corpus.EOS_ID


def batch_of(sources, source_lengths, targets, target_lengths) -> dict:
  """The trainer's batch dict from encoded rows (see module docstring)."""
  t = targets.shape[1]
  mask = ((np.arange(t)[None, :] >= 1)
          & (np.arange(t)[None, :] <= target_lengths[:, None]))
  return {"tokens": targets.astype(np.int32),
          "mask": mask.astype(np.float32),
          "source": sources.astype(np.int32),
          "source_lengths": np.maximum(source_lengths, 1).astype(np.int32)}


class _Batches:
  """`PairBatches` in the trainer's batch format (deterministic per step)."""

  def __init__(self, encoded: corpus.EncodedPairs, batch_size: int, seed: int,
               bucket: int | None):
    self._pairs = corpus.PairBatches(encoded, batch_size, seed, bucket)

  def batch(self, step: int) -> dict:
    b = self._pairs.batch(step)
    return batch_of(b["source"], b["source_lengths"], b["target"],
                    b["target_lengths"])


class TranslationTask:
  """One language pair's splits, vocabulary and encoded arrays.

  Args:
    data: the config's `data` block: src_lang, tgt_lang, locale_dir ("" =
      /usr/share/locale), bpe_vocab_size, max_source_len, max_target_len,
      valid_fraction, test_fraction, eval_batches, bucket (training batches
      of similar lengths, cut to multiples of it; 0 = pad to the maxima).
    tokenizer: the run's tokenizer (a resumed run or a head regime reuses
      the base's); None trains the shared BPE on the training split.
  """

  def __init__(self, data, tokenizer=None):
    self.data = data
    self.splits = corpus.load_pairs(
        data.src_lang, data.tgt_lang,
        data.get("locale_dir") or corpus.DEFAULT_LOCALE_DIR,
        valid_fraction=data.valid_fraction, test_fraction=data.test_fraction)
    if tokenizer is None:
      tokenizer = corpus.train_translation_bpe(
          [(p.source, p.target) for p in self.splits.train],
          data.bpe_vocab_size)
    self.tokenizer = tokenizer
    self.encoded = {name: self.encode(self.splits.split(name))
                    for name in ("train", "valid", "test")}
    valid = self.encoded["valid"]
    texts = [self.splits.valid[i].target for i in valid.indices]
    tokens = int(valid.target_lengths.sum())
    self.bytes_per_token = (sum(len(t.encode("utf-8")) for t in texts)
                            / max(tokens, 1))

  def encode(self, pairs) -> corpus.EncodedPairs:
    return corpus.encode_pairs(self.tokenizer,
                               [(p.source, p.target) for p in pairs],
                               self.data.max_source_len,
                               self.data.max_target_len)

  @property
  def seq_len(self) -> int:
    """Target positions a model must hold: BOS + max_target_len (y, EOS)."""
    return self.data.max_target_len + 1

  def train_batches(self, batch_size: int, seed: int,
                    encoded: corpus.EncodedPairs | None = None):
    return _Batches(encoded or self.encoded["train"], batch_size, seed,
                    self.data.get("bucket", 16) or None)

  def eval_batches(self, batch_size: int, num_batches: int) -> list[dict]:
    """In-order valid batches (at most `num_batches`), every pair once."""
    e = self.encoded["valid"]
    out = []
    for start in range(0, min(len(e), batch_size * num_batches), batch_size):
      rows = np.arange(start, start + batch_size)
      real = rows < len(e)
      rows = np.where(real, rows, 0)
      batch = batch_of(e.sources[rows], e.source_lengths[rows],
                       e.targets[rows], e.target_lengths[rows])
      batch["mask"] = batch["mask"] * real[:, None]
      out.append(batch)
    return out

  def distill(self, params, cfg, *, num_sequences: int, batch_size: int,
              cache_dir, seed: int, progress: bool = True,
              decode_fn=None) -> corpus.EncodedPairs:
    """Training pairs whose targets are the base's greedy translations.

    `num_sequences` training sources (drawn with `seed`) are translated
    greedily by the base (`decode_fn(params, cfg, sources, lengths, n)` ->
    DecodeOutput; default `blockdec.greedy_decode` with EOS). Cached as .npz
    under `cache_dir`, keyed by the base's weights and the settings.
    """
    train = self.encoded["train"]
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(train), min(num_sequences, len(train)),
                              replace=False))
    n = self.data.max_target_len  # y and EOS.
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params):
      digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    digest.update(repr((cfg, rows.tolist(), n)).encode())
    path = pathlib.Path(cache_dir) / f"translation_{digest.hexdigest()[:16]}.npz"
    if path.exists():
      with np.load(path) as f:
        tokens, lengths = f["tokens"], f["lengths"]
    else:
      if decode_fn is None:
        decode_fn = lambda p, c, s, l, m: api.greedy_decode(
            p, c, np.full((len(s), 1), BOS_ID, np.int32),
            np.ones(len(s), np.int32), max_new_tokens=m, eos_id=EOS_ID,
            source=s, source_lengths=l)
      tokens = np.zeros((len(rows), n), np.int32)
      lengths = np.zeros(len(rows), np.int32)
      for start in tqdm(range(0, len(rows), batch_size), disable=not progress,
                        desc="distill: greedy translations", unit="batch"):
        part = rows[start:start + batch_size]
        out = decode_fn(params, cfg, train.sources[part],
                        train.source_lengths[part], n)
        tokens[start:start + len(part)] = np.asarray(out.tokens)
        lengths[start:start + len(part)] = np.asarray(out.lengths)
      path.parent.mkdir(parents=True, exist_ok=True)
      np.savez(path, tokens=tokens, lengths=lengths)
    # A translation that did not reach EOS within the budget is kept as the
    # base wrote it (its first n tokens, no EOS): it is still the teacher's.
    targets = np.full((len(rows), n + 1), PAD_ID, np.int32)
    targets[:, 0] = BOS_ID
    targets[:, 1:] = np.where(np.arange(n)[None] < lengths[:, None], tokens,
                              PAD_ID)
    return corpus.EncodedPairs(
        sources=train.sources[rows], source_lengths=train.source_lengths[rows],
        targets=targets, target_lengths=lengths.astype(np.int32),
        indices=train.indices[rows], num_dropped=0)

