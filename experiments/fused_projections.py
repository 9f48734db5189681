r"""Fused query/key/value and gate/up projections in decoding's calls, on and off.

On XLA:CPU `blockdec.decode` joins each layer's query, key and value kernels
into one matrix, and gate and up into another, once per set of weights
(`api.with_fused_projections`); calls of at most
`transformer.FUSED_MAX_TOKENS` tokens then make 4 matrix products per layer
where they made 7 (the prefill keeps the separate kernels). This measures
what that buys, side by side in one process (`api.FUSE_PROJECTIONS_ON_CPU`
switched between the two), on the `make demo` model at batch 1:

  decodes   blockdec greedy, the heads (`Blockwise(8)`), prompt lookup
            (experiments/hf_peers.py's setting: ngram 3, min_match 3, block
            11, the adaptive rule with call costs measured here) and the
            draft model (the distilled
            draft of configs/draft_model.py:demo, block 16; only the
            target's calls are fused: fusing the 1-layer, d = 128 draft's
            steps too ran 0.99-1.01x), each on the 8 prompts of a set one
            at a time, 64 new tokens. Every round decodes each prompt with
            both settings, in alternating order, so both see the same
            machine; reported: the median over rounds of (time off) /
            (time on), its quartiles, and whether the tokens are identical.
            Greedy and the heads again with the 8 prompts as one batch.
  calls     one target call of T tokens inside a compiled loop
            (`calibration.call_timer`), both settings, in one-token calls
            of the separate kernels (interleaved rounds).

Launch (from the repository root; trains the demo model and the draft first
when the cache lacks them, as experiments/hf_peers.py does):

  python experiments/fused_projections.py   # -> experiments/results/fused_projections.{json,md}
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
from blockdec import api, calibration, metrics
from blockdec.models import transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
PROMPT, NEW, ROWS = 128, 64, 8
# Decoding's call sizes, and a prefill's (128 tokens): for sizes above
# transformer.FUSED_MAX_TOKENS the fused row is compiled with that limit
# raised, i.e. what fusing the prefill too would cost.
CALL_SIZES = (1, 2, 4, 8, 11, 16, 128)


def systems(draft, costs) -> dict:
  """The decoding methods compared (draft: (cfg, params) or None; costs:
  prompt lookup's call costs)."""
  out = {"greedy": blockdec.Autoregressive(),
         "prompt-lookup": blockdec.PromptLookup(
             ngram=3, block_size=11, min_match=3,
             adaptive=blockdec.AdaptiveBlockSize(call_costs=costs))}
  if draft is not None:
    out["draft-model"] = blockdec.DraftModel(*draft, block_size=16)
  return out


def batch_systems(cfg) -> dict:
  """The methods also measured with the 8 prompts as one batch."""
  out = {"greedy": blockdec.Autoregressive()}
  if cfg.num_prediction_heads >= 8:
    out["blockwise"] = blockdec.Blockwise(block_size=8)
  return out


def side_by_side(cfg, params, prompts, methods: dict, repeats: int, switch,
                 new_tokens: int = NEW, batch: int = 1) -> list[dict]:
  """Per method: time with a setting off over time with it on, per round
  (median and quartiles), and whether both gave the same tokens.

  switch(on) sets the setting; it is left on. batch 1: the prompts one at
  a time; else all of them as one batch. Every round decodes each prompt
  both ways, in alternating order.
  """
  if batch == 1:
    rows = [jnp.asarray(prompts[i:i + 1]) for i in range(prompts.shape[0])]
  else:
    rows = [jnp.asarray(prompts)]
  lengths = jnp.full((rows[0].shape[0],), prompts.shape[1], jnp.int32)

  def one(method, row, on):
    switch(on)
    try:
      start = time.perf_counter()
      out = blockdec.decode(params, cfg, row, lengths, new_tokens,
                            method=method)
      jax.block_until_ready(out.tokens)
      return time.perf_counter() - start, out
    finally:
      switch(True)

  result = []
  for name, method in methods.items():
    outs = {f: [one(method, row, f)[1] for row in rows] for f in (True, False)}
    ratios, totals = [], {True: 0.0, False: 0.0}
    for r in range(repeats):
      spent = {True: 0.0, False: 0.0}
      for i, row in enumerate(rows):
        order = (True, False) if (r + i) % 2 == 0 else (False, True)
        for on in order:
          spent[on] += one(method, row, on)[0]
      ratios.append(spent[False] / spent[True])
      for f in spent:
        totals[f] += spent[f]
    tokens = sum(int(np.asarray(o.lengths).sum()) for o in outs[True])
    calls = sum(int(np.asarray(o.num_calls).sum()) for o in outs[True])
    result.append({
        "system": name, "batch": rows[0].shape[0],
        "tokens_per_call": tokens / calls,
        # (per decode call: one prompt at batch 1, all of them at batch 8)
        "ms_on": 1e3 * totals[True] / repeats / len(rows),
        "ms_off": 1e3 * totals[False] / repeats / len(rows),
        "speedup": float(np.median(ratios)),
        "speedup_q25": float(np.percentile(ratios, 25)),
        "speedup_q75": float(np.percentile(ratios, 75)),
        "same_tokens": all(np.array_equal(a.tokens, b.tokens)
                           for a, b in zip(outs[True], outs[False]))})
  return result


def measure(cfg, params, prompts, methods: dict, repeats: int,
            new_tokens: int = NEW, batch: int = 1) -> list[dict]:
  """`side_by_side` of the fused kernels (on) and the separate ones (off)."""

  def switch(on):
    api.FUSE_PROJECTIONS_ON_CPU = on

  rows = side_by_side(cfg, params, prompts, methods, repeats, switch,
                      new_tokens=new_tokens, batch=batch)
  for row in rows:
    row["ms_per_decode_fused"] = row.pop("ms_on")
    row["ms_per_decode_separate"] = row.pop("ms_off")
  return rows


def call_costs(cfg, params, repeats: int, sizes=CALL_SIZES,
               prompt_len: int = PROMPT) -> list[dict]:
  """Per call size T: its cost with separate and fused kernels, in one-token
  calls of the separate kernels (interleaved rounds), after `prompt_len`
  committed tokens."""
  fused = api.with_fused_projections(params, cfg)
  timers = {}
  limit = transformer.FUSED_MAX_TOKENS
  for t in sizes:
    timers[("separate", t)] = calibration.call_timer(params, cfg, 1, range(t),
                                                     prompt_len=prompt_len)
    transformer.FUSED_MAX_TOKENS = max(limit, t)  # Read when compiling.
    try:
      timers[("fused", t)] = calibration.call_timer(fused, cfg, 1, range(t),
                                                    prompt_len=prompt_len)
    finally:
      transformer.FUSED_MAX_TOKENS = limit
  ratios = calibration.interleaved_ratios(timers, ("separate", 1), repeats)
  return [{"tokens": t, "separate": ratios[("separate", t)],
           "fused": ratios[("fused", t)]} for t in sizes]


def markdown(r: dict) -> str:
  lines = ["# Fused projections in decoding's calls", "",
           f"Machine: {r['machine']}.", "", f"Command: `{r['command']}`.", "",
           f"The demo model ({r['model']}; {r['draft']}), batch 1, {ROWS} "
           f"prompts of {PROMPT} bytes one at a time, {NEW} new tokens. "
           "speedup: time with the separate kernels over time with the fused "
           f"ones, median over {r['repeats']} rounds (each round decodes "
           "every prompt both ways, in alternating order), quartiles in "
           "brackets. Prompt lookup's call costs, measured here: "
           + ", ".join(f"T={t}: {c:.2f}" for t, c in r["lookup_costs"])
           + ".", ""]
  for s in r["sets"]:
    lines += [f"## {s['prompt_set']}", "",
              "| system | batch | tokens/call | ms/decode separate | "
              "ms/decode fused | speedup | same tokens |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {m['system']} | {m.get('batch', 1)} | "
              f"{m['tokens_per_call']:.2f} | "
              f"{m['ms_per_decode_separate']:.1f} | "
              f"{m['ms_per_decode_fused']:.1f} | **{m['speedup']:.3f}x** "
              f"({m['speedup_q25']:.3f}-{m['speedup_q75']:.3f}) | "
              f"{m['same_tokens']} |" for m in s["measured"]]
    lines.append("")
  lines += ["## One call of T tokens", "",
            "In one-token calls with the separate kernels (median of "
            f"{r['call_repeats']} interleaved rounds). Above "
            f"{r['fused_max_tokens']} tokens (a prefill) decoding keeps the "
            "separate kernels; the fused column says what fusing there "
            "would cost.", "",
            "| T | separate | fused | separate / fused |", "|---|---|---|---|"]
  lines += [f"| {c['tokens']} | {c['separate']:.2f} | {c['fused']:.2f} | "
            f"{c['separate'] / c['fused']:.3f} |" for c in r["calls"]]
  lines += ["", "## Reading", "", reading(r), ""]
  return "\n".join(lines)


def reading(r: dict) -> str:
  parts = []
  for s in r["sets"]:
    parts.append(f"{s['prompt_set']}: " + ", ".join(
        f"{m['system']} (batch {m.get('batch', 1)}) {m['speedup']:.3f}x"
        for m in s["measured"]))
  same = all(m["same_tokens"] for s in r["sets"] for m in s["measured"])
  text = ("Decoding with the fused kernels over the separate ones, same "
          "machine, same rounds: " + "; ".join(parts) + ". "
          + ("Every decode gave the same tokens both ways." if same else
             "SOME DECODES DIFFER between the two settings."))
  calls = {c["tokens"]: c["separate"] / c["fused"] for c in r["calls"]}
  if 1 in calls:
    text += (f" Timed alone in a loop of its own, a one-token call runs "
             f"{calls[1]:.3f}x with the fused kernels: the gain shows in "
             "the decoding loop, not in the bare call.")
  wide = [t for t in calls if t > r["fused_max_tokens"]]
  if wide:
    text += (f" A {wide[-1]}-token call (a prefill) would run "
             f"{calls[wide[-1]]:.3f}x fused, so the prefill keeps the "
             "separate kernels.")
  return text


def _hf_peers():
  sys.path.insert(0, str(ROOT / "experiments"))
  import hf_peers  # pylint: disable=g-import-not-at-top
  return hf_peers


def demo_setup(parser, prompt_sets: str, cache_dir: str):
  """The prompt sets (checked; parser.error on an unknown one), the make
  demo model and its distilled draft, trained first where the cache lacks
  them: (sets, cfg, params, workdir, (draft_cfg, draft_params), draft_note),
  the weights on the device."""
  hf_peers = _hf_peers()
  sets = prompt_sets.split(",")
  unknown = sorted(set(sets) - set(hf_peers.PROMPT_SETS))
  if unknown:
    parser.error(f"--prompt_sets: {unknown} unknown; allowed: "
                 f"{hf_peers.PROMPT_SETS}.")
  cfg, params, trained, workdir = hf_peers.demo_model(cache_dir)
  params = jax.device_put(params)
  draft_cfg, draft_params, draft_note = hf_peers.draft_for(
      cfg, params, cache_dir, "demo" if trained else None, train=trained)
  draft_note = draft_note.replace(str(ROOT) + os.sep, "")  # Repo-relative.
  return (sets, cfg, params, workdir,
          (draft_cfg, jax.device_put(draft_params)), draft_note)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=15, help="timed rounds")
  p.add_argument("--call_repeats", type=int, default=25,
                 help="rounds of the per-call timing")
  p.add_argument("--prompt_sets", default="stdlib,site-packages")
  p.add_argument("--cache_dir", default=str(ROOT / "cache"))
  p.add_argument("--out", default=str(RESULTS / "fused_projections"))
  args = p.parse_args(argv)
  if args.repeats < 1 or args.call_repeats < 1:
    p.error(f"--repeats={args.repeats}, --call_repeats={args.call_repeats}; "
            "allowed: >= 1.")
  load = os.getloadavg()[0]
  hf_peers = _hf_peers()
  sets, cfg, params, workdir, (draft_cfg, draft_params), draft_note = \
      demo_setup(p, args.prompt_sets, args.cache_dir)
  costs = blockdec.measure_call_costs(params, cfg, batch=1,
                                      sizes=hf_peers.COST_SIZES,
                                      prompt_len=PROMPT)
  methods = systems((draft_cfg, draft_params), costs)
  result = {"model": os.path.relpath(workdir, ROOT) if workdir else "random",
            "draft": draft_note, "repeats": args.repeats,
            "call_repeats": args.call_repeats,
            "fused_max_tokens": transformer.FUSED_MAX_TOKENS,
            "lookup_costs": [list(c) for c in costs], "sets": []}
  if cfg.num_prediction_heads >= 8:
    methods["blockwise"] = blockdec.Blockwise(block_size=8)
  for prompt_set in sets:
    prompts = hf_peers.byte_prompts(prompt_set, ROWS, PROMPT)
    result["sets"].append({"prompt_set": prompt_set, "measured": measure(
        cfg, params, prompts, methods, args.repeats) + measure(
            cfg, params, prompts, batch_systems(cfg), args.repeats,
            batch=ROWS)})
    print(f"{prompt_set}: " + ", ".join(
        f"{m['system']} b{m['batch']} {m['speedup']:.3f}x"
        for m in result["sets"][-1]["measured"]), flush=True)
  result["calls"] = call_costs(cfg, params, args.call_repeats)
  out = metrics.write_results(args.out, result, markdown,
                              script="experiments/fused_projections.py",
                              argv=argv, load_before=load)
  print(reading(result))
  print(f"wrote {out}.json and .md")


if __name__ == "__main__":
  main()
