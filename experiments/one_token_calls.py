r"""What a one-token call costs inside prompt lookup's adaptive loop.

`experiments/prompt_lookup_policy.py` models prompt lookup's speedup with a
one-token call priced at one greedy step, and its measured loop runs below
that model. This isolates the one-token calls: every system below decodes
the same 8 site-packages prompts (`experiments/hf_peers.py`'s set, batch 1,
64 new tokens) with every call verifying one token, so the ratio of its time
to blockdec's greedy loop is the cost of its one-token call in greedy
steps. The systems:

  greedy        blockdec.Autoregressive(), the plain greedy loop.
  no-rule       PromptLookup(block_size=1): the drafting loop, no rule.
  one-size      PromptLookup(block 11, min_match 3) with an adaptive rule
                whose only size is 1 (no `lax.switch`: one branch inlines).
  five-sizes    the same with the sizes experiments/hf_peers.py uses
                (1, 2, 4, 8, 11), costed so that no draft ever pays: the
                switch stays, and every call takes its one-token branch.

Every system is timed once per round, in turn, and each round's times are
divided by that round's greedy time; the medians over rounds are reported
(the machine's speed drifts between rounds, not within one).

Launch (from the repository root; trains the demo model first when the
cache lacks it, as `make demo` does):

  python experiments/one_token_calls.py   # -> experiments/results/one_token_calls.{json,md}
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import blockdec
from blockdec import metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
PROMPT, NEW, ROWS = 128, 64, 8
SIZES = (1, 2, 4, 8, 11)  # experiments/hf_peers.py's prompt lookup sizes.


def systems() -> dict:
  never = tuple((t, 1.0 if t == 1 else 100.0) for t in SIZES)
  lookup = lambda costs: blockdec.PromptLookup(
      ngram=3, block_size=SIZES[-1], min_match=3,
      adaptive=blockdec.AdaptiveBlockSize(call_costs=costs))
  return {"greedy": blockdec.Autoregressive(),
          "no-rule": blockdec.PromptLookup(ngram=3, block_size=1),
          "one-size": lookup(((1, 1.0),)),
          "five-sizes": lookup(never)}


def measure(cfg, params, prompts, repeats: int,
            new_tokens: int = NEW) -> list[dict]:
  lengths = jnp.full((1,), prompts.shape[1], jnp.int32)
  rows = [jnp.asarray(prompts[i:i + 1]) for i in range(prompts.shape[0])]

  def run(method):
    outs = [blockdec.decode(params, cfg, row, lengths, new_tokens,
                            method=method)
            for row in rows]
    jax.block_until_ready([o.tokens for o in outs])
    return outs

  methods = systems()
  outs = {name: run(m) for name, m in methods.items()}  # Compiles.
  times = {name: [] for name in methods}
  for r in range(repeats):
    names = list(methods) if r % 2 == 0 else list(methods)[::-1]
    for name in names:
      start = time.perf_counter()
      run(methods[name])
      times[name].append(time.perf_counter() - start)
  greedy = np.asarray(times["greedy"])
  result = []
  for name, out in outs.items():
    calls = sum(int(np.asarray(o.num_calls).sum()) for o in out)
    tokens = sum(int(np.asarray(o.lengths).sum()) for o in out)
    result.append({
        "system": name, "calls": calls, "tokens": tokens,
        "ms_per_call": 1e3 * float(np.median(times[name])) / calls,
        "x_greedy_time": float(np.median(np.asarray(times[name]) / greedy)),
        "same_tokens_as_greedy": all(
            np.array_equal(a.tokens, b.tokens)
            for a, b in zip(out, outs["greedy"]))})
  return result


def markdown(r: dict) -> str:
  lines = ["# One-token calls in prompt lookup's adaptive loop", "",
           f"Machine: {r['machine']}.", "", f"Command: `{r['command']}`.", "",
           f"The demo model ({r['model']}), {ROWS} site-packages prompts of "
           f"{PROMPT} bytes one at a time, {NEW} new tokens, every call "
           f"verifying one token; medians over {r['repeats']} interleaved "
           "rounds of each round's time over its greedy time.", "",
           "| system | calls | ms/call | time / greedy | same tokens as "
           "greedy |", "|---|---|---|---|---|"]
  lines += [f"| {m['system']} | {m['calls']} | {m['ms_per_call']:.3f} | "
            f"{m['x_greedy_time']:.3f} | {m['same_tokens_as_greedy']} |"
            for m in r["measured"]]
  lines += ["", "## Reading", "", reading(r), ""]
  return "\n".join(lines)


def reading(r: dict) -> str:
  x = {m["system"]: m["x_greedy_time"] for m in r["measured"]}
  return (f"A one-token call costs {x['no-rule']:.2f} greedy steps in the "
          f"drafting loop without the rule, {x['one-size']:.2f} with the "
          f"rule but no switch, and {x['five-sizes']:.2f} through the "
          f"switch over {len(SIZES)} sizes: the switch adds "
          f"{x['five-sizes'] / x['one-size'] - 1:+.0%} and the rule "
          f"{x['one-size'] / x['no-rule'] - 1:+.0%}.")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=21, help="timed rounds")
  p.add_argument("--cache_dir", default=str(ROOT / "cache"))
  p.add_argument("--out", default=str(RESULTS / "one_token_calls"))
  args = p.parse_args(argv)
  if args.repeats < 1:
    p.error(f"--repeats={args.repeats}; allowed: >= 1.")
  load = os.getloadavg()[0]
  sys.path.insert(0, str(ROOT / "experiments"))
  import hf_peers  # pylint: disable=g-import-not-at-top
  cfg, params, _, workdir = hf_peers.demo_model(args.cache_dir)
  prompts = hf_peers.byte_prompts("site-packages", ROWS, PROMPT)
  result = {"model": os.path.relpath(workdir, ROOT) if workdir else "random",
            "repeats": args.repeats,
            "measured": measure(cfg, jax.device_put(params), prompts,
                                args.repeats)}
  out = metrics.write_results(args.out, result, markdown,
                              script="experiments/one_token_calls.py",
                              argv=argv, load_before=load)
  print(reading(result))
  print(f"wrote {out}.json and .md")


if __name__ == "__main__":
  main()
