"""experiments/drafters.py on the tiny preset: every row and file is produced.

Trains the tiny base and a tiny Hydra drafter (seconds) into a temporary cache
and runs the benchmark with chains, a Sequoia-shaped static tree and a
dynamic tree, greedy and sampled, at batch 1 and 2. The script itself
checks every greedy row against the base's greedy output token for token;
here the rows, targets and files are checked. No speed assertions: timing
fields only have to be positive.
"""

import json
import pathlib
import sys

import pytest

from tests.helpers import experiment_script

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_script():
  sys.path.insert(0, str(ROOT / "experiments"))  # Its gpt2_tiny helper.
  return experiment_script("drafters_benchmark", "drafters")


def test_tiny_run_produces_every_row_and_file(tmp_path):
  script = _load_script()
  out = tmp_path / "results" / "drafters_tiny"
  result = script.main([
      "--model=tiny", "--train", f"--cache_dir={tmp_path / 'cache'}",
      "--drafters=hydra-distill", "--block_sizes=3",
      "--num_prompts=2", "--batch=2", "--new_tokens=8", "--repeats=1",
      "--prompt_bytes=16,32", "--tree_budget=4", "--tree_width=2",
      "--tree_prompts=2", "--dynamic_nodes=4", "--dynamic_top_k=2",
      "--tree_chains=0", f"--out={out}"])

  on_disk = json.loads(out.with_suffix(".json").read_text())
  assert on_disk["rows"] == result["rows"] and on_disk["model"] == "tiny"
  assert out.with_suffix(".png").stat().st_size > 0
  md = out.with_suffix(".md").read_text()
  assert "tiny (smoke) base" in md and "Fastest greedy batch-1 drafter" in md

  kinds = {(r["drafter"], r["tree"].split(",")[0], r["temperature"],
            r["batch"]) for r in result["rows"]}
  expected = {("autoregressive", "chain", t, b)
              for t in (0.0, 1.0) for b in (1, 2)}
  expected |= {("hydra-distill", tree, t, b)
               for tree in ("chain", "static", "dynamic")
               for t in (0.0, 1.0) for b in (1, 2)}
  assert kinds == expected
  for r in result["rows"]:
    assert r["model"] == "tiny"
    assert 1.0 <= r["tokens_per_call"] <= (r["block_size"] or 1)
    assert r["tokens_per_s"] > 0 and r["speedup"] > 0
    assert 0.0 <= r["degenerate_share"] <= 1.0
  assert [s["drafter"] for s in result["tree_shapes"]] == ["hydra-distill"]
  assert all(s["nodes"] == 4 for s in result["tree_shapes"])


def test_bad_arguments_name_the_value():
  script = _load_script()
  with pytest.raises(ValueError, match="draft-model.*gpt2-tiny"):
    script.parse_args(["--model=gpt2-tiny", "--drafters=draft-model"])
  with pytest.raises(ValueError, match="--prompt_bytes"):
    script.parse_args(["--prompt_bytes=64,32"])
  with pytest.raises(SystemExit):
    script.parse_args(["--model=huge"])


def test_run_paired_alternates_and_takes_the_median_pair_ratio(monkeypatch):
  """The reference and the method are timed pass for pass after a warm-up
  of each, and the speedup is the median of the per-pair ratios: a drift
  that slows both passes of a pair cancels. A fake clock makes the pass
  durations exact."""
  script = _load_script()
  log, clock = [], [0.0]
  # Per timed pass: (reference seconds, method seconds); the machine
  # slows down 3x in the middle pair.
  durations = iter([4.0, 2.0, 12.0, 3.0, 5.0, 1.0])

  def make(name):
    def one_pass():
      log.append(name)
      if len(log) > 2:  # The first two are the warm-ups, not timed.
        clock[0] += next(durations)
      return {"tokens": [len(log)]}
    return one_pass

  monkeypatch.setattr(script.time, "perf_counter", lambda: clock[0])
  out, method_s, ref_s, ratio = script.run_paired(make("ref"),
                                                  make("method"), 3)
  assert log == ["method", "ref"] + ["ref", "method"] * 3
  assert out == {"tokens": [8]}  # The last timed method pass.
  assert method_s == 2.0 and ref_s == 5.0  # Medians of each side.
  # Pairs 4/2, 12/3, 5/1: the median ratio 4, not the ratio of medians 2.5.
  assert ratio == 4.0


def test_batches_are_cut_to_their_longest_prompt(monkeypatch):
  """A batch decodes with its longest prompt's columns (rounded up to the
  bucket), not the whole set's: one short prompt is not padded to a long
  one. The outputs of all batches still join into one DecodeOutput."""
  script = _load_script()
  assert script.batch_width([130], 16, 192) == 144
  assert script.batch_width([128, 100], 16, 192) == 128
  assert script.batch_width([190], 16, 192) == 192  # Never past the array.
  assert script.batch_width([37], 1, 192) == 37
  with pytest.raises(ValueError, match="--prompt_bucket"):
    script.parse_args(["--prompt_bucket=0"])

  import blockdec
  import numpy as np
  widths = []

  def fake_decode(params, cfg, prompts, lengths, n, **kw):
    del params, cfg, kw
    widths.append(prompts.shape[1])
    b = prompts.shape[0]
    return blockdec.DecodeOutput(
        tokens=np.zeros((b, n), np.int32), lengths=np.asarray(lengths),
        num_calls=np.ones((b,), np.int32),
        accepted_hist=np.zeros((b, 1), np.int32))

  monkeypatch.setattr(script.blockdec, "decode", fake_decode)
  prompts = np.ones((3, 40), np.int32)
  lengths = np.array([10, 40, 17], np.int32)
  out = script.make_pass(None, None, prompts, lengths, 5,
                         blockdec.Autoregressive(), 1, None, 8)()
  assert widths == [16, 40, 24]
  assert out.tokens.shape == (3, 5) and list(out.lengths) == [10, 40, 17]
  widths.clear()
  script.make_pass(None, None, prompts, lengths, 5,
                   blockdec.Autoregressive(), 2, None, 8)()
  assert widths == [40, 24]
