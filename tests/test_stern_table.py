"""experiments/stern_table.py in quick mode: every row of the table is produced.

Trains the tiny models of configs/stern_table.py:quick on a small synthetic
corpus and checks the result files. No speed assertions: timing fields only
have to exist and be positive.
"""

import json
import math
import pathlib

from blockdec.training import pipeline
from tests.helpers import experiment_script
from tests.test_training_data import write_corpus

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_script():
  """The script as a module (loaded once per process)."""
  return experiment_script("stern_table")


def _quick_config(corpus):
  config = pipeline.load_config(ROOT / "configs" / "stern_table.py", "quick")
  for c in config.train.values():
    for d in (c.data, c.base.data):
      d.corpus = str(corpus)
      d.valid_fraction, d.test_fraction = 0.2, 0.2
    c.progress = c.base.progress = False
  return config


def test_quick_mode_produces_every_row(tmp_path):
  script = _load_script()
  config = _quick_config(write_corpus(tmp_path / "corpus", n=40))
  prefix = tmp_path / "results" / "stern_table"
  result = script.run_benchmark(config, tmp_path / "cache", prefix,
                                log=lambda *a: None)

  on_disk = json.loads(prefix.with_name("stern_table.json").read_text())
  assert on_disk["machine"] and on_disk["rows"] == result["rows"]
  for suffix in (".md", "_block_size.png", "_speedup.png"):
    assert prefix.with_name("stern_table" + suffix).stat().st_size > 0

  rows = {(r["regime"], r["k"], r["acceptance"]): r for r in result["rows"]}
  ks, k_max = config.eval.block_sizes, max(config.eval.block_sizes)
  expected = {(g, k, "exact") for g in script.REGIMES for k in ks} | {
      (g, k_max, a) for g in script.REGIMES for a in config.eval.approximate}
  assert set(rows) == expected
  assert {a for _, _, a in rows} == {"exact", "top2", "top3", "minblock2",
                                     "minblock3"}
  for (regime, k, rule), r in rows.items():
    assert 1.0 <= r["mean_block_size"] <= k, r
    nondeg = r["mean_block_size_nondegenerate"]
    assert nondeg is None or 1.0 <= nondeg <= k, r
    assert 0.0 <= r["degenerate_share"] <= 1.0
    assert 0.0 <= r["agreement_with_greedy"] <= 1.0
    assert math.isfinite(r["heldout_nll"]) and r["heldout_nll"] > 0
    assert math.isfinite(r["output_nll_base"])
    assert sum(r["accepted_hist"]) > 0 and len(r["accepted_hist"]) == k
    if rule.startswith("minblock"):
      # Fewer than l tokens only in a row's last call (the budget's end).
      assert sum(r["accepted_hist"][:int(rule[-1]) - 1]) <= r["num_rows"], r
    timed = (rule == "exact" and regime in config.timing.regimes
             and k in config.timing.block_sizes)
    for f in ("speedup_b1", "speedup_b8", "step_cost_ratio_b1"):
      assert (r[f] is not None and r[f] > 0) if timed else r[f] is None, (f, r)
    if rule == "exact":
      # Exact acceptance reproduces the model's own greedy output; frozen
      # regimes keep the base model's head 1, so that is the base's output.
      assert r["agreement_with_own_greedy"] == 1.0, r
      if regime in ("regular", "distillation"):
        assert r["agreement_with_greedy"] == 1.0, r
        # The same head 1 (evaluated inside a k-head model: float noise).
        assert math.isclose(r["heldout_nll"], result["base"]["heldout_nll"],
                            rel_tol=1e-4)

  # Re-timing from the cached checkpoints keeps the quality numbers.
  again = script.run_benchmark(config, tmp_path / "cache", prefix,
                               only="timing", log=lambda *a: None)
  for old, new in zip(result["rows"], again["rows"]):
    assert old["mean_block_size"] == new["mean_block_size"]
    assert (new["speedup_b1"] is None) == (old["speedup_b1"] is None)
