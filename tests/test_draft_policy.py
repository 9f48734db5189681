"""experiments/draft_policy.py: every greedy variant decodes greedy's
tokens, the sampled mode measures its blocks against the one-token sampling
loop, and the tables and figure come from the rows."""

import numpy as np
import pytest

import blockdec
from tests.helpers import experiment_script, random_model

pytestmark = pytest.mark.torch  # hf_peers' timing helpers import torch.


COSTS = ((1, 1.0), (2, 1.3), (4, 1.6), (8, 2.2), (16, 3.5))


def _setup():
  """(the script's module, base cfg, params, its 1-layer draft, prompts)."""
  module = experiment_script("draft_policy")
  cfg, params = random_model(3)
  dcfg, dparams = random_model(2, param_seed=7, n_layers=1,
                               vocab_size=cfg.vocab_size,
                               num_prediction_heads=1)
  prompts = np.random.RandomState(0).randint(
      0, cfg.vocab_size, (2, 6)).astype(np.int32)
  return module, cfg, params, blockdec.DraftModel(dcfg, dparams), prompts


def test_draft_policy_variants_measure_and_report(tmp_path):
  module, cfg, params, draft, prompts = _setup()
  methods = module.variants(draft, COSTS)
  assert list(methods)[0] == "greedy" and methods["greedy"] is None
  assert methods["k=16 stop+conf"].stop_below == module.STOP_BELOW
  assert methods["k=16 conf"].adaptive.estimate == "confidence"
  assert methods["k=16"].speculative_prefill
  assert not methods["k=16 plain prefill"].speculative_prefill
  rows = module.measure(cfg, params, methods, prompts, 12, repeats=1)
  assert [m["variant"] for m in rows] == list(methods)
  assert all(m["same_tokens_as_greedy"] for m in rows)
  assert rows[0]["x_greedy"] == 1.0 and rows[0]["tokens_per_call"] == 1.0
  k16 = next(m for m in rows if m["variant"] == "k=16")
  assert len(k16["committed_per_call"]) == 16
  assert sum(k16["committed_per_call"]) > 0
  result = {"machine": "test", "command": "python experiments/draft_policy.py",
            "model": "base", "draft": "draft", "repeats": 1,
            "call_costs": [list(c) for c in COSTS],
            "sets": [{"prompt_set": "random", "new_tokens": 12,
                      "rows": rows}]}
  result["reading"] = module.reading(result)
  assert "fastest" in result["reading"] and "k=16 stop" in result["reading"]
  assert "k=16 plain prefill" in result["reading"]
  text = module.markdown(result)
  assert "| k=16 stop+conf |" in text and "calls kept 1 token" in text
  assert "distilled on the base's greedy text" in text
  module.plot(result, tmp_path / "p.png")
  assert (tmp_path / "p.png").stat().st_size > 0


def test_draft_policy_sampled_variants_measure_and_report(tmp_path):
  module, cfg, params, draft, prompts = _setup()
  methods = module.variants(draft, COSTS, sampled=True)
  assert list(methods) == (["sampling"] + [f"k={k}" for k in
                                           module.SAMPLED_BLOCKS]
                           + ["k=4 plain prefill", "k=8 conf"])
  assert methods["sampling"] is None
  assert not methods["k=4 plain prefill"].speculative_prefill
  assert methods["k=8 conf"].adaptive.estimate == "confidence"
  # Three of the variants (each compiles its own decode): the reference, a
  # fixed block and the rule.
  methods = {name: methods[name] for name in ("sampling", "k=3", "k=8 conf")}
  rows = module.measure(cfg, params, methods, prompts, 12, repeats=1,
                        temperature=0.6)
  assert [m["variant"] for m in rows] == list(methods)
  # Sampled rows are not greedy's tokens: nothing to compare.
  assert all(m["same_tokens_as_greedy"] is None for m in rows)
  assert rows[0]["x_greedy"] == 1.0 and rows[0]["tokens_per_call"] == 1.0
  assert all(1.0 <= m["tokens_per_call"] <= int(m["variant"][2])
             for m in rows[1:])
  result = {"machine": "test", "command": "python experiments/draft_policy.py",
            "model": "base", "draft": "draft", "repeats": 1,
            "temperature": 0.6, "draft_temperature": 0.6,
            "call_costs": [list(c) for c in COSTS],
            "sets": [{"prompt_set": "random", "new_tokens": 12,
                      "rows": rows}]}
  result["reading"] = module.reading(result)
  assert "x sampling" in result["reading"]
  assert "the one-token sampling loop" in result["reading"]
  text = module.markdown(result)
  assert "| k=8 conf |" in text and "| x sampling |" in text
  assert "temperature 0.6" in text and "| n/a |" in text
  assert "distilled on the base's samples at temperature 0.6" in text
  module.plot(result, tmp_path / "p.png")
  assert (tmp_path / "p.png").stat().st_size > 0
