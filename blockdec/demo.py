"""`make demo`: train (or reuse) a byte-level LM on the stdlib and k = 8
Hydra heads distilled on its own greedy text, then decode held-out stdlib
prompts greedily and blockwise, and sample them ancestrally and by
speculative sampling.

First run: trains configs/base_lm.py:demo, then
configs/heads_hydra.py:demo_distill (the base greedily continues 512 corpus
prefixes, and Hydra's dependent heads learn those continuations on the
frozen base: the best lossless drafter that fits the first run), caching
both under cache/. From a fresh clone on 2 CPU cores (an AMD EPYC) `make
demo` took 13 min 53 s: setting up .venv 1.0 min, training the base 8.7,
generating the continuations 0.6, the frozen trunk's states of them 0.2,
the heads 1.9, decoding the rest. Later runs reuse the cache and only
decode. Stern's heads trained on the corpus
(configs/heads_frozen.py:demo, the drafter this demo showed before) and the
EAGLE-style drafter (configs/eagle.py:demo) are decoded too once they are in
the cache. The work happens in blockdec.training (pipeline, evaluation);
this file chooses the settings and prints.
"""

from __future__ import annotations

import itertools
import os
import textwrap
import time

from blockdec.decoding import AdaptiveBlockSize, Sampling
from blockdec.training import data, evaluation, pipeline

CONFIG = "configs/heads_hydra.py:demo_distill"
EAGLE_CONFIG = "configs/eagle.py:demo"
FROZEN_CONFIG = "configs/heads_frozen.py:demo"
CACHE_DIR = os.environ.get("BLOCKDEC_CACHE", "cache")
NUM_PROMPTS = 16
PROMPT_BYTES = (128, 192)  # Cut at line boundaries; + NEW_TOKENS <= seq_len 256.
NEW_TOKENS = 64


def _side_by_side(left: str, right: str, width: int = 38) -> str:
  wrap = lambda s: list(itertools.chain.from_iterable(
      textwrap.wrap(line, width, replace_whitespace=False, drop_whitespace=False)
      or [""] for line in s.split("\n")))
  a, b = wrap(left), wrap(right)
  rows = [f"  {'greedy':<{width}} | blockwise (exact, k=8)", "  " + "-" * (2 * width + 3)]
  for x, y in itertools.zip_longest(a, b, fillvalue=""):
    rows.append(f"  {x:<{width}} | {y}")
  return "\n".join(rows)


def nll_verdict(sampled: dict, bound: float = 3.0) -> str:
  """Whether the two sides' sample NLLs agree (evaluation.compare_sampling):
  the difference in standard errors. The standard errors treat tokens as
  independent, so they understate the noise and the verdict leans to
  "differ"; the statistical losslessness test is tests/test_sampling.py."""
  se = (sampled["nll_stderr"] ** 2
        + sampled["ancestral_nll_stderr"] ** 2) ** 0.5
  z = abs(sampled["nll"] - sampled["ancestral_nll"]) / max(se, 1e-12)
  if z < bound:
    return f"equal within noise: {z:.1f} standard errors apart"
  return (f"{z:.1f} standard errors apart: more than noise, or the errors "
          "are too small (tokens of a row are correlated)")


def main():
  t0 = time.perf_counter()
  config = pipeline.load_config(CONFIG)
  run = pipeline.train_or_load(config, CACHE_DIR)
  splits = data.split_corpus(data.load_corpus(config.data.corpus),
                             config.data.valid_fraction, config.data.test_fraction)
  texts = data.heldout_prompts(splits["test"], NUM_PROMPTS,
                               min_bytes=PROMPT_BYTES[0],
                               max_bytes=PROMPT_BYTES[1])
  print(f"\ndecoding {len(texts)} held-out stdlib prompts "
        f"({PROMPT_BYTES[0]}-{PROMPT_BYTES[1]} bytes) x {NEW_TOKENS} new tokens")
  r = evaluation.compare_decoding(run.params, run.cfg, run.tokenizer, texts,
                                  max_new_tokens=NEW_TOKENS, repeats=5)
  valid = run.summary["valid"]
  sample = next((i for i, d in enumerate(r["degenerate"]) if not d), 0)
  # Latency at batch 1 (one user): on a CPU a batch of 16 x k tokens per call
  # is compute-bound, so the batch-1 speedup is the one blockwise targets.
  one = evaluation.compare_decoding(run.params, run.cfg, run.tokenizer,
                                    [texts[sample]], max_new_tokens=NEW_TOKENS)
  # The same batch with each call verifying only the drafts that have been
  # surviving (blockdec.AdaptiveBlockSize): fewer wasted tokens per call.
  adaptive = evaluation.compare_decoding(
      run.params, run.cfg, run.tokenizer, texts, max_new_tokens=NEW_TOKENS,
      repeats=5, adaptive=AdaptiveBlockSize())
  # Sampling at temperature 0.6: ancestral vs lossless speculative sampling
  # with the same heads (same distribution, so the samples' NLL agree).
  sampled = evaluation.compare_sampling(
      run.params, run.cfg, run.tokenizer, texts, max_new_tokens=NEW_TOKENS,
      sampling=Sampling(temperature=0.6), repeats=3)
  print(f"\nprompt {sample} (last lines):\n"
        + textwrap.indent("\n".join(texts[sample].split("\n")[-4:]), "  > "))
  print(_side_by_side(r["greedy"][sample], r["blockwise"][sample]))
  agreement = " ".join(f"{a:.2f}" for a in run.summary.get("head_agreement", []))
  print(f"""
summary ({run.cfg.n_layers}-layer d={run.cfg.d_model} byte LM, {run.cfg.num_prediction_heads} Hydra heads distilled on its greedy text)
  base held-out loss        {valid['nats_per_byte']:.3f} nats/byte
  head agreement (1..k)     {agreement}
  degenerate continuations  {r['degenerate_share']:.0%} (held-out prompts themselves: {r['prompt_degenerate_share']:.0%})
  block efficiency          {r['block_efficiency']:.2f} all rows, {r['block_efficiency_non_degenerate']:.2f} non-degenerate rows
  batch {len(texts)}: greedy        {r['greedy_tokens_per_s']:.0f} tokens/s
  batch {len(texts)}: blockwise     {r['blockwise_tokens_per_s']:.0f} tokens/s, speedup {r['speedup']:.2f}x
  batch {len(texts)}: adaptive      {adaptive['blockwise_tokens_per_s']:.0f} tokens/s, speedup {adaptive['speedup']:.2f}x, block efficiency {adaptive['block_efficiency']:.2f}
  batch 1 (prompt {sample}): greedy  {one['greedy_tokens_per_s']:.0f} tokens/s
  batch 1 (prompt {sample}): blockwise {one['blockwise_tokens_per_s']:.0f} tokens/s, speedup {one['speedup']:.2f}x, block efficiency {one['block_efficiency']:.2f}
  batch {len(texts)}: sampling T=0.6 ancestral {sampled['ancestral_tokens_per_s']:.0f} tokens/s, speculative {sampled['speculative_tokens_per_s']:.0f} tokens/s, speedup {sampled['speedup']:.2f}x, {sampled['tokens_per_call']:.2f} tokens per call
  sample NLL (T=1 model)    ancestral {sampled['ancestral_nll']:.3f} +- {sampled['ancestral_nll_stderr']:.3f}, speculative {sampled['nll']:.3f} +- {sampled['nll_stderr']:.3f} nats/token ({nll_verdict(sampled)})
  identical to greedy       {r['identical'] and one['identical'] and adaptive['identical']}
  machine load              {os.getloadavg()[0]:.1f} (1-min average) on {os.cpu_count()} cores; timings are medians of 5""")
  from blockdec import Blockwise, Eagle  # pylint: disable=g-import-not-at-top
  _cached_drafter(texts, sample, "Stern heads (corpus)", FROZEN_CONFIG,
                  Blockwise(block_size=8), 4)
  _cached_drafter(texts, sample, "EAGLE drafter", EAGLE_CONFIG,
                  Eagle(block_size=8), 15)
  print(f"  total time                {time.perf_counter() - t0:.0f} s")


def _cached_drafter(texts, sample, label, config, method, minutes):
  """A drafter trained on the same frozen base, decoded when it is cached."""
  run = pipeline.cached_run(config, CACHE_DIR, required=False,
                            log=lambda _: None)
  if run is None:
    print(f"  {label:<26}not trained; `blockdec train --config {config}` "
          f"(about {minutes} minutes) adds it here")
    return
  r = evaluation.compare_decoding(run.params, run.cfg, run.tokenizer, texts,
                                  max_new_tokens=NEW_TOKENS, repeats=5,
                                  method=method)
  one = evaluation.compare_decoding(run.params, run.cfg, run.tokenizer,
                                    [texts[sample]], max_new_tokens=NEW_TOKENS,
                                    method=method)
  print(f"""  {label}, k=8 (exact, same frozen base: {config})
  batch {len(texts)}: {r['blockwise_tokens_per_s']:.0f} tokens/s, speedup {r['speedup']:.2f}x, {r['block_efficiency']:.2f} tokens per call ({r['block_efficiency_non_degenerate']:.2f} non-degenerate rows), identical to greedy {r['identical']}
  batch 1 (prompt {sample}): speedup {one['speedup']:.2f}x, {one['block_efficiency']:.2f} tokens per call""")


if __name__ == "__main__":
  main()
