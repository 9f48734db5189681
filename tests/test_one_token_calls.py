"""experiments/one_token_calls.py: every system really makes one-token calls."""

import numpy as np

from tests.helpers import experiment_script, random_model


def test_every_call_verifies_one_token_and_keeps_greedys_tokens():
  module = experiment_script("one_token_calls")
  cfg, params = random_model(2)
  prompts = np.random.RandomState(0).randint(
      0, cfg.vocab_size, size=(2, 6)).astype(np.int32)
  rows = module.measure(cfg, params, prompts, repeats=1, new_tokens=8)
  assert [r["system"] for r in rows] == list(module.systems())
  for r in rows:
    # One token per call: the costs make every draft a loss, so the rule
    # always takes the switch's one-token branch.
    assert r["calls"] == r["tokens"] == 2 * 8, r
    assert r["same_tokens_as_greedy"], r
  text = module.reading({"measured": rows})
  assert "through the switch over 5 sizes" in text
