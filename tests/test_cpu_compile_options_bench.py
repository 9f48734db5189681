"""experiments/cpu_compile_options.py: both settings decode alike and report."""

import numpy as np

from blockdec import calibration, cpu_compile
from tests.helpers import experiment_script, random_model


def test_both_settings_give_the_same_tokens_and_a_report(tmp_path):
  module = experiment_script("cpu_compile_options")
  fused = experiment_script("fused_projections")
  cfg, params = random_model(3)
  prompts = np.random.RandomState(1).randint(
      0, cfg.vocab_size, size=(2, 6)).astype(np.int32)
  methods = fused.systems(None, ((1, 1.0), (2, 1.5), (4, 2.0)))
  rows = fused.side_by_side(cfg, params, prompts, methods, 1, module.switch,
                            new_tokens=8)
  rows += fused.side_by_side(cfg, params, prompts, fused.batch_systems(cfg),
                             1, module.switch, new_tokens=8, batch=2)
  assert [(r["system"], r["batch"]) for r in rows] == [
      ("greedy", 1), ("prompt-lookup", 1), ("greedy", 2), ("blockwise", 2)]
  assert all(r["same_tokens"] and r["ms_on"] > 0 for r in rows), rows
  assert cpu_compile.ENABLED  # Restored after the measurement.
  small_cfg, small = calibration.random_model(32, 1, 2, vocab_size=29,
                                              max_seq_len=200)
  calls = module.call_costs(small_cfg, small, 1, 1, sizes=(1, 3))
  assert cpu_compile.ENABLED
  assert [c["tokens"] for c in calls] == [1, 3]
  assert calls[0]["cost_off"] == 1.0 and calls[1]["ms_on"] > 0
  report = {"model": "random", "draft": "no draft", "repeats": 1,
            "call_repeats": 1, "new_tokens": 8,
            "options": cpu_compile.DECODE_OPTIONS, "machine": "m",
            "command": "c", "lookup_costs": [[1, 1.0]],
            "calls": [{"model": "tiny", "batch": 1, "rows": calls}],
            "sets": [{"prompt_set": "stdlib", "measured": rows}]}
  text = module.markdown(report)
  assert "| prompt-lookup | 1 |" in text and "### tiny, batch 1" in text
  assert "Every decode gave the same tokens both ways." in text
  module.plot(report, tmp_path / "calls.png")
  assert (tmp_path / "calls.png").stat().st_size > 0
