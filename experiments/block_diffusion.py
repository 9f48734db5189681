r"""Block diffusion against autoregressive and blockwise decoding, one model family.

The `make demo` base LM (configs/base_lm.py:demo) and its block-diffusion
adaptation (configs/block_diffusion.py:demo_distill, trained on the base's
greedy continuations; `--adapted=demo`: on the corpus) decode the same
held-out stdlib prompts (test split, 128-192 bytes, as blockdec/demo.py) at one batch size:

  ar-greedy           the base, greedy (tokens per call 1)
  ar-greedy-adapted   the adapted model in autoregressive mode, greedy
  block-diffusion     the adapted model, BlockDiffusion(b, threshold): the
                      diffusion draft is the output (lossy)
  block-diffusion-    the same with stop_token = newline: a block ends after
  adaptive            a decided newline (AdaBlock-style)
  block-diffusion-    the same with order="left_to_right": a call decides
  left-to-right       only sure positions that extend the decided prefix
  block-diffusion-    left-to-right with the sub-block cache
  sub-block           (sub_block_size=s): decided sub-blocks at the start of
                      the block attend causally and are cached, so later
                      denoising calls feed fewer positions
  self-speculative    BlockDiffusion(b, threshold, acceptance=Exact()): the
                      adapted model verifies its own draft (= its greedy)
  self-speculative-   the same with next_block_guesses=r: the verification
  fused               call also denoises the next block for every accepted
                      length and r guessed next tokens (same output)
  self-speculative-   self-speculative with the sub-block cache (same
  sub-block           output, cheaper denoising calls)
  self-speculative-   fused, verified with Medusa's typical acceptance
  typical             (blockdec.Typical(threshold, alpha), lossy): block
                      diffusion whose drafts the model checks in AR mode but
                      keeps wherever it finds them plausible
  draft-model /       the best blockwise drafters of the base on the same
  heads-frozen /      prompts (exact; configs/draft_model.py:demo,
  hydra-distill       configs/heads_frozen.py:demo and
                      configs/heads_hydra.py:demo_distill, when cached)

Rows: {method, model, block_size, threshold, guesses, sub_block, acceptance,
tokens_per_call, tokens_per_s, speedup, nll_nondegenerate, nll_all,
degenerate_share, agreement_with_ar, agreement_with_base}. acceptance: the
self-speculative rows' verifier ("exact" or "typical(threshold, alpha)").
tokens_per_call = generated tokens / model calls (denoising calls
included); tokens_per_s = generated tokens of one pass / the median of
`--repeats` timed passes after a warm-up (compilation);
speedup = tokens_per_s over ar-greedy's in the same run. nll_nondegenerate:
the output's NLL per token under the ORIGINAL base (its head 1, unfiltered),
over the rows of this output that blockdec.metrics.is_degenerate does not
flag (loops are cheap to predict, so they would flatter a method's NLL);
nondegenerate_rows says how many (each method has its own; nll_all is the
NLL over every row); degenerate_share: the flagged share.
agreement_with_ar: the share of generated tokens before the first
difference from the adapted model's own greedy output;
agreement_with_base: the same against the base's greedy output. The
held-out autoregressive loss (nats/byte) of both models is measured here on
the same held-out batches (valid split, 256-token rows, as the base trained).

Launch (from the repository root; trains nothing unless --train):

  python experiments/block_diffusion.py            # -> experiments/results/block_diffusion.{json,md,png}
  python experiments/block_diffusion.py --train    # train/reuse the demo models first
  python experiments/block_diffusion.py --quick    # b = 8, two thresholds, 8 prompts
  python experiments/block_diffusion.py --adapted=demo --out=experiments/results/block_diffusion_corpus
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import sys

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import blockdec  # noqa: E402
from blockdec import metrics  # noqa: E402
from blockdec.training import data as data_lib  # noqa: E402
from blockdec.training import evaluation, pipeline  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
BASE = "configs/base_lm.py:demo"
ADAPTED = "configs/block_diffusion.py:{}"  # --adapted: the preset.
DRAFTERS = {  # name -> (config, method factory)
    "draft-model": ("configs/draft_model.py:demo",
                    lambda run: blockdec.DraftModel(run.cfg, run.params,
                                                    block_size=8)),
    "heads-frozen": ("configs/heads_frozen.py:demo",
                     lambda run: blockdec.Blockwise(block_size=8)),
    "hydra-distill": ("configs/heads_hydra.py:demo_distill",
                      lambda run: blockdec.Blockwise(block_size=8)),
}
PROMPT_BYTES = (128, 192)
TARGETS = dict(tokens_per_call=2.5, nll_ratio=1.10, heldout_gap=0.05,
               self_speculative_tokens_per_call=2.0)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--num_prompts", type=int, default=32)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--block_sizes", default="4,8,16")
  p.add_argument("--thresholds", default="0.5,0.7,0.8,0.9,0.95")
  p.add_argument("--self_speculative_thresholds", default="0.0,0.5")
  p.add_argument("--self_speculative_block_sizes", default="4,8,16")
  p.add_argument("--self_speculative_fused",
                 default="8:0.0:2,8:0.0:0-3-2-1,8:0.0:0-6-4-2-1",
                 help="b:threshold:r settings also run fused "
                 "(next_block_guesses=r; r_0-r_1-..: r_a guesses after a "
                 "accepted drafts)")
  p.add_argument("--self_speculative_typical",
                 default="8:0.0:0-6-4-2-1:0.7:0.9,8:0.0:0-3-2-1:0.7:0.9,"
                 "8:0.0:0-6-4-2-1:0.09:0.3",
                 help="b:threshold:r:posterior_threshold:posterior_alpha "
                 "settings run fused and verified by blockdec.Typical (lossy)")
  p.add_argument("--left_to_right", default="8:0.7,8:0.8,8:0.9,16:0.8,16:0.9",
                 help="b:threshold settings also run with "
                 "order='left_to_right' (blocks fill as a prefix)")
  p.add_argument("--sub_block", default="8:0.7:2,8:0.7:4,8:0.9:2,16:0.8:4,"
                 "16:0.9:4,16:0.9:8",
                 help="b:threshold:s settings also run left to right with "
                 "the sub-block cache (sub_block_size=s)")
  p.add_argument("--self_speculative_sub_block", default="8:0.5:2,16:0.5:4",
                 help="b:threshold:s self-speculative settings also run "
                 "with the sub-block cache")
  p.add_argument("--adaptive", default="8:0.9,16:0.9",
                 help="b:threshold settings also run with stop_token=newline "
                 "(AdaBlock-style blocks that end after a line)")
  p.add_argument("--adapted", default="demo_distill",
                 help="the adaptation's configs/block_diffusion.py preset: "
                 "demo (on the corpus) or demo_distill (on the base's greedy "
                 "continuations)")
  p.add_argument("--cache_dir", default=str(ROOT / "cache"))
  p.add_argument("--train", action="store_true",
                 help="train (or reuse) the demo models first")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out", default=str(RESULTS / "block_diffusion"))
  args = p.parse_args(argv)
  if args.quick:
    args.num_prompts, args.new_tokens, args.repeats = 8, 64, 2
    args.block_sizes, args.thresholds = "8", "0.5,0.9"
    args.self_speculative_thresholds = "0.5"
    args.self_speculative_block_sizes = "8"
    args.self_speculative_fused = "8:0.5:1"
    args.self_speculative_typical = "8:0.5:1:0.7:0.9"
    args.adaptive = "8:0.5"
    args.left_to_right = "8:0.5"
    args.sub_block = "8:0.5:4"
    args.self_speculative_sub_block = "8:0.5:4"
  ints = lambda s: [int(x) for x in s.split(",") if x]
  floats = lambda s: [float(x) for x in s.split(",") if x]
  args.block_sizes = ints(args.block_sizes)
  args.thresholds = floats(args.thresholds)
  args.self_speculative_thresholds = floats(args.self_speculative_thresholds)
  args.self_speculative_block_sizes = ints(args.self_speculative_block_sizes)
  def guesses(r):
    r = tuple(int(x) for x in r.split("-"))
    return r[0] if len(r) == 1 else r
  args.self_speculative_fused = [
      (int(x.split(":")[0]), float(x.split(":")[1]), guesses(x.split(":")[2]))
      for x in args.self_speculative_fused.split(",") if x]
  args.self_speculative_typical = [
      (int(b), float(th), guesses(r), (float(pt), float(pa)))
      for b, th, r, pt, pa in (x.split(":") for x in
                               args.self_speculative_typical.split(",") if x)]
  pairs = lambda s: [(int(x.split(":")[0]), float(x.split(":")[1]))
                     for x in s.split(",") if x]
  triples = lambda s: [(int(b), float(th), int(sb)) for b, th, sb in
                       (x.split(":") for x in s.split(",") if x)]
  args.sub_block = triples(args.sub_block)
  args.self_speculative_sub_block = triples(args.self_speculative_sub_block)
  args.adaptive = pairs(args.adaptive)
  args.left_to_right = pairs(args.left_to_right)
  if args.num_prompts % args.batch:
    raise ValueError(f"--num_prompts={args.num_prompts} must be a multiple "
                     f"of --batch={args.batch}.")
  return args


def load(spec, args, *, required=True):
  return pipeline.cached_run(spec, args.cache_dir, train=args.train,
                             required=required)


def run_method(params, cfg, prompts, lengths, n, method, batch, repeats):
  """(DecodeOutput of all prompts, median pass seconds, warm-up seconds)."""
  calls = [(jnp.asarray(prompts[i:i + batch]), jnp.asarray(lengths[i:i + batch]))
           for i in range(0, len(prompts), batch)]

  def one_pass():
    outs = [blockdec.decode(params, cfg, p, l, n, method=method)
            for p, l in calls]
    return jax.tree_util.tree_map(lambda *x: jnp.concatenate(x), *outs)

  out, warmup, seconds = evaluation.timed(one_pass, repeats)
  return jax.device_get(out), seconds, warmup


def agreement(tokens, lengths, reference):
  """Share of generated tokens before each row's first difference."""
  total, agreed = 0, 0
  for row, n in enumerate(lengths):
    same = tokens[row, :n] == reference[row, :n]
    agreed += int(np.argmin(same)) if not same.all() else int(n)
    total += int(n)
  return agreed / max(total, 1)


def main(argv=None):
  args = parse_args(argv)
  base = load(BASE, args)
  adapted = load(ADAPTED.format(args.adapted), args)
  drafters = {name: (load(spec, args, required=False), make)
              for name, (spec, make) in DRAFTERS.items()}
  _, prompts, lengths = evaluation.heldout_prompts(
      base.tokenizer, args.num_prompts, *PROMPT_BYTES)
  n, batch = args.new_tokens, args.batch
  texts = lambda toks, lens: [base.tokenizer.decode(t[:k])
                              for t, k in zip(toks, lens)]
  load_before = os.getloadavg()[0]
  print(f"[block_diffusion] {len(prompts)} prompts, batch {batch}, {n} new "
        f"tokens, {args.repeats} repeats; load {load_before:.1f}")

  # (method, model, run, decoding method, b, threshold, r[, s]).
  plans = [("ar-greedy", "base", base, blockdec.Autoregressive(), None, None,
            None),
           ("ar-greedy-adapted", "adapted", adapted,
            blockdec.Autoregressive(), None, None, None)]
  for b in args.block_sizes:
    for th in args.thresholds:
      plans.append(("block-diffusion", "adapted", adapted,
                    blockdec.BlockDiffusion(b, th), b, th, None))
  newline = int(base.tokenizer.encode("\n")[0])
  for b, th in args.adaptive:
    plans.append(("block-diffusion-adaptive", "adapted", adapted,
                  blockdec.BlockDiffusion(b, th, stop_token=newline), b, th,
                  None))
  for b, th in args.left_to_right:
    plans.append(("block-diffusion-left-to-right", "adapted", adapted,
                  blockdec.BlockDiffusion(b, th, order="left_to_right"), b,
                  th, None))
  for b, th, sb in args.sub_block:
    plans.append(("block-diffusion-sub-block", "adapted", adapted,
                  blockdec.BlockDiffusion(b, th, order="left_to_right",
                                          sub_block_size=sb), b, th, None,
                  sb))
  spec = [(b, th, 0) for b in args.self_speculative_block_sizes
          for th in args.self_speculative_thresholds]
  for b, th, r in spec + args.self_speculative_fused:
    plans.append((
        "self-speculative-fused" if r else "self-speculative", "adapted",
        adapted, blockdec.BlockDiffusion(b, th, acceptance=blockdec.Exact(),
                                         next_block_guesses=r), b, th, r))
  for b, th, sb in args.self_speculative_sub_block:
    plans.append((
        "self-speculative-sub-block", "adapted", adapted,
        blockdec.BlockDiffusion(b, th, acceptance=blockdec.Exact(),
                                sub_block_size=sb), b, th, 0, sb))
  for b, th, r, (pt, pa) in args.self_speculative_typical:
    plans.append((
        "self-speculative-typical", "adapted", adapted,
        blockdec.BlockDiffusion(b, th, acceptance=blockdec.Typical(pt, pa),
                                next_block_guesses=r), b, th, r))
  for name, (run, make) in drafters.items():
    if run is not None:
      plans.append((name, "base", base if name == "draft-model" else run,
                    make(run), 8, None, None))

  outputs = {}
  for name, model, run, method, b, th, r, *sb in plans:
    sb = sb[0] if sb else None
    out, seconds, warmup = run_method(
        run.params, run.cfg, prompts, lengths, n, method, batch, args.repeats)
    # Each method compiles its own decode loops; dropping them keeps the
    # process under vm.max_map_count (65530 here: the sub-block rows pushed
    # one run past it, "LLVM compilation error: Cannot allocate memory").
    jax.clear_caches()
    tokens, lens, calls = out.tokens, out.lengths, out.num_calls
    verifier = _verifier(method)
    outputs[(name, b, th, r, sb, verifier)] = (model, out, seconds, warmup)
    print(f"  {name:22s} b={b} th={th} r={r}"
          + (f" s={sb}" if sb else "")
          + (f" {verifier}" if verifier else "") + ": "
          f"{lens.sum() / calls.sum():.2f} "
          f"tokens/call, {lens.sum() / seconds:.0f} tokens/s "
          f"(warm-up {warmup:.0f} s)")
  load_after = os.getloadavg()[0]

  _, base_out, base_seconds, _ = outputs[("ar-greedy", None, None, None, None,
                                           None)]
  base_tokens, base_lens = base_out.tokens, base_out.lengths
  ad_tokens = outputs[("ar-greedy-adapted", None, None, None, None,
                       None)][1].tokens
  base_tps = base_lens.sum() / base_seconds
  rows = []
  for (name, b, th, r, sb, verifier), (model, out, seconds,
                                       warmup) in outputs.items():
    tokens, lens, calls = out.tokens, out.lengths, out.num_calls
    degenerate = np.array([metrics.is_degenerate(t)
                           for t in texts(tokens, lens)])
    keep = ~degenerate
    nll = evaluation.sample_nll(base.params, base.cfg, prompts, lengths, out)
    per_row = np.split(nll, np.cumsum(lens)[:-1])
    kept = [x for x, k in zip(per_row, keep) if k]
    rows.append({
        "method": name, "model": model, "block_size": b, "threshold": th,
        "guesses": r, "sub_block": sb, "acceptance": verifier,
        "tokens_per_call": float(lens.sum() / calls.sum()),
        "tokens_per_s": float(lens.sum() / seconds),
        "speedup": float(lens.sum() / seconds / base_tps),
        "nll_nondegenerate": (float(np.concatenate(kept).mean()) if kept
                              else None),
        "nondegenerate_rows": int(keep.sum()),
        "nll_all": float(nll.mean()),
        "degenerate_share": float(degenerate.mean()),
        "agreement_with_ar": agreement(tokens, lens, ad_tokens),
        "agreement_with_base": agreement(tokens, lens, base_tokens),
        "median_pass_s": seconds, "warmup_s": warmup,
    })
  # Both models on the same held-out (valid split) batches, 256-token rows.
  valid = data_lib.split_corpus(data_lib.load_corpus("stdlib"))["valid"]
  heldout = {k: evaluation.heldout_loss(run.params, run.cfg, run.tokenizer,
                                        valid, seq_len=256)["nats_per_byte"]
             for k, run in (("base", base), ("adapted", adapted))}
  result = {
      "machine": metrics.machine_description(
          f"load average {load_before:.1f} before, {load_after:.1f} after"),
      "command": "python experiments/block_diffusion.py " + shlex.join(
          sys.argv[1:] if argv is None else argv),
      "prompts": int(len(prompts)), "batch": batch, "new_tokens": n,
      "repeats": args.repeats, "heldout_nats_per_byte": heldout,
      "adapted_steps": adapted.summary.get("steps"),
      "adapted_config": ADAPTED.format(args.adapted),
      "targets": TARGETS, "rows": rows,
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
  out.with_suffix(".md").write_text(markdown(result))
  plot(result, out.with_suffix(".png"))
  print(f"[block_diffusion] wrote {out}.json|md|png")
  return result


def _verifier(method):
  """A block-diffusion method's verifier as a row label, or None."""
  if not isinstance(method, blockdec.BlockDiffusion):
    return None
  acceptance = method.acceptance
  if isinstance(acceptance, blockdec.Typical):
    return (f"typical({acceptance.posterior_threshold:g}, "
            f"{acceptance.posterior_alpha:g})")
  return None if acceptance is None else "exact"


def _fmt(x, f="{:.2f}"):
  return "-" if x is None else f.format(x)


def _guesses(r):
  """next_block_guesses as a cell: r, or r_0-r_1-.. per accepted length."""
  if r is None:
    return "-"
  return "-".join(str(x) for x in r) if isinstance(r, (list, tuple)) else str(r)


def markdown(result) -> str:
  rows = result["rows"]
  ar = next(r for r in rows if r["method"] == "ar-greedy")
  h = result["heldout_nats_per_byte"]
  lines = [
      "# Block diffusion on the `make demo` model",
      "",
      f"Machine: {result['machine']}. Written by `{result['command']}`.",
      "",
      f"{result['prompts']} held-out stdlib prompts (test split), batch "
      f"{result['batch']}, {result['new_tokens']} new tokens; tokens/s are "
      f"medians of {result['repeats']} passes after a warm-up, speedups "
      "ratios to ar-greedy in the same run. Tokens per call count every "
      "model call, denoising calls included.",
      "",
      f"Held-out autoregressive loss: base {_fmt(h['base'], '{:.3f}')}, "
      f"adapted ({result.get('adapted_config', ADAPTED.format('demo'))}, "
      f"{result['adapted_steps']} steps) "
      f"{_fmt(h['adapted'], '{:.3f}')} nats/byte.",
      "",
      "Self-speculative rows: r is `next_block_guesses` (0: the draft is "
      "denoised in calls of its own; r > 0: fused, the verification call "
      "also denoises the next block for r guessed next tokens per accepted "
      "length; r_0-r_1-..: r_a guesses after a accepted drafts). Fed nodes "
      "per call: b + 1 + b * (number of guesses). s: `sub_block_size`, the "
      "sub-block cache (decided sub-blocks of s at the start of the block "
      "attend causally and are read from the cache; later denoising calls "
      "feed b - s, b - 2s, .. positions).",
      "",
      "| method | model | b | threshold | r | s | tokens/call | tokens/s | "
      "speedup | NLL under base (non-degenerate rows) | all rows | "
      "degenerate | agreement with adapted AR | with base |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lossy = r.get("acceptance") not in (None, "exact")
    lines.append(
        f"| {r['method']}{', ' + r['acceptance'] if lossy else ''} | "
        f"{r['model']} | {_fmt(r['block_size'], '{}')} | "
        f"{_fmt(r['threshold'])} | {_guesses(r.get('guesses'))} | "
        f"{_fmt(r.get('sub_block'), '{}')} | {r['tokens_per_call']:.2f} | "
        f"{r['tokens_per_s']:.0f} | {r['speedup']:.2f}x | "
        f"{_fmt(r['nll_nondegenerate'], '{:.3f}')} "
        f"({r['nondegenerate_rows']}) | {_fmt(r.get('nll_all'), '{:.3f}')} | "
        f"{r['degenerate_share']:.0%} | {r['agreement_with_ar']:.2f} | "
        f"{r['agreement_with_base']:.2f} |")
  t = result["targets"]
  ad = next(r for r in rows if r["method"] == "ar-greedy-adapted")
  diff = [r for r in rows if r["method"].startswith("block-diffusion")
          and r["nll_nondegenerate"] is not None]
  typical = [r for r in rows if r["method"] == "self-speculative-typical"
             and r["nll_nondegenerate"] is not None]

  def best_within(reference, candidates=diff):
    if reference["nll_nondegenerate"] is None:
      return None
    good = [r for r in candidates if r["nll_nondegenerate"]
            <= t["nll_ratio"] * reference["nll_nondegenerate"]]
    return max(good, key=lambda r: r["tokens_per_call"]) if good else None

  def describe(best):
    variant = ("" if best is None or best["method"] in (
        "block-diffusion", "self-speculative-typical")
               else best["method"] + ", ")
    return (f"best {best['tokens_per_call']:.2f} ({variant}"
            f"b={best['block_size']}, "
            f"threshold {best['threshold']}"
            + (f", s={best['sub_block']}" if best.get("sub_block") else "")
            + (f", r={_guesses(best['guesses'])}, {best['acceptance']}"
               if best.get("guesses") else "") + ", NLL "
            f"{best['nll_nondegenerate']:.3f})" if best else
            "no setting within the bound")
  spec = [r for r in rows
          if r["method"] in ("self-speculative", "self-speculative-fused",
                             "self-speculative-sub-block")]
  best_spec = max(spec, key=lambda r: r["tokens_per_call"]) if spec else None
  gap = (None if None in (h["base"], h["adapted"])
         else h["adapted"] - h["base"])
  lines += [
      "",
      "## Targets",
      "",
      f"- Block diffusion >= {t['tokens_per_call']} tokens per call with NLL "
      f"under the base within {t['nll_ratio'] - 1:.0%} of AR greedy "
      f"output's: of the base's greedy output "
      f"({_fmt(ar['nll_nondegenerate'], '{:.3f}')}): "
      f"{describe(best_within(ar))}; of the adapted model's own greedy "
      f"output ({_fmt(ad['nll_nondegenerate'], '{:.3f}')}): "
      f"{describe(best_within(ad))}.",
      "- The same bound for block diffusion verified by the adapted model "
      "with typical acceptance (lossy, fused): of the base's greedy output: "
      f"{describe(best_within(ar, typical))}; of the adapted model's: "
      f"{describe(best_within(ad, typical))}." if typical else "",
      f"- Held-out AR loss within {t['heldout_gap']} nats/byte of the base: "
      f"gap {_fmt(gap, '{:+.3f}')}.",
      f"- Self-speculative (exact) >= {t['self_speculative_tokens_per_call']}"
      " tokens per call: " + (
          f"best {best_spec['tokens_per_call']:.2f} (b="
          f"{best_spec['block_size']}, threshold {best_spec['threshold']}, "
          f"r={_guesses(best_spec.get('guesses'))}"
          + (f", s={best_spec['sub_block']}" if best_spec.get("sub_block")
             else "") + "; "
          f"agreement with adapted AR "
          f"{best_spec['agreement_with_ar']:.2f})" if best_spec else "-")
      + ".",
      "",
  ]
  return "\n".join(lines)


_MARKERS = {"block-diffusion": "o", "block-diffusion-adaptive": "D",
            "block-diffusion-left-to-right": ">",
            "block-diffusion-sub-block": "d",
            "self-speculative": "s", "self-speculative-fused": "X",
            "self-speculative-sub-block": "p",
            "self-speculative-typical": "h",
            "draft-model": "^", "heads-frozen": "v", "hydra-distill": "<",
            "ar-greedy": "*", "ar-greedy-adapted": "P"}


def _label(r):
  """b/threshold[/r..][/s..] of a row."""
  label = f"b{r['block_size']}" + (
      "" if r["threshold"] is None else f"/{r['threshold']:g}") + (
      f"/r{_guesses(r['guesses'])}" if r.get("guesses") else "") + (
      f"/s{r['sub_block']}" if r.get("sub_block") else "")
  if r["method"] == "self-speculative-typical":
    label += "/" + r["acceptance"].replace(" ", "")
  return label


def plot(result, path):
  """Tokens per call against output NLL: every row, and a zoom on the bound.

  Left: all rows; only the plain (confidence-order) block-diffusion rows
  above the bound are labelled, the others crowd near the AR NLL. Right: the band around the
  10% bound, with the left-to-right and sub-block rows labelled. Exact rows
  (self-speculative) all sit at the adapted model's greedy NLL.
  """
  rows = [r for r in result["rows"] if r["nll_nondegenerate"] is not None]
  ar = next(r for r in result["rows"] if r["method"] == "ar-greedy")
  ad = next(r for r in result["rows"] if r["method"] == "ar-greedy-adapted")
  ratio = result["targets"]["nll_ratio"]
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  bounds = [(x["nll_nondegenerate"], style, name) for x, style, name in (
      (ar, ":", "ar-greedy NLL + 10%"),
      (ad, "--", "ar-greedy-adapted NLL + 10%"))
            if x["nll_nondegenerate"] is not None]
  labelled = ({"block-diffusion"},
              {"block-diffusion-left-to-right", "block-diffusion-sub-block",
               "hydra-distill"})
  top = max((n for n, _, _ in bounds), default=0.0) * ratio
  # Left: labels only above the bound (the zoom on the right has the rest).
  shown = (lambda r: r["nll_nondegenerate"] > top, lambda r: True)
  for ax, names, show in zip(axes, labelled, shown):
    for method, marker in _MARKERS.items():
      rs = [r for r in rows if r["method"] == method]
      if not rs:
        continue
      ax.scatter([r["tokens_per_call"] for r in rs],
                 [r["nll_nondegenerate"] for r in rs], marker=marker, s=45,
                 label=method, alpha=0.85)
      if method not in names:
        continue
      for i, r in enumerate(rs):
        if r["block_size"] is not None and show(r):
          ax.annotate(_label(r), (r["tokens_per_call"],
                                  r["nll_nondegenerate"]),
                      fontsize=7, xytext=(4, 4 if i % 2 else -9),
                      textcoords="offset points")
    for nll, style, name in bounds:
      ax.axhline(nll * ratio, color="gray", ls=style, lw=1, label=name)
    ax.set_xlabel("tokens per model call")
    ax.set_ylabel("output NLL under the base (nats/token)")
  if bounds:  # The zoom: from the lowest NLL to a little past the bound.
    low = min(r["nll_nondegenerate"] for r in rows)
    axes[1].set_ylim(low - 0.02, top + 0.08)
  axes[0].set_title("All rows (labels: confidence-order block diffusion)")
  axes[1].set_title("Near the 10% bound (labels: left to right, sub-block)")
  axes[0].legend(fontsize=7, loc="upper left")
  fig.suptitle("Block diffusion vs AR and blockwise drafters (demo model)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
