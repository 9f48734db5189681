"""experiments/fused_projections.py: both settings decode alike and report."""

import numpy as np

from blockdec import api
from tests.helpers import experiment_script, random_model


def test_both_settings_give_the_same_tokens_and_a_report():
  module = experiment_script("fused_projections")
  cfg, params = random_model(2)
  draft = random_model(2, param_seed=1, n_layers=1)
  prompts = np.random.RandomState(0).randint(
      0, cfg.vocab_size, size=(2, 6)).astype(np.int32)
  methods = module.systems(draft, ((1, 1.0), (2, 1.5), (4, 2.0), (8, 3.0),
                                   (11, 3.5)))
  rows = module.measure(cfg, params, prompts, methods, repeats=1,
                        new_tokens=8)
  assert [r["system"] for r in rows] == ["greedy", "prompt-lookup",
                                         "draft-model"]
  for r in rows:
    assert r["same_tokens"], r
    assert r["speedup"] > 0 and r["ms_per_decode_fused"] > 0, r
  assert api.FUSE_PROJECTIONS_ON_CPU  # Restored after the measurement.
  batched = module.measure(cfg, params, prompts, module.batch_systems(cfg),
                           repeats=1, new_tokens=8, batch=2)
  assert [(r["system"], r["batch"]) for r in batched] == [("greedy", 2),
                                                          ("blockwise", 2)]
  assert all(r["same_tokens"] for r in batched)
  rows += batched
  limit = module.transformer.FUSED_MAX_TOKENS
  calls = module.call_costs(cfg, params, repeats=1, sizes=(1, 2, limit + 1),
                           prompt_len=8)
  assert module.transformer.FUSED_MAX_TOKENS == limit  # Restored.
  assert [c["tokens"] for c in calls] == [1, 2, limit + 1]
  assert calls[0]["separate"] == 1.0 and calls[1]["fused"] > 0
  report = {"model": "random", "draft": "random draft", "repeats": 1,
            "call_repeats": 1, "fused_max_tokens": limit,
            "lookup_costs": [[1, 1.0]], "machine": "m", "command": "c",
            "calls": calls,
            "sets": [{"prompt_set": "stdlib", "measured": rows}]}
  text = module.markdown(report)
  assert "| draft-model |" in text and "Every decode gave the same tokens" \
      in text
