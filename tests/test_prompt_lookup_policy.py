"""experiments/prompt_lookup_policy.py: the replay is the decode's own calls."""

import jax.numpy as jnp
import numpy as np

import blockdec
from tests.helpers import experiment_script, random_model


def _module():
  return experiment_script("prompt_lookup_policy")


def test_replay_counts_the_calls_of_prompt_lookup_without_the_rule(tmp_path):
  module = _module()
  k, n, p = 5, 24, 6
  cfg, params = random_model(2)
  rng = np.random.RandomState(0)
  prompts = rng.randint(0, cfg.vocab_size, size=(4, p)).astype(np.int32)
  lengths = jnp.full((4,), p, jnp.int32)
  greedy = blockdec.decode(params, cfg, jnp.asarray(prompts), lengths, n,
                           method=blockdec.Autoregressive())
  out = blockdec.decode(params, cfg, jnp.asarray(prompts), lengths, n,
                        method=blockdec.PromptLookup(ngram=3, block_size=k),
                        compact_rows=False)
  matched, accepted, calls = module.replay(prompts, np.asarray(greedy.tokens),
                                           ngram=3, num_drafts=k - 1)
  np.testing.assert_array_equal(calls, out.num_calls)
  hist = np.bincount(accepted, minlength=k)
  np.testing.assert_array_equal(hist, np.asarray(out.accepted_hist).sum(0))
  assert hist[1:].sum() > 0  # Random models loop: some drafts survive.
  assert matched.min() >= 0 and matched.max() <= 3
  # Modeled speedups: verifying everything everywhere is the replay itself;
  # with costs rising in T nothing beats the oracle; one-token steps only
  # are greedy (1.0).
  costs = {t: 1.0 + 0.3 * (t - 1) for t in range(1, k + 1)}
  everything = module.modeled_speedup(matched, accepted, costs, 0, k)
  assert np.isclose(everything,
                    (1 + accepted).sum() / (accepted.size * costs[k]))
  oracle = module.oracle_speedup(accepted, costs)
  for m in range(4):
    for t in range(1, k + 1):
      assert module.modeled_speedup(matched, accepted, costs, m, t) <= (
          oracle + 1e-9)
  assert module.modeled_speedup(matched, accepted, costs, 1, 1) == 1.0
  table = module.by_match_length(matched, accepted)
  assert sum(b["calls"] for b in table) == accepted.size
  # The figure draws from the result's tables.
  measured = [{"system": name, "x_greedy": x} for name, x in
              (("greedy", 1.0), ("prompt-lookup min_match=3 block=5", 1.1))]
  module.plot({"sets": [{"prompt_set": "random", "by_match": table,
                         "measured": measured}]}, tmp_path / "p.png")
  assert (tmp_path / "p.png").stat().st_size > 0


def test_markdown_reads_the_longer_ngrams_and_the_model(tmp_path):
  """The report's tables and reading come from the result's numbers."""
  module = _module()
  by_match = [{"match_length": m, "share": s, "calls": c,
               "mean_surviving_drafts": a}
              for m, s, c, a in ((0, 0.1, 1, 0.0), (1, 0.6, 6, 0.3),
                                 (2, 0.2, 2, 1.5), (3, 0.1, 1, 6.0))]
  measured = [
      {"system": "greedy", "tokens_per_s": 100.0, "x_greedy": 1.0,
       "tokens_per_call": 1.0, "same_tokens_as_greedy": True},
      {"system": "prompt-lookup min_match=3 block=11", "tokens_per_s": 110.0,
       "x_greedy": 1.1, "tokens_per_call": 1.7, "same_tokens_as_greedy": True,
       "modeled_x_greedy": 1.2}]
  longer = [{"ngram": n, "full_match_share": share,
             "mean_surviving_after_full": kept, "none_survive_after_full": 0.1,
             "modeled": [1.0, model]}
            for n, share, kept, model in ((3, 0.12, 6.0, 1.30),
                                          (6, 0.08, 7.5, 1.31))]
  r = {"machine": "test", "command": "c", "model": "m",
       "call_costs": {1: 1.0, 11: 3.0}, "repeats": 3,
       "sets": [{"prompt_set": "stdlib", "num_prompts": 10,
                 "by_match": by_match, "oracle": 1.5, "sizes": [2, 11],
                 "modeled": {"3": [1.0, 1.3]}, "longer": longer,
                 "measured_prompts": list(range(8)), "measured": measured}]}
  r["reading"] = module.reading(r)
  text = module.markdown(r)
  assert "| 6 | 8% | 7.50 | 10% | 1.00 | 1.31 |" in text
  assert "| 1.10 | 1.20 | 1.70 |" in text
  assert "0.92 of its model" in r["reading"]
  assert "within 0.01x" in r["reading"]
  longer[1]["modeled"][1] = 1.50
  assert "ngram 6 models best, 0.20x above" in module.reading(r)
