r"""XLA:CPU's decoding compile options (blockdec/cpu_compile.py), on and off.

A decode whose weights live on the CPU compiles with
`cpu_compile.DECODE_OPTIONS` (YNNPACK's library fusions off, Eigen on one
thread). This measures what that does, side by side in one process
(`cpu_compile.ENABLED` switched between the two):

  calls     one target call of T tokens inside a compiled loop, as decoding
            makes it (`calibration.call_timer`), both ways, interleaved
            rounds: the make demo model at batch 1 and 8, and a model of
            configs/base_lm.py:mid's shape (54 MB of weights, past the
            last-level cache, as on accelerators) with random weights at
            batch 1. In milliseconds and in one-token calls of the default
            compile.
  decodes   the make demo model's decodes on the 8 hf_peers prompts of each
            set (64 new tokens): greedy, prompt lookup (hf_peers.py's
            setting; its call costs measured with the options on, as
            `blockdec.measure_call_costs` now times them), the distilled
            draft model (block 16) and the heads (`Blockwise(8)`), one
            prompt at a time; greedy and the heads again as one batch of 8.
            Reported: the median over rounds of (time off) / (time on), and
            whether the tokens are identical.

Launch (from the repository root; trains the demo model and the draft first
when the cache lacks them, as experiments/hf_peers.py does):

  python experiments/cpu_compile_options.py   # -> experiments/results/cpu_compile_options.{json,md,png}
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import matplotlib
import numpy as np

import blockdec
from blockdec import calibration, cpu_compile, metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
PROMPT, ROWS = 128, 8
CALL_SIZES = (1, 2, 4, 8, 11, 16, 128)
MID_SHAPE = (384, 6, 6)  # configs/base_lm.py:mid (d_model, layers, heads)


def switch(on: bool) -> None:
  cpu_compile.ENABLED = on


def call_costs(cfg, params, batch: int, repeats: int,
               sizes=CALL_SIZES) -> list[dict]:
  """Per call size T: ms per call with the options off and on (medians over
  interleaved rounds), and both in one-token calls of the default compile."""
  timers = {}
  for on in (False, True):
    switch(on)  # call_timer picks its compile when made.
    try:
      for t in sizes:
        timers[(on, t)] = calibration.call_timer(params, cfg, batch, range(t),
                                                 prompt_len=PROMPT)
    finally:
      switch(True)
  times = {k: [] for k in timers}
  for r in range(repeats):
    for k in (list(timers) if r % 2 == 0 else list(timers)[::-1]):
      times[k].append(timers[k]())
  base = times[(False, 1)]
  ratio = lambda k: float(np.median([x / b for x, b in zip(times[k], base)]))
  return [{"tokens": t,
           "ms_off": 1e3 * float(np.median(times[(False, t)])),
           "ms_on": 1e3 * float(np.median(times[(True, t)])),
           "cost_off": ratio((False, t)), "cost_on": ratio((True, t)),
           "speedup": float(np.median([a / b for a, b in zip(
               times[(False, t)], times[(True, t)])]))} for t in sizes]


def markdown(r: dict) -> str:
  lines = ["# XLA:CPU's decoding compile options, on and off", "",
           f"Machine: {r['machine']}.", "", f"Command: `{r['command']}`.", "",
           f"Options (blockdec/cpu_compile.py): `{r['options']}`. Both "
           "settings in one process, interleaved rounds; speedup = time "
           "off / time on (median over rounds).", "",
           "## One call of T tokens", "",
           f"After {PROMPT} committed tokens; cost = the call's time in "
           f"one-token calls of the default compile (median of "
           f"{r['call_repeats']} rounds).", ""]
  for block in r["calls"]:
    lines += [f"### {block['model']}, batch {block['batch']}", "",
              "| T | ms off | ms on | cost off | cost on | speedup |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {c['tokens']} | {c['ms_off']:.2f} | {c['ms_on']:.2f} | "
              f"{c['cost_off']:.2f} | {c['cost_on']:.2f} | "
              f"**{c['speedup']:.2f}x** |" for c in block["rows"]]
    lines.append("")
  lines += ["## Decodes", "",
            f"The demo model ({r['model']}; {r['draft']}), {ROWS} prompts "
            f"of {PROMPT} bytes, {r['new_tokens']} new tokens, {r['repeats']} "
            "rounds (each decodes every prompt both ways, in alternating "
            "order); quartiles in brackets. Prompt lookup's call costs, "
            "measured with the options on: "
            + ", ".join(f"T={t}: {c:.2f}" for t, c in r["lookup_costs"])
            + ".", ""]
  for s in r["sets"]:
    lines += [f"### {s['prompt_set']}", "",
              "| system | batch | tokens/call | ms/decode off | ms/decode on "
              "| speedup | same tokens |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {m['system']} | {m['batch']} | {m['tokens_per_call']:.2f} "
              f"| {m['ms_off']:.1f} | {m['ms_on']:.1f} | "
              f"**{m['speedup']:.3f}x** ({m['speedup_q25']:.3f}-"
              f"{m['speedup_q75']:.3f}) | {m['same_tokens']} |"
              for m in s["measured"]]
    lines.append("")
  lines += ["## Reading", "", reading(r), ""]
  return "\n".join(lines)


def reading(r: dict) -> str:
  parts = []
  for block in r["calls"]:
    by_t = {c["tokens"]: c for c in block["rows"]}
    parts.append(f"{block['model']} at batch {block['batch']}: " + ", ".join(
        f"T={t} {by_t[t]['speedup']:.2f}x" for t in by_t))
  text = "Calls with the options on over off: " + "; ".join(parts) + "."
  for s in r["sets"]:
    text += (f" Decodes on {s['prompt_set']}: " + ", ".join(
        f"{m['system']} (batch {m['batch']}) {m['speedup']:.2f}x"
        for m in s["measured"]) + ".")
  same = all(m["same_tokens"] for s in r["sets"] for m in s["measured"])
  text += (" Every decode gave the same tokens both ways." if same else
           " SOME DECODES DIFFER between the two settings.")
  return text


def plot(r: dict, path) -> None:
  blocks = r["calls"]
  fig, axes = plt.subplots(1, len(blocks), figsize=(5 * len(blocks), 4),
                           squeeze=False)
  for ax, block in zip(axes[0], blocks):
    t = [c["tokens"] for c in block["rows"]]
    ax.plot(t, [c["ms_off"] for c in block["rows"]], "o-",
            label="XLA's defaults")
    ax.plot(t, [c["ms_on"] for c in block["rows"]], "s-",
            label="cpu_compile.DECODE_OPTIONS")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per call (T)")
    ax.set_ylabel("ms per call")
    ax.set_title(f"{block['model']}, batch {block['batch']}", fontsize=9)
    ax.legend(fontsize=7)
  fig.suptitle("One target call on XLA:CPU, by compile options")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=9, help="decode rounds")
  p.add_argument("--call_repeats", type=int, default=15,
                 help="rounds of the per-call timing")
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--prompt_sets", default="stdlib,site-packages")
  p.add_argument("--no_mid", action="store_true",
                 help="skip the mid-shaped model's calls")
  p.add_argument("--cache_dir", default=str(ROOT / "cache"))
  p.add_argument("--out", default=str(RESULTS / "cpu_compile_options"))
  args = p.parse_args(argv)
  if min(args.repeats, args.call_repeats, args.new_tokens) < 1:
    p.error(f"--repeats={args.repeats}, --call_repeats={args.call_repeats}, "
            f"--new_tokens={args.new_tokens}; allowed: >= 1.")
  if not cpu_compile.supported():
    p.error("this jaxlib does not take cpu_compile.DECODE_OPTIONS.")
  load = os.getloadavg()[0]
  sys.path.insert(0, str(ROOT / "experiments"))
  import fused_projections  # pylint: disable=g-import-not-at-top
  import hf_peers  # pylint: disable=g-import-not-at-top
  sets, cfg, params, workdir, draft, draft_note = fused_projections.demo_setup(
      p, args.prompt_sets, args.cache_dir)
  model = os.path.relpath(workdir, ROOT) if workdir else "random"
  result = {"model": model, "draft": draft_note,
            "options": cpu_compile.DECODE_OPTIONS, "repeats": args.repeats,
            "call_repeats": args.call_repeats, "new_tokens": args.new_tokens,
            "calls": [], "sets": []}
  shapes = [("demo", cfg, params, 1), ("demo", cfg, params, ROWS)]
  if not args.no_mid:
    mid_cfg, mid_params = calibration.random_model(*MID_SHAPE)
    shapes.append((f"mid shape (d={MID_SHAPE[0]}, {MID_SHAPE[1]} layers, "
                   "random weights)", mid_cfg, mid_params, 1))
  for name, c, w, batch in shapes:
    rows = call_costs(c, w, batch, args.call_repeats)
    result["calls"].append({"model": name, "batch": batch, "rows": rows})
    print(f"calls {name} b{batch}: " + ", ".join(
        f"T={x['tokens']} {x['speedup']:.2f}x" for x in rows), flush=True)
  costs = blockdec.measure_call_costs(params, cfg, batch=1,
                                      sizes=hf_peers.COST_SIZES,
                                      prompt_len=PROMPT)
  result["lookup_costs"] = [list(x) for x in costs]
  methods = fused_projections.systems(draft, costs)
  if cfg.num_prediction_heads >= 8:
    methods["blockwise"] = blockdec.Blockwise(block_size=8)
  for prompt_set in sets:
    prompts = hf_peers.byte_prompts(prompt_set, ROWS, PROMPT)
    measured = fused_projections.side_by_side(
        cfg, params, prompts, methods, args.repeats, switch,
        new_tokens=args.new_tokens)
    measured += fused_projections.side_by_side(
        cfg, params, prompts, fused_projections.batch_systems(cfg),
        args.repeats, switch, new_tokens=args.new_tokens, batch=ROWS)
    result["sets"].append({"prompt_set": prompt_set, "measured": measured})
    print(f"{prompt_set}: " + ", ".join(
        f"{m['system']} b{m['batch']} {m['speedup']:.3f}x" for m in measured),
          flush=True)
  out = metrics.write_results(args.out, result, markdown,
                              script="experiments/cpu_compile_options.py",
                              argv=argv, load_before=load)
  plot(result, out.with_suffix(".png"))
  print(reading(result))
  print(f"wrote {out}.json, .md and .png")


if __name__ == "__main__":
  main()
