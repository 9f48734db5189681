r"""When prompt lookup's drafts are worth verifying: match length vs survival.

Prompt lookup drafts what followed the last n tokens the previous time they
occurred. A k-token verification call costs more than a one-token step on a
CPU (`experiments/step_costs.py`), so verifying drafts that will not
survive loses time. This measures, on the `make demo` model's greedy text,
how many drafts survive as a function of the match length behind them, and
picks `PromptLookup(min_match=...)`: matches shorter than it propose nothing
and the row takes a plain one-token step.

Three parts, all at batch 1 on the 128-byte prompts of
`experiments/hf_peers.py` (held-out stdlib files and third-party packages):

1. Replay. Greedy decoding is exact for every drafter, so the greedy text
   fixes each call's outcome: starting at generated index t, the drafts
   `prompt_lookup.lookup` proposes there (ngram 3, 15 drafts) survive as far
   as they agree with the greedy text, and the next call starts after them.
   The replay counts calls and surviving drafts per match length (0 = no
   match) over `--num_prompts` prompts per set.
2. Model. With each call size's cost measured here
   (`blockdec.measure_call_costs`, in one-token calls), the speedup over
   greedy of "verify T tokens when the match is at least m tokens long, else
   one" is (tokens) / (sum of call costs); the oracle verifies exactly what
   survives (its bound). The replay is repeated with longer n-grams
   (`LONGER_NGRAMS`), verifying only after a match of all n tokens.
3. Measurement. blockdec's greedy loop and prompt lookup variants
   (`AdaptiveBlockSize` with the measured costs, `min_match` 1..3, block 11
   and 16), side by side on the first 8 prompts one at a time (passes
   interleaved, median of `--repeats`), beside the model's speedup for the
   same 8 prompts (the set experiments/hf_peers.py measures).

Launch (from the repository root; trains the demo base first when the cache
lacks it, as `make demo` does):

  python experiments/prompt_lookup_policy.py   # -> experiments/results/prompt_lookup_policy.{json,md,png}
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import blockdec
from blockdec import metrics
from blockdec.decoding.drafters import prompt_lookup

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"

NGRAM, DRAFTS = 3, 15
PROMPT, NEW = 128, 64
# (min_match, block_size) of the measured variants; (1, 11) is the setting
# experiments/hf_peers.py ran before this study.
VARIANTS = ((1, 11), (2, 11), (3, 11), (3, 16))
# Longer n-grams replayed beside NGRAM: is a longer match a better bet?
LONGER_NGRAMS = (6, 10)
# The block experiments/hf_peers.py's prompt lookup verifies.
HF_PEERS_BLOCK = 11


@functools.partial(jax.jit, static_argnums=(4, 5))
def _lookup_at(prompts, greedy, lengths, next_token, ngram, num_drafts):
  """`prompt_lookup.lookup` for rows `lengths` tokens into `greedy`."""
  seq, end = prompt_lookup.context_tokens(
      prompts, jnp.full(prompts.shape[:1], prompts.shape[1], jnp.int32),
      greedy, lengths, next_token)
  return prompt_lookup.lookup(seq, end, ngram, num_drafts)


def replay(prompts: np.ndarray, greedy: np.ndarray, ngram: int = NGRAM,
           num_drafts: int = DRAFTS):
  """Each call of prompt lookup verifying all its drafts, read off the greedy
  text (batched over rows with the library's own lookup).

  Args:
    prompts: [B, P] int32, every row P tokens long.
    greedy: [B, N] int32 the greedy continuation (no EOS).

  Returns:
    (matched [C], accepted [C], calls [B]): per call, the match length used
    (0: none, at most `ngram`) and the drafts that agree with the greedy
    text (at most `num_drafts` and the budget; with no match, the filler);
    calls per row.
  """
  batch, n = greedy.shape
  t = np.zeros(batch, np.int64)
  matched_all, accepted_all, calls = [], [], np.zeros(batch, np.int64)
  padded = np.concatenate([greedy, np.full((batch, num_drafts + 1), -1)], 1)
  rows = np.arange(batch)
  while (t < n).any():
    active = t < n
    at = np.minimum(t, n - 1).astype(np.int32)
    drafts, matched = _lookup_at(prompts, greedy, at, greedy[rows, at],
                                 ngram, num_drafts)
    drafts, matched = np.asarray(drafts), np.asarray(matched)
    truth = padded[rows[:, None], t[:, None] + 1 + np.arange(num_drafts)]
    # No match drafts the next token repeated (filler); it survives where
    # the text repeats that token, as in the decode without the rule.
    accepted = np.cumprod(drafts == truth, axis=1).sum(1)
    accepted = np.minimum(accepted, np.maximum(n - 1 - t, 0))
    matched_all.append(matched[active])
    accepted_all.append(accepted[active])
    calls += active
    t = np.where(active, t + 1 + accepted, t)
  return np.concatenate(matched_all), np.concatenate(accepted_all), calls


def modeled_speedup(matched, accepted, costs: dict, min_match: int,
                    size: int) -> float:
  """Tokens per one-token-call cost of "verify `size` tokens where the match
  is >= min_match, else 1" (calls replayed with all drafts verified; a call
  verifying T keeps min(accepted, T - 1) of them; the calls after a shorter
  call differ, which this first-order model ignores: it is exact for the
  oracle and for T >= the longest surviving run)."""
  size_of = np.where(matched >= min_match, size, 1)
  tokens = 1 + np.minimum(accepted, size_of - 1)
  cost = np.asarray([costs[int(s)] for s in size_of])
  return float(tokens.sum() / cost.sum())


def oracle_speedup(accepted, costs: dict) -> float:
  """The bound: every call verifies exactly its surviving drafts."""
  cost = np.asarray([costs[int(a) + 1] for a in accepted])
  return float((1 + accepted).sum() / cost.sum())


def by_match_length(matched, accepted, ngram: int = NGRAM) -> list[dict]:
  return [{"match_length": m, "calls": int((matched == m).sum()),
           "share": float((matched == m).mean()),
           "mean_surviving_drafts": float(accepted[matched == m].mean())
           if (matched == m).any() else 0.0}
          for m in range(ngram + 1)]


def longer_ngrams(prompts, greedy, costs: dict, sizes,
                  base: tuple) -> list[dict]:
  """Per n-gram length in (NGRAM,) + LONGER_NGRAMS: the calls whose match
  has that full length, the drafts that survive them, and the modeled
  speedup of verifying T only after such a match (min_match = ngram).
  `base`: (matched, accepted) of the NGRAM replay, already made."""
  rows = []
  for ngram in (NGRAM,) + LONGER_NGRAMS:
    matched, accepted = (base if ngram == NGRAM else
                         replay(prompts, greedy, ngram=ngram)[:2])
    full = matched == ngram
    rows.append({
        "ngram": ngram, "full_match_share": float(full.mean()),
        "mean_surviving_after_full": float(accepted[full].mean())
        if full.any() else 0.0,
        "none_survive_after_full": float((accepted[full] == 0).mean())
        if full.any() else 0.0,
        "modeled": [modeled_speedup(matched, accepted, costs, ngram, t)
                    for t in sizes]})
  return rows


def demo_base(cache_dir: str):
  from blockdec.training import pipeline
  run = pipeline.train_or_load(pipeline.load_config(
      ROOT / "configs" / "base_lm.py", "demo"), cache_dir)
  return run.cfg, run.params, str(run.workdir)


def _hf_peers():
  """experiments/hf_peers.py (its prompt sets and helpers), imported when
  needed: it loads torch."""
  import sys
  sys.path.insert(0, str(ROOT / "experiments"))
  import hf_peers
  return hf_peers


def measure(cfg, params, prompts, costs, repeats: int) -> list[dict]:
  """Greedy and the prompt lookup VARIANTS on `prompts` one row at a time,
  passes interleaved; tokens/s medians and their ratio to greedy."""
  methods = {"greedy": blockdec.Autoregressive()}
  for m, k in VARIANTS:
    sizes = tuple(t for t in (1, 2, 4, 8, k) if t <= k)
    rule = blockdec.AdaptiveBlockSize(
        call_costs=tuple((t, costs[t]) for t in sizes))
    methods[f"prompt-lookup min_match={m} block={k}"] = blockdec.PromptLookup(
        ngram=NGRAM, block_size=k, min_match=m, adaptive=rule)
  lengths = jnp.full((1,), prompts.shape[1], jnp.int32)

  hf_peers = _hf_peers()

  def run(method):
    return lambda: hf_peers.one_by_one(lambda row: blockdec.decode(
        params, cfg, jnp.asarray(row), lengths, NEW, method=method), prompts)

  timings = hf_peers.interleaved(
      {name: run(method) for name, method in methods.items()}, repeats)
  outs = {name: timing[3] for name, timing in timings.items()}
  rows = []
  base = None
  for name, out in outs.items():
    tokens = int(np.asarray(out.lengths).sum())
    tps = tokens / timings[name][1]
    base = tps if base is None else base
    rows.append({"system": name, "tokens_per_s": tps,
                 "x_greedy": tps / base,
                 "tokens_per_call": tokens / int(np.asarray(out.num_calls).sum()),
                 "same_tokens_as_greedy": bool(np.array_equal(
                     out.tokens, outs["greedy"].tokens))})
  return rows


def markdown(r: dict) -> str:
  lines = ["# Prompt lookup: which matches are worth verifying", "",
           f"Machine: {r['machine']}.", "", f"Command: `{r['command']}`.", "",
           f"The `make demo` model ({r['model']}), byte-level, batch 1, "
           f"{PROMPT}-byte prompts, {NEW} new tokens, ngram {NGRAM}, "
           f"{DRAFTS} drafts per call. Call costs measured here, in one-token "
           "calls: " + ", ".join(f"T={t}: {c:.2f}" for t, c in
                                 r["call_costs"].items()) + ".", ""]
  for s in r["sets"]:
    lines += [f"## {s['prompt_set']} ({s['num_prompts']} prompts)", "",
              "| match length | share of calls | calls | mean surviving drafts |",
              "|---|---|---|---|"]
    lines += [f"| {b['match_length']} | {b['share']:.0%} | {b['calls']} | "
              f"{b['mean_surviving_drafts']:.2f} |" for b in s["by_match"]]
    lines += ["", "Modeled speedup over greedy (verify T where the match is "
              ">= m tokens, else a one-token step); oracle (verify exactly "
              f"what survives): **{s['oracle']:.2f}x**.", "",
              "| m \\ T | " + " | ".join(str(t) for t in s["sizes"]) + " |",
              "|---|" + "---|" * len(s["sizes"])]
    for m, row in s["modeled"].items():
      lines.append(f"| {m} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    if s.get("longer"):
      lines += ["", "Longer n-grams (the same replay with ngram n; verify T "
                "only after a match of all n tokens):", "",
                "| ngram | calls with a full match | mean surviving drafts "
                "after it | none survive | " + " | ".join(
                    f"T={t}" for t in s["sizes"]) + " |",
                "|---|---|---|---|" + "---|" * len(s["sizes"])]
      lines += [f"| {g['ngram']} | {g['full_match_share']:.0%} | "
                f"{g['mean_surviving_after_full']:.2f} | "
                f"{g['none_survive_after_full']:.0%} | " + " | ".join(
                    f"{v:.2f}" for v in g["modeled"]) + " |"
                for g in s["longer"]]
    if s.get("measured"):
      lines += ["", f"Measured, first {len(s['measured_prompts'])} prompts "
                f"one at a time, median of {r['repeats']} interleaved passes "
                "(modeled: the replay of those prompts alone):",
                "", "| system | tokens/s | x greedy | modeled x greedy | "
                "tokens/call | same tokens as greedy |",
                "|---|---|---|---|---|---|"]
      lines += [f"| {m['system']} | {m['tokens_per_s']:.0f} | "
                f"{m['x_greedy']:.2f} | "
                + (f"{m['modeled_x_greedy']:.2f}" if "modeled_x_greedy" in m
                   else "–")
                + f" | {m['tokens_per_call']:.2f} | "
                f"{m['same_tokens_as_greedy']} |" for m in s["measured"]]
    lines.append("")
  lines += ["## Reading", "", r["reading"], ""]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--num_prompts", type=int, default=64,
                 help="prompts per set in the replay")
  p.add_argument("--repeats", type=int, default=5, help="timed passes")
  p.add_argument("--cache_dir", default=str(ROOT / "cache"))
  p.add_argument("--out", default=str(RESULTS / "prompt_lookup_policy"))
  args = p.parse_args(argv)
  if not 8 <= args.num_prompts <= 256:
    p.error(f"--num_prompts={args.num_prompts}; allowed: 8 .. 256.")
  load = os.getloadavg()[0]
  cfg, params, workdir = demo_base(args.cache_dir)
  sizes = (2, 4, 8, 11, 16)
  costs = dict(blockdec.measure_call_costs(
      params, cfg, batch=1, sizes=tuple(range(1, DRAFTS + 2)), repeats=50))
  result = {"model": os.path.relpath(workdir, ROOT),
            "call_costs": {str(t): c for t, c in costs.items()},
            "repeats": args.repeats, "sets": []}
  for prompt_set in _hf_peers().PROMPT_SETS:
    prompts = _hf_peers().byte_prompts(prompt_set, args.num_prompts, PROMPT)
    greedy = np.asarray(blockdec.decode(
        params, cfg, jnp.asarray(prompts),
        jnp.full((len(prompts),), PROMPT, jnp.int32), NEW,
        method=blockdec.Autoregressive()).tokens)
    matched, accepted, _ = replay(prompts, greedy)
    s = {"prompt_set": prompt_set, "num_prompts": args.num_prompts,
         "by_match": by_match_length(matched, accepted),
         "oracle": oracle_speedup(accepted, costs), "sizes": list(sizes),
         "modeled": {str(m): [modeled_speedup(matched, accepted, costs, m, t)
                              for t in sizes] for m in range(1, NGRAM + 1)}}
    s["longer"] = longer_ngrams(prompts, greedy, costs, sizes,
                                base=(matched, accepted))
    s["measured_prompts"] = list(range(8))
    s["measured"] = measure(cfg, params, prompts[:8], costs, args.repeats)
    # The model on the measured prompts alone, beside each measured variant.
    few = replay(prompts[:8], greedy[:8])
    for m, (min_match, k) in zip(s["measured"][1:], VARIANTS):
      m["modeled_x_greedy"] = modeled_speedup(few[0], few[1], costs,
                                              min_match, k)
    result["sets"].append(s)
    print(f"{prompt_set}: oracle {s['oracle']:.2f}x; measured "
          + ", ".join(f"{m['system']} {m['x_greedy']:.2f}x"
                      for m in s["measured"]), flush=True)
  result["reading"] = reading(result)
  out = metrics.write_results(args.out, result, markdown,
                              script="experiments/prompt_lookup_policy.py",
                              argv=argv, load_before=load)
  plot(result, out.with_suffix(".png"))
  print(f"wrote {out}.json, .md and .png")


def plot(r: dict, path) -> None:
  """Left: drafts that survive per match length; right: the measured
  variants' speed over greedy, per prompt set."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  width = 0.8 / len(r["sets"])
  for i, s in enumerate(r["sets"]):
    lengths = [b["match_length"] for b in s["by_match"]]
    left.bar(np.asarray(lengths) + i * width,
             [b["mean_surviving_drafts"] for b in s["by_match"]], width,
             label=s["prompt_set"])
    names = [m["system"].replace("prompt-lookup ", "") for m in s["measured"]]
    right.bar(np.arange(len(names)) + i * width,
              [m["x_greedy"] for m in s["measured"]], width,
              label=s["prompt_set"])
  left.set_xticks(np.asarray(lengths) + width / 2, [str(m) for m in lengths])
  left.set_xlabel("match length (tokens; 0 = none)")
  left.set_ylabel("mean drafts that survive")
  left.set_title(f"{DRAFTS} drafts after the longest match")
  right.axhline(1.0, color="gray", lw=0.8)
  right.set_xticks(np.arange(len(names)) + width / 2, names, rotation=20,
                   ha="right", fontsize=8)
  right.set_ylabel("tokens/s over greedy")
  right.set_title("measured, batch 1")
  left.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _longer_verdict(longer: list[dict], t: int) -> str:
  """Whether a longer n-gram pays, read from the modeled speedups at T."""
  best = max(longer, key=lambda g: g["modeled"][t])
  spread = best["modeled"][t] - min(g["modeled"][t] for g in longer)
  if spread < 0.05:
    return (f"They model within {spread:.2f}x of each other: a longer match "
            "keeps more drafts but is found in fewer calls.")
  return (f"ngram {best['ngram']} models best, {spread:.2f}x above the "
          "worst.")


def reading(r: dict) -> str:
  """The paragraph under the tables, from the numbers."""
  parts = []
  for s in r["sets"]:
    short = s["by_match"][1]
    best = max(s["measured"][1:], key=lambda m: m["x_greedy"])
    parts.append(
        f"{s['prompt_set']}: {short['share']:.0%} of calls find only a "
        f"1-token match and keep {short['mean_surviving_drafts']:.2f} drafts "
        f"on average; the best measured variant is {best['system']} at "
        f"{best['x_greedy']:.2f}x greedy (oracle bound {s['oracle']:.2f}x).")
    if "modeled_x_greedy" in best:
      parts.append(
          f"On the same {len(s['measured_prompts'])} prompts the model gives "
          f"it {best['modeled_x_greedy']:.2f}x: the measured loop runs at "
          f"{best['x_greedy'] / best['modeled_x_greedy']:.2f} of its "
          "model.")
    if s.get("longer"):
      # Read at the block experiments/hf_peers.py verifies, if modeled.
      t = (s["sizes"].index(HF_PEERS_BLOCK) if HF_PEERS_BLOCK in s["sizes"]
           else -1)
      parts.append(
          "Longer n-grams: " + "; ".join(
              f"ngram {g['ngram']} keeps {g['mean_surviving_after_full']:.2f} "
              f"drafts after a full match ({g['full_match_share']:.0%} of "
              f"calls), modeled {g['modeled'][t]:.2f}x at T={s['sizes'][t]}"
              for g in s["longer"])
          + ". " + _longer_verdict(s["longer"], t))
  return " ".join(parts)


if __name__ == "__main__":
  main()
