r"""How a draft model's drafts are best verified: block, early exit, rule.

`blockdec.DraftModel` drafts k - 1 tokens with a small model, then one call
of the target verifies them. On a CPU a k-token call costs several one-token
calls (`experiments/step_costs.py`), and the draft model's own steps cost
time too, so how many tokens to draft and verify per call decides the
speed. This measures, on the `make demo` base with its distilled 1-layer
draft (configs/draft_model.py:demo), at batch 1, greedy (every variant
decodes the base's own greedy text, checked token for token):

  greedy          the base's one-token loop (the reference)
  k=8, k=16       a fixed block: the decided token + k - 1 drafts (the
                  first k drafted from the prompts and verified by the
                  target's prefill: `DraftModel(speculative_prefill=True)`)
  k=16 plain prefill  k=16 with speculative_prefill=False: the first drafts
                  follow the token the prefill decides, and a call of
                  their own verifies them
  k=16 stop       DraftModel(stop_below=0.4): each row's draft ends at its
                  first token the draft gives less than 0.4 (transformers'
                  default assistant_confidence_threshold); fewer draft steps
  k=16 conf       AdaptiveBlockSize(estimate="confidence") with the call
                  costs measured here: each call verifies as many of the
                  drafts as their probabilities say will pay
  k=16 stop+conf  both

With `--temperature` > 0 the rows sample instead (the drafts verified by
lossless speculative sampling, so every variant draws from the base's own
distribution) and the reference is the base's one-token sampling loop:

  sampling        `Autoregressive()` with the same `Sampling`
  k=2 .. k=8      a fixed block
  k=4 plain prefill  k=4 without the speculative prefill
  k=8 conf        the confidence rule over k = 8 (the draft's probability
                  of each drafted token as its survival estimate)

on the 128-byte prompts of `experiments/hf_peers.py` (held-out stdlib files
and third-party packages, where the draft is less sure), 8 prompts one after
another per pass, passes of all variants interleaved, medians of
`--repeats`, for 64 and 128 new tokens. It also reports how many tokens the
k = 16 calls committed: the calls that keep 1 token of 16 are where an
early exit or the rule can save.

Launch (from the repository root; trains the demo base and draft first when
the cache lacks them, as `make demo` and configs/draft_model.py:demo do):

  python experiments/draft_policy.py   # -> experiments/results/draft_policy.{json,md,png}
  python experiments/draft_policy.py --temperature=0.6 --new_tokens=64 \
      --out=experiments/results/draft_policy_t06
  python experiments/draft_policy.py --temperature=0.6 --new_tokens=64 \
      --draft_temperature=0.6 --out=experiments/results/draft_policy_t06_sampled_draft

`--draft_temperature` picks the draft distilled on the base's samples at that
temperature instead of its greedy text (configs/draft_model.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import blockdec
from blockdec import metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
sys.path.insert(0, str(ROOT / "experiments"))
import hf_peers  # pylint: disable=g-import-not-at-top,wrong-import-position

PROMPT, NUM_PROMPTS = 128, 8
STOP_BELOW = 0.4
COST_SIZES = (1, 2, 4, 8, 16)
SAMPLED_BLOCKS = (2, 3, 4, 6, 8)


def variants(draft: blockdec.DraftModel, costs, sampled: bool = False) -> dict:
  """name -> method (None: the one-token loop) of the measured policies;
  `sampled`: the block sizes and rule compared when sampling."""
  rule = blockdec.AdaptiveBlockSize(call_costs=costs, estimate="confidence")
  if sampled:
    out = {"sampling": None}
    out.update({f"k={k}": dataclasses.replace(draft, block_size=k)
                for k in SAMPLED_BLOCKS})
    out["k=4 plain prefill"] = dataclasses.replace(
        draft, block_size=4, speculative_prefill=False)
    out["k=8 conf"] = dataclasses.replace(draft, block_size=8, adaptive=rule)
    return out
  k16 = dataclasses.replace(draft, block_size=16)
  return {
      "greedy": None,
      "k=8": dataclasses.replace(draft, block_size=8),
      "k=16": k16,
      "k=16 plain prefill": dataclasses.replace(k16,
                                                speculative_prefill=False),
      "k=16 stop": dataclasses.replace(k16, stop_below=STOP_BELOW),
      "k=16 conf": dataclasses.replace(k16, adaptive=rule),
      "k=16 stop+conf": dataclasses.replace(k16, stop_below=STOP_BELOW,
                                            adaptive=rule),
  }


def measure(cfg, params, methods: dict, prompts: np.ndarray, new_tokens: int,
            repeats: int, temperature: float = 0.0) -> list[dict]:
  """`methods` (name -> DraftModel or None for the one-token loop) on
  `prompts` [R, P], one row at a time, passes interleaved: tokens/s
  medians, the ratio to the first (reference) method (`x_greedy`, over
  the one-token sampling loop when sampling), tokens per call, and the
  committed-tokens histogram of the calls. `temperature` > 0 samples (key
  0 for every method); greedy tokens are then not comparable, and
  `same_tokens_as_greedy` is None."""
  lengths = jnp.full((1,), prompts.shape[1], jnp.int32)
  sampling = (blockdec.Sampling(temperature=temperature) if temperature
              else None)
  key = jax.random.key(0) if temperature else None

  def run(method):
    if method is None and sampling is None:
      decode = lambda row: blockdec.greedy_decode(
          params, cfg, jnp.asarray(row), lengths, max_new_tokens=new_tokens)
    else:
      decode = lambda row: blockdec.decode(
          params, cfg, jnp.asarray(row), lengths, new_tokens,
          method=method or blockdec.Autoregressive(), sampling=sampling,
          key=key)
    return lambda: hf_peers.one_by_one(decode, prompts)

  timings = hf_peers.interleaved(
      {name: run(method) for name, method in methods.items()}, repeats)
  reference = next(iter(timings.values()))[3]
  rows, base = [], None
  for name, (_, median, times, out) in timings.items():
    tokens = int(np.asarray(out.lengths).sum())
    tps = tokens / median
    base = tps if base is None else base
    rows.append({
        "variant": name, "new_tokens": new_tokens, "tokens_per_s": tps,
        "x_greedy": tps / base, "times_s": times,
        "tokens_per_call": tokens / int(np.asarray(out.num_calls).sum()),
        "committed_per_call": np.asarray(out.accepted_hist).sum(0).tolist(),
        "same_tokens_as_greedy": None if temperature else bool(
            np.array_equal(out.tokens, reference.tokens))})
  return rows


def _reference(r: dict) -> str:
  """The reference row's name: the one-token loop the variants are read
  against."""
  return "sampling" if r.get("temperature") else "greedy"


def _draft_data(r: dict) -> str:
  """What the draft was distilled on."""
  t = r.get("draft_temperature")
  return (f"distilled on the base's samples at temperature {t}" if t
          else "distilled on the base's greedy text")


def markdown(r: dict) -> str:
  ref = _reference(r)
  mode = (f"sampling at temperature {r['temperature']} (drafts verified by "
          "lossless speculative sampling, key 0 for every variant)"
          if r.get("temperature") else "greedy")
  lines = ["# Draft model: how many drafts to verify", "",
           f"Machine: {r['machine']}.", "", f"Command: `{r['command']}`.", "",
           f"The `make demo` base ({r['model']}) and its distilled draft "
           f"({r['draft']}; {_draft_data(r)}), batch 1, {mode}, "
           f"{PROMPT}-byte prompts, "
           f"{NUM_PROMPTS} prompts one after another per pass, median of "
           f"{r['repeats']} passes interleaved across the variants. Call "
           "costs measured here, in one-token calls: "
           + ", ".join(f"T={t}: {c:.2f}" for t, c in r["call_costs"]) + ".",
           ""]
  for s in r["sets"]:
    lines += [f"## {s['prompt_set']}, {s['new_tokens']} new tokens", "",
              f"| variant | tokens/s | x {ref} | tokens/call | same tokens "
              "as greedy |", "|---|---|---|---|---|"]
    same = lambda m: ("n/a" if m["same_tokens_as_greedy"] is None
                      else m["same_tokens_as_greedy"])
    lines += [f"| {m['variant']} | {m['tokens_per_s']:.0f} | "
              f"{m['x_greedy']:.2f} | {m['tokens_per_call']:.2f} | "
              f"{same(m)} |" for m in s["rows"]]
    widest = max((m for m in s["rows"] if m["variant"] != ref),
                 key=lambda m: len(m["committed_per_call"]))
    hist = widest["committed_per_call"]
    lines += ["", f"{widest['variant']} calls by tokens committed "
              f"(1..{len(hist)}): {hist}; {hist[0]} of {sum(hist)} calls "
              "kept 1 token.", ""]
  lines += ["## Reading", "", r["reading"], ""]
  return "\n".join(lines)


def reading(r: dict) -> str:
  """The fastest variant per set and length; greedy: the early exit's and
  the rule's effect against the fixed k = 16; sampling: whether any block
  beats the one-token loop."""
  out = []
  for s in r["sets"]:
    rows = {m["variant"]: m for m in s["rows"]}
    best = max(s["rows"][1:], key=lambda m: m["tokens_per_s"])
    head = (f"- {s['prompt_set']}, {s['new_tokens']} tokens: fastest "
            f"{best['variant']} ({best['x_greedy']:.2f}x {_reference(r)})")
    if r.get("temperature"):
      verdict = ("beats" if best["x_greedy"] > 1 else "does not beat")
      out.append(f"{head}, {best['tokens_per_call']:.2f} tokens per call: "
                 f"the best block {verdict} the one-token sampling loop.")
      continue
    fixed = rows["k=16"]["tokens_per_s"]
    effects = ", ".join(f"{name} {rows[name]['tokens_per_s'] / fixed:.2f}x"
                        for name in ("k=16 plain prefill", "k=16 stop",
                                     "k=16 conf", "k=16 stop+conf"))
    out.append(f"{head}; against k=16: {effects}.")
  return "\n".join(out)


def plot(r: dict, path) -> None:
  """Each variant's speed over greedy, one bar group per set and length."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(10, 4))
  names = [m["variant"] for m in r["sets"][0]["rows"]]
  width = 0.8 / len(r["sets"])
  for i, s in enumerate(r["sets"]):
    ax.bar(np.arange(len(names)) + i * width,
           [m["x_greedy"] for m in s["rows"]], width,
           label=f"{s['prompt_set']}, {s['new_tokens']} tokens")
  ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
  ax.axhline(1.0, color="grey", lw=0.8)
  ref = _reference(r)
  ax.set_ylabel(f"tokens/s over {ref}")
  mode = (f"sampling, T = {r['temperature']}" if r.get("temperature")
          else "greedy")
  ax.set_title(f"Draft model policies, batch 1, {mode} (demo base)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def demo_models(cache_dir: str, draft_temperature: float = 0.0):
  """(cfg, params, base workdir, draft cfg, draft params, draft workdir);
  `draft_temperature` > 0: the draft distilled on the base's samples at
  that temperature (configs/draft_model.py's distill.temperature)."""
  from blockdec.training import pipeline
  base = pipeline.train_or_load(pipeline.load_config(
      ROOT / "configs" / "base_lm.py", "demo"), cache_dir)
  draft_config = pipeline.load_config(ROOT / "configs" / "draft_model.py",
                                      "demo")
  draft_config.distill.temperature = draft_temperature
  draft = pipeline.train_or_load(draft_config, cache_dir)
  return (base.cfg, base.params, str(base.workdir), draft.cfg, draft.params,
          str(draft.workdir))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=7, help="timed passes")
  p.add_argument("--new_tokens", default="64,128",
                 help="comma-separated new-token counts")
  p.add_argument("--cache_dir", default=str(ROOT / "cache"))
  p.add_argument("--out", default=str(RESULTS / "draft_policy"))
  p.add_argument("--temperature", type=float, default=0.0,
                 help="0: greedy variants; > 0: sampled blocks "
                      f"{', '.join(map(str, SAMPLED_BLOCKS))} against the "
                      "one-token sampling loop")
  p.add_argument("--draft_temperature", type=float, default=0.0,
                 help="0: the draft distilled on the base's greedy text "
                      "(configs/draft_model.py:demo); > 0: the one distilled "
                      "on its samples at this temperature (trained first "
                      "when the cache lacks it)")
  args = p.parse_args(argv)
  if args.repeats < 1:
    p.error(f"--repeats={args.repeats}; allowed: >= 1.")
  if not args.temperature >= 0:
    p.error(f"--temperature={args.temperature}; allowed: >= 0.")
  if not args.draft_temperature >= 0:
    p.error(f"--draft_temperature={args.draft_temperature}; allowed: >= 0.")
  try:
    counts = [int(n) for n in args.new_tokens.split(",")]
  except ValueError:
    p.error(f"--new_tokens={args.new_tokens!r}; allowed: comma-separated "
            "positive ints.")
  if not counts or min(counts) < 1 or PROMPT + max(counts) > 512:
    p.error(f"--new_tokens={args.new_tokens!r}; allowed: 1 .. "
            f"{512 - PROMPT} each (the demo model's 512 positions).")
  load = os.getloadavg()[0]
  cfg, params, workdir, dcfg, dparams, dworkdir = demo_models(
      args.cache_dir, args.draft_temperature)
  costs = blockdec.measure_call_costs(params, cfg, batch=1, sizes=COST_SIZES,
                                      prompt_len=PROMPT)
  methods = variants(blockdec.DraftModel(dcfg, dparams), costs,
                     sampled=bool(args.temperature))
  result = {"model": os.path.relpath(workdir, ROOT),
            "draft": os.path.relpath(dworkdir, ROOT),
            "call_costs": [list(c) for c in costs], "repeats": args.repeats,
            "stop_below": STOP_BELOW, "temperature": args.temperature,
            "draft_temperature": args.draft_temperature,
            "sets": []}
  for new_tokens in counts:
    for prompt_set in hf_peers.PROMPT_SETS:
      prompts = hf_peers.byte_prompts(prompt_set, NUM_PROMPTS, PROMPT)
      rows = measure(cfg, params, methods, prompts, new_tokens, args.repeats,
                     args.temperature)
      result["sets"].append({"prompt_set": prompt_set,
                             "new_tokens": new_tokens, "rows": rows})
      print(f"{prompt_set}, {new_tokens} tokens: " + ", ".join(
          f"{m['variant']} {m['x_greedy']:.2f}x" for m in rows), flush=True)
  result["reading"] = reading(result)
  out = metrics.write_results(args.out, result, markdown,
                              script="experiments/draft_policy.py",
                              argv=argv, load_before=load)
  plot(result, out.with_suffix(".png"))
  print(f"wrote {out}.json, .md and .png")


if __name__ == "__main__":
  main()
