"""Corpus loading, splits, batching, tokenizers and the degenerate-row rule."""

import numpy as np
import pytest

from blockdec import metrics
from blockdec.training import data, tokenizers


def write_corpus(folder, n=30, seed=0):
  """n small Python files with varied content; returns the folder."""
  rng = np.random.RandomState(seed)
  folder.mkdir(parents=True, exist_ok=True)
  words = ["alpha", "beta", "gamma", "delta", "value", "item", "count", "name"]
  for i in range(n):
    lines = [f"# file {i}"]
    for j in range(int(rng.randint(8, 20))):
      a, b = rng.choice(words, 2)
      lines.append(f"def {a}_{i}_{j}({b}):\n    return {b} + {int(rng.randint(100))}")
    (folder / f"mod_{i:02d}.py").write_text("\n".join(lines) + "\n")
  return folder


def test_sources_and_errors(tmp_path):
  corpus = write_corpus(tmp_path / "c", n=5)
  docs = data.load_corpus(str(corpus))
  assert [d.name for d in docs] == [f"mod_{i:02d}.py" for i in range(5)]
  # File, glob and comma-separated sources; duplicates are read once.
  one = data.load_corpus(str(corpus / "mod_01.py"))
  assert one[0].text == (corpus / "mod_01.py").read_text()
  globbed = data.load_corpus(f"{corpus}/mod_0[12].py,{corpus}/mod_01.py")
  assert sorted(d.name for d in globbed) == ["mod_01.py", "mod_02.py"]

  with pytest.raises(FileNotFoundError, match="nope"):
    data.load_corpus(str(tmp_path / "nope"))
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(ValueError, match="matches no files"):
    data.load_corpus(str(tmp_path / "empty_dir"))
  (tmp_path / "blank").mkdir()
  (tmp_path / "blank" / "a.py").write_text("")
  with pytest.raises(ValueError, match="empty"):
    data.load_corpus(str(tmp_path / "blank"))
  (tmp_path / "bin.py").write_bytes(b"\xff\xfe\x00abc")
  with pytest.raises(ValueError, match="not UTF-8"):
    data.load_corpus(str(tmp_path / "bin.py"))
  with pytest.raises(ValueError, match="no corpus sources"):
    data.load_corpus(" , ")


def test_stdlib_listing_excludes_tests():
  names = [name for name, _ in data._stdlib_files()]
  assert len(names) > 100
  assert "stdlib/json/decoder.py" in names
  for bad in ("/test/", "/tests/", "idlelib/", "site-packages/"):
    assert not any(bad in "/" + n for n in names), bad


def test_splits_are_deterministic_and_disjoint(tmp_path):
  docs = data.load_corpus(str(write_corpus(tmp_path / "c", n=40)))
  a = data.split_corpus(docs, 0.2, 0.2)
  b = data.split_corpus(list(reversed(docs)), 0.2, 0.2)
  names = {s: {d.name for d in a[s]} for s in data.SPLITS}
  assert names == {s: {d.name for d in b[s]} for s in data.SPLITS}
  assert sum(len(v) for v in names.values()) == len(docs)
  assert not (names["train"] & names["valid"] or names["train"] & names["test"]
              or names["valid"] & names["test"])
  assert all(names.values())
  # A document's split depends on its name only.
  assert data.split_of("x/y.py", 0.2, 0.2) == data.split_of("x/y.py", 0.2, 0.2)
  with pytest.raises(ValueError, match="valid split is empty"):
    data.split_corpus(docs[:1], 0.0, 0.0)
  with pytest.raises(ValueError, match="valid_fraction"):
    data.split_corpus(docs, 1.5, 0.0)


def test_batches_are_a_pure_function_of_step():
  stream = np.arange(1000, dtype=np.int32)
  a = data.CorpusBatches(stream, seq_len=15, batch_size=4, seed=3)
  b = data.CorpusBatches(stream, seq_len=15, batch_size=4, seed=3)
  steps = [0, 5, a.steps_per_epoch, 3 * a.steps_per_epoch + 1, 2]
  for s in steps:  # Any visiting order, fresh or reused object.
    np.testing.assert_array_equal(a.batch(s)["tokens"], b.batch(s)["tokens"])
  batch = a.batch(7)["tokens"]
  assert batch.shape == (4, 16)
  np.testing.assert_array_equal(np.diff(batch, axis=1), 1)  # Contiguous slices.
  epoch0 = np.concatenate([a.batch(i)["tokens"] for i in range(a.steps_per_epoch)])
  assert len({tuple(r) for r in epoch0}) == len(epoch0)  # No repeats in an epoch.
  other = data.CorpusBatches(stream, 15, 4, seed=4)
  assert not np.array_equal(a.batch(0)["tokens"], other.batch(0)["tokens"])
  with pytest.raises(ValueError, match="fewer than batch_size"):
    data.CorpusBatches(stream[:40], 15, 4)
  with pytest.raises(ValueError, match="seq_len"):
    data.CorpusBatches(stream, 0, 4)


def test_eval_batches_pad_with_zero_mask():
  stream = np.arange(50, dtype=np.int32)
  batches = data.eval_batches(stream, seq_len=9, batch_size=4, max_batches=3)
  assert len(batches) == 2 and batches[1]["tokens"].shape == (4, 10)
  np.testing.assert_array_equal(batches[1]["mask"][:, 0], [1, 0, 0, 0])
  with pytest.raises(ValueError, match="held-out stream"):
    data.eval_batches(stream[:5], 9, 4, 1)


def test_tokenizers_round_trip(tmp_path):
  text = "def f(x):\n    return x + 1  # é ✓\n"
  byte = tokenizers.ByteTokenizer()
  assert byte.decode(byte.encode(text)) == text
  byte.save(tmp_path / "b")
  assert isinstance(tokenizers.load_tokenizer(tmp_path / "b"),
                    tokenizers.ByteTokenizer)

  corpus = [text * 3, "class A:\n    pass\n" * 5, "import os\nprint(os.sep)\n"]
  bpe = tokenizers.train_bpe(corpus * 10, vocab_size=300)
  assert 257 <= bpe.vocab_size <= 300
  ids = bpe.encode(text)
  assert len(ids) < len(text.encode())  # Merges happened.
  assert bpe.decode(ids) == text
  bpe.save(tmp_path / "p")
  loaded = tokenizers.load_tokenizer(tmp_path / "p")
  np.testing.assert_array_equal(loaded.encode(text), ids)
  assert loaded.decode(ids) == text
  assert loaded.decode(loaded.encode("zzz qq")) == "zzz qq"  # Unseen text.

  with pytest.raises(FileNotFoundError, match="no tokenizer"):
    tokenizers.load_tokenizer(tmp_path / "missing")
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizers.train_bpe(corpus, vocab_size=100)
  with pytest.raises(ValueError, match="allowed"):
    tokenizers.make_tokenizer("wordpiece")


def test_heldout_prompts_cut_at_lines(tmp_path):
  docs = data.load_corpus(str(write_corpus(tmp_path / "c", n=10)))
  prompts = data.heldout_prompts(docs, 6, min_bytes=40, max_bytes=80)
  assert len(prompts) == 6
  for p in prompts:
    assert 40 <= len(p.encode()) <= 80 and p.endswith("\n")
    assert any(("\n" + d.text).find("\n" + p) >= 0 for d in docs)
  assert prompts == data.heldout_prompts(docs, 6, min_bytes=40, max_bytes=80)


def test_degenerate_rule():
  code = "def parse(self, text):\n    tokens = text.split()\n    return [t for t in tokens if t]\n"
  assert not metrics.is_degenerate(code)
  assert metrics.is_degenerate(" " * 30 + "x\n" + " " * 30)  # Whitespace.
  assert metrics.is_degenerate("self." * 20)  # A loop.
  assert metrics.is_degenerate(np.frombuffer(b"ab" * 40, np.uint8))
  assert not metrics.is_degenerate("abc")
  assert metrics.distinct_ngram_ratio("abcdefgh") == 1.0
  assert metrics.block_efficiency([8, 4], [2, 4]) == 2.0
  assert metrics.block_efficiency([8, 4], [2, 4], [True, False]) == 4.0
  assert np.isnan(metrics.block_efficiency([8], [2], [False]))
