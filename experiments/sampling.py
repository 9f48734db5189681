r"""Speculative sampling against ancestral sampling on the `make demo` model.

For every sampling setting (temperature 0.6 and 1.0, each with top_p None and
0.95) and batch size (1 and 8), the same prompts are decoded by

  ancestral    blockdec.decode(method=Autoregressive(), sampling=...)
  speculative  blockdec.decode(method=Blockwise(block_size=8), sampling=...)
               (default acceptance Exact(): lossless speculative sampling,
               the heads' filtered distributions are the drafts' q)

in one process, with the same key, plus one greedy pair (sampling=None) per
batch size for reference. Prompts: `--num_prompts` held-out stdlib prompts
(test split, 128-192 bytes, as in blockdec/demo.py), all right-padded to one
width so every call of a setting has one shape. Batch 8 decodes them 8 at a
time (16 prompts: 2 calls one after another); batch 1 decodes the first
`--batch1_prompts` of them one at a time.

Timing: per setting and method one warm-up call (compilation; its seconds are
`warmup_s`), then `--repeats` timed passes over the prompts, the two methods
interleaved (ancestral, speculative, ancestral, ...) so load changes hit both
alike. Repeat r uses key fold_in(key(seed), r) for both methods, folded with
the prompt (batch 1) or call (batch 8) index, so every repeat draws fresh
samples. tokens_per_s = generated tokens of one pass / median pass seconds;
tokens_per_call = sum(lengths) / sum(num_calls) over all repeats; speedup =
speculative tokens/s over ancestral tokens/s of the same setting.

Quality: mean_nll is the generated tokens' negative log-likelihood per token
under the model's UNFILTERED temperature-1 head 1 (`evaluation.sample_nll`:
`blockdec.forward_logits` on prompt + sample), pooled over all repeats'
samples. Both methods should sample one distribution, so their NLLs should
agree within noise. Its standard error `nll_stderr` is stratified by prompt
(the variance of each prompt's per-sample NLLs over the repeats, divided by
the repeats, summed over prompts, over the number of prompts squared): both
methods decode the same prompts, so the spread between prompts is common to
both and not part of the comparison. `nll_stderr_iid` treats all samples as
independent draws. The check is |NLL_spec - NLL_anc| <= 3 * sqrt(se_spec^2 +
se_anc^2). Sample i of both methods shares its prompt and key, so the JSON
also gives the paired test (`nll_paired_z`: mean of the per-sample differences
over its standard error), which stays valid if shared random draws correlate
the two methods' samples (the combined-se test then errs towards "within").
Every sample has exactly `--new_tokens` tokens (no EOS), so the pooled
per-token mean is also the mean over samples. degenerate_share: the share of
samples flagged by blockdec.metrics.is_degenerate.

Launch (from the repository root; needs the finished `make demo` model in
cache/, and refuses to train it):

  python experiments/sampling.py            # -> experiments/results/sampling.{json,md,png}
  python experiments/sampling.py --quick    # CI-sized check (< 2 min): T=0.6, no top_p
  python experiments/sampling.py --smoke    # tiny random model, no cache needed

The machine is shared with other engineers' jobs; the 1-minute load average
is recorded per row and for the run. Medians and same-process ratios are
what to read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shlex
import sys
import time
import types

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import blockdec  # noqa: E402
from blockdec import metrics  # noqa: E402
from blockdec.training import data as data_lib  # noqa: E402
from blockdec.training import evaluation  # noqa: E402
from blockdec.training import pipeline  # noqa: E402
from blockdec.training.train import pad_prompts  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
CONFIG = "configs/heads_frozen.py:demo"
PROMPT_BYTES = (128, 192)  # As blockdec/demo.py.
TARGET_TOKENS_PER_CALL = 2.0  # Speculative sampling at temperature 0.6.
TARGET_TEMPERATURE = 0.6
ANCESTRAL, SPECULATIVE = "ancestral", "speculative"
GREEDY_AR, GREEDY_BW = "greedy", "greedy-blockwise"

machine_description = metrics.machine_description  # One definition.


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--num_prompts", type=int, default=16,
                 help="held-out prompts decoded at batch sizes > 1")
  p.add_argument("--batch1_prompts", type=int, default=4,
                 help="the first this many prompts, decoded one at a time, "
                 "are the batch-1 runs")
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=5,
                 help="timed passes per method (median; fresh key each)")
  p.add_argument("--block_size", type=int, default=8)
  p.add_argument("--batches", default="1,8", help="comma-separated")
  p.add_argument("--temperatures", default="0.6,1.0", help="comma-separated")
  p.add_argument("--top_ps", default="none,0.95",
                 help="comma-separated; 'none' for no nucleus filter")
  p.add_argument("--no_greedy", action="store_true",
                 help="skip the greedy reference pair")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cache_dir", default=str(ROOT / "cache"))
  p.add_argument("--out", default=None,
                 help="output prefix (default experiments/results/sampling; "
                 "with --quick ..._quick; with --smoke /tmp/sampling_smoke)")
  p.add_argument("--quick", action="store_true",
                 help="CI-sized: T=0.6 without top_p, no greedy pair; 8 "
                 "prompts, 2 at batch 1, 32 tokens, 3 repeats")
  p.add_argument("--smoke", action="store_true",
                 help="tiny random model (no cache), as --quick but 16 "
                 "tokens, 2 repeats (both override the count and setting "
                 "flags)")
  args = p.parse_args(argv)
  if args.quick or args.smoke:  # Compilation dominates: few settings.
    args.num_prompts, args.batch1_prompts = 8, 2
    args.new_tokens, args.repeats = (32, 3) if args.quick else (16, 2)
    args.temperatures, args.top_ps, args.no_greedy = "0.6", "none", True
  if args.out is None:
    args.out = ("/tmp/sampling_smoke" if args.smoke else
                str(RESULTS / ("sampling_quick" if args.quick else "sampling")))
  args.batches = [int(b) for b in args.batches.split(",")]
  args.temperatures = [float(t) for t in args.temperatures.split(",")]
  args.top_ps = [None if t.strip().lower() == "none" else float(t)
                 for t in args.top_ps.split(",")]
  for b in args.batches:
    if b > 1 and args.num_prompts % b:
      raise ValueError(f"--num_prompts={args.num_prompts} must be a multiple "
                       f"of every batch size > 1 in --batches={args.batches}.")
  if not 1 <= args.batch1_prompts <= args.num_prompts:
    raise ValueError(f"--batch1_prompts={args.batch1_prompts} must be in "
                     f"[1, --num_prompts={args.num_prompts}].")
  if args.repeats < 2:
    raise ValueError(f"--repeats={args.repeats} must be >= 2 (the NLL "
                     "standard error needs two samples per prompt).")
  return args


# ------------------------------------------------------------------ model


def load_model(args):
  """(cfg, params, tokenizer or None, description)."""
  if args.smoke:
    cfg = blockdec.ModelConfig(vocab_size=256, d_model=64, n_layers=2,
                               n_heads=4, max_seq_len=512,
                               num_prediction_heads=args.block_size)
    return (cfg, blockdec.init_params(cfg, jax.random.key(0)), None,
            "RANDOM tiny model (--smoke): 2 layers, d=64, "
            f"{args.block_size} heads")
  config = pipeline.load_config(CONFIG)
  workdir = pipeline.run_dir(config, args.cache_dir)
  if not pipeline.is_finished(workdir):
    raise FileNotFoundError(
        f"{workdir} holds no finished {CONFIG} run; run `make demo` first "
        "(this script does not train), or use --smoke.")
  run = pipeline.train_or_load(config, args.cache_dir)
  rel = (workdir.resolve().relative_to(ROOT)
         if workdir.resolve().is_relative_to(ROOT) else workdir)
  valid = run.summary.get("valid", {})
  return (run.cfg, run.params, run.tokenizer,
          f"`{rel}` ({CONFIG}: {run.cfg.n_layers} layers, "
          f"d={run.cfg.d_model}, {run.cfg.n_heads} attention heads, "
          f"{run.cfg.num_prediction_heads} proposal heads; held-out "
          f"{valid.get('nats_per_byte', float('nan')):.3f} nats/byte)")


def heldout_prompts(tokenizer, num: int):
  """(texts, prompts int32 [num, P], lengths int32 [num]): held-out stdlib
  prompts as in blockdec/demo.py, right-padded to one width P."""
  splits = data_lib.split_corpus(data_lib.load_corpus("stdlib"))
  texts = data_lib.heldout_prompts(splits["test"], num,
                                   min_bytes=PROMPT_BYTES[0],
                                   max_bytes=PROMPT_BYTES[1])
  encode = (tokenizer.encode if tokenizer is not None else
            lambda t: np.frombuffer(t.encode("utf-8"), np.uint8))
  prompts, lengths = pad_prompts([np.asarray(encode(t), np.int32)
                                  for t in texts])
  return texts, prompts, lengths


# ------------------------------------------------------------------ runs


def chunks_for(batch: int, prompts, lengths, batch1_prompts: int):
  """[(prompt index of the first row, prompts [b, P], lengths [b])]: one
  entry per decode call of a pass at this batch size."""
  if batch == 1:
    return [(i, jnp.asarray(prompts[i:i + 1]), jnp.asarray(lengths[i:i + 1]))
            for i in range(batch1_prompts)]
  return [(i, jnp.asarray(prompts[i:i + batch]),
           jnp.asarray(lengths[i:i + batch]))
          for i in range(0, len(prompts), batch)]


def decode_pass(params, cfg, chunks, n, method, sampling, key):
  """Decodes every chunk once; (seconds, [DecodeOutput as NumPy])."""
  outs = []
  t0 = time.perf_counter()
  for index, prompts, lengths in chunks:
    outs.append(jax.block_until_ready(blockdec.decode(
        params, cfg, prompts, lengths, n, method=method, sampling=sampling,
        key=jax.random.fold_in(key, index))))
  seconds = time.perf_counter() - t0
  return seconds, [jax.tree.map(np.asarray, o) for o in outs]


def sample_nll(params, cfg, prompts, prompt_lengths, tokens, lengths):
  """Per-sample (NLL sum, token count) of generated `tokens` [S, N] (`lengths`
  [S] of them) under the unfiltered temperature-1 head 1, given their
  prompts [S, P]: `evaluation.sample_nll` (one forward call), split by row.
  """
  out = types.SimpleNamespace(tokens=tokens, lengths=lengths)
  per_token = evaluation.sample_nll(params, cfg, prompts, prompt_lengths, out)
  rows = np.split(per_token, np.cumsum(lengths)[:-1])
  return (np.array([r.sum() for r in rows], np.float64),
          np.asarray(lengths, np.int64))


def nll_stats(nll, count, prompt_ids):
  """(pooled NLL per token, stratified stderr, iid stderr) of samples."""
  per_sample = nll / np.maximum(count, 1)
  mean = float(nll.sum() / count.sum())
  iid = float(per_sample.std(ddof=1) / math.sqrt(len(per_sample)))
  groups = [per_sample[prompt_ids == p] for p in np.unique(prompt_ids)]
  var = sum(g.var(ddof=1) / len(g) for g in groups if len(g) > 1)
  return mean, float(math.sqrt(var) / len(groups)), iid


def degenerate(tokens, lengths, tokenizer, byte_level) -> np.ndarray:
  rows = [tokens[r, :lengths[r]] for r in range(len(tokens))]
  if byte_level:
    return np.array([metrics.is_degenerate(row) for row in rows])
  return np.array([metrics.is_degenerate(tokenizer.decode(row))
                   for row in rows])


def run_setting(params, cfg, tokenizer, prompts, prompt_lengths, chunks, args,
                sampling, batch):
  """Rows of both methods of one (sampling, batch) setting.

  `prompts` [num_prompts, P] and `prompt_lengths` [num_prompts] are all the
  prompts (NumPy); `chunks` (from `chunks_for`) the calls of one pass.
  """
  n = args.new_tokens
  names = ((ANCESTRAL, SPECULATIVE) if sampling is not None
           else (GREEDY_AR, GREEDY_BW))
  methods = {names[0]: blockdec.Autoregressive(),
             names[1]: blockdec.Blockwise(block_size=args.block_size)}
  base = jax.random.key(args.seed)
  load0 = os.getloadavg()[0]
  warmup = {}
  for name, method in methods.items():  # Compile (first chunk's shape = all).
    t0 = time.perf_counter()
    jax.block_until_ready(blockdec.decode(
        params, cfg, chunks[0][1], chunks[0][2], n, method=method,
        sampling=sampling, key=jax.random.fold_in(base, 10 ** 6)))
    warmup[name] = time.perf_counter() - t0
  times = {name: [] for name in methods}
  outs = {name: [] for name in methods}
  for r in range(args.repeats):
    key = jax.random.fold_in(base, r)
    for name, method in methods.items():
      seconds, out = decode_pass(params, cfg, chunks, n, method, sampling, key)
      times[name].append(seconds)
      outs[name].append(out)
  rows, per_sample = [], []
  for name in methods:
    # Samples in (repeat, call, row) order; for greedy only one repeat (the
    # repeats are the same tokens).
    passes = outs[name] if sampling is not None else outs[name][:1]
    flat = [o for p in passes for o in p]
    tokens = np.concatenate([o.tokens for o in flat])
    lengths = np.concatenate([o.lengths for o in flat])
    prompt_ids = np.concatenate([
        np.arange(index, index + len(o.lengths))
        for p in passes for (index, _, _), o in zip(chunks, p)])
    nll, count = sample_nll(params, cfg, prompts[prompt_ids],
                            prompt_lengths[prompt_ids], tokens, lengths)
    if sampling is not None:
      mean, se, se_iid = nll_stats(nll, count, prompt_ids)
    else:  # One sample per prompt: only the spread over prompts.
      mean = float(nll.sum() / count.sum())
      se = se_iid = (float((nll / count).std(ddof=1) / math.sqrt(len(nll)))
                     if len(nll) > 1 else float("nan"))
    per_sample.append(nll / np.maximum(count, 1))
    median = float(np.median(times[name]))
    per_pass = int(np.sum([o.lengths.sum() for o in outs[name][0]]))
    all_calls = np.concatenate([o.num_calls for p in outs[name] for o in p])
    all_lengths = np.concatenate([o.lengths for p in outs[name] for o in p])
    steps = float(np.mean([sum(int(o.num_calls.max()) for o in p)
                           for p in outs[name]]))
    hist = np.sum([o.accepted_hist.sum(0) for p in outs[name] for o in p],
                  axis=0)
    rows.append(dict(
        method=name,
        temperature=None if sampling is None else sampling.temperature,
        top_p=None if sampling is None else sampling.top_p,
        batch=batch,
        tokens_per_call=metrics.block_efficiency(all_lengths, all_calls),
        tokens_per_s=per_pass / median,
        speedup=None,
        mean_nll=mean, nll_stderr=se, nll_stderr_iid=se_iid,
        degenerate_share=float(degenerate(tokens, lengths, tokenizer,
                                          cfg.vocab_size == 256).mean()),
        num_samples=int(len(tokens)),
        num_prompts=len(np.unique(prompt_ids)),
        calls_per_pass=len(chunks), tokens_per_pass=per_pass,
        median_s=median, times_s=times[name], warmup_s=warmup[name],
        # Pass seconds per decode-loop step (one model call for the whole
        # batch; a call runs until its slowest row is done; prefill spread
        # over the steps).
        steps_per_pass=steps, ms_per_step=1e3 * median / steps,
        accepted_hist=hist.tolist(),
        block_size=1 if name in (ANCESTRAL, GREEDY_AR) else args.block_size,
        load_1min=[load0, os.getloadavg()[0]]))
  anc, spec = rows
  anc["speedup"] = 1.0
  spec["speedup"] = spec["tokens_per_s"] / anc["tokens_per_s"]
  if sampling is not None:
    diff = spec["mean_nll"] - anc["mean_nll"]
    se = math.hypot(spec["nll_stderr"], anc["nll_stderr"])
    se_iid = math.hypot(spec["nll_stderr_iid"], anc["nll_stderr_iid"])
    # Sample i of both methods shares its prompt and key: the paired
    # difference removes what they share (the prompt; the key's draws where
    # both methods use them alike).
    d = per_sample[1] - per_sample[0]
    paired_se = float(d.std(ddof=1) / math.sqrt(len(d)))
    spec.update(nll_diff=diff, nll_diff_se=se, nll_z=diff / se,
                nll_within_3se=bool(abs(diff) <= 3 * se),
                nll_within_3se_iid=bool(abs(diff) <= 3 * se_iid),
                nll_paired_diff=float(d.mean()), nll_paired_se=paired_se,
                nll_paired_z=float(d.mean() / paired_se))
  else:
    same = all(np.array_equal(a.tokens, b.tokens)
               for a, b in zip(outs[names[0]][0], outs[names[1]][0]))
    spec["identical_to_greedy"] = bool(same)
  return rows


# ------------------------------------------------------------------ report


def setting_label(r, newline=" ") -> str:
  if r["temperature"] is None:
    return f"greedy{newline}b={r['batch']}"
  return (f"T={r['temperature']:g}{newline}top_p={r['top_p'] or 'none'}"
          f"{newline}b={r['batch']}")


def pairs(rows):
  """[(ancestral-side row, speculative-side row)] in run order."""
  return [(rows[i], rows[i + 1]) for i in range(0, len(rows), 2)]


def target_lines(result):
  lines = []
  for anc, spec in pairs(result["rows"]):
    if spec["temperature"] == TARGET_TEMPERATURE:
      got = spec["tokens_per_call"]
      lines.append(
          f"- T={spec['temperature']:g}, top_p={spec['top_p'] or 'none'}, "
          f"batch {spec['batch']}: {got:.2f} tokens/call (target >= "
          f"{TARGET_TOKENS_PER_CALL:.1f}): "
          f"{'met' if got >= TARGET_TOKENS_PER_CALL else 'NOT met'}")
  return lines


def span(xs, fmt="{:.2f}") -> str:
  """"lo-hi" of numbers, or one number when they agree at `fmt`."""
  lo, hi = fmt.format(min(xs)), fmt.format(max(xs))
  return lo if lo == hi else f"{lo}-{hi}"


def what_this_shows(result) -> str:
  ps = pairs(result["rows"])
  sampled = [(a, s) for a, s in ps if s["temperature"] is not None]
  greedy = [(a, s) for a, s in ps if s["temperature"] is None]
  parts = []
  if sampled:
    ok = sum(s["nll_within_3se"] for _, s in sampled)
    parts.append(
        f"Distribution: in {ok} of {len(sampled)} settings the speculative "
        "samples' NLL under the unfiltered model is within 3 combined "
        "standard errors of the ancestral samples' (largest |z| = "
        f"{max(abs(s['nll_z']) for _, s in sampled):.2f}), as lossless "
        "speculative sampling requires"
        + ("." if ok == len(sampled) else
           "; the other settings need a look (a z beyond 3 by chance has "
           "probability ~0.3% per setting)."))
    for t in sorted({s["temperature"] for _, s in sampled}):
      sel = [s for _, s in sampled if s["temperature"] == t]
      tpc = [s["tokens_per_call"] for s in sel]
      sp = [s["speedup"] for s in sel]
      parts.append(
          f"At temperature {t:g} speculative sampling commits {span(tpc)} "
          f"tokens per call and runs {span(sp)}x the ancestral tokens/s.")
  if greedy:
    tpc = ", ".join(f"{s['tokens_per_call']:.2f} (batch {s['batch']}, "
                    f"{s['speedup']:.2f}x)" for _, s in greedy)
    parts.append(f"Greedy blockwise, for reference: {tpc} tokens per call "
                 "and speedup over greedy.")
    for _, g in greedy:
      sel = [s for _, s in sampled if s["batch"] == g["batch"]]
      if sel:
        below = sum(s["tokens_per_call"] < g["tokens_per_call"] for s in sel)
        parts.append(
            f"At batch {g['batch']}, {below} of {len(sel)} sampled settings "
            "commit fewer tokens per call than greedy blockwise"
            + (" (a sampled draft survives with probability min(1, p/q), a "
               "greedy one whenever it is the argmax)." if below else "."))
  if sampled:
    gap = [s for _, s in sampled if s["speedup"] < s["tokens_per_call"]]
    if gap:
      parts.append(
          f"In {len(gap)} of {len(sampled)} sampled settings the speedup is "
          "below tokens per call: a speculative call verifies block_size "
          "positions and filters and samples k heads' distributions, so it "
          "costs more than an ancestral call.")
    for b in sorted({s["batch"] for _, s in ps}):
      cost = [s["ms_per_step"] / a["ms_per_step"] for a, s in sampled
              if s["batch"] == b]
      g = [s["ms_per_step"] / a["ms_per_step"] for a, s in greedy
           if s["batch"] == b]
      if cost:
        parts.append(
            f"At batch {b} a speculative step (one call for the batch) "
            f"takes {span(cost)}x the time of an ancestral step"
            + (f" (a greedy blockwise step {g[0]:.1f}x a greedy one)."
               if g else "."))
  return " ".join(parts)


def fmt_t(t) -> str:
  return "" if t is None else f"{t:g}"


def markdown(result) -> str:
  s = result["settings"]
  lines = [
      "# Speculative vs ancestral sampling (demo model)", "",
      f"Machine: {result['machine']}. Load (1-min average): "
      f"{result['load']['start']:.2f} at start, {result['load']['end']:.2f} "
      f"at end, rows' range {result['load']['min']:.2f}-"
      f"{result['load']['max']:.2f} (shared machine; "
      f"{result['load']['cores']} cores).", "",
      f"Command: `{result['command']}` ({result['run_seconds']:.0f} s).", "",
      f"Model: {result['model']}.", "",
      f"Prompts: {s['num_prompts']} held-out stdlib prompts (test split, "
      f"{PROMPT_BYTES[0]}-{PROMPT_BYTES[1]} bytes), {s['new_tokens']} new "
      f"tokens each, right-padded to one width. Batch 8: all "
      f"{s['num_prompts']} prompts, 8 per call, calls one after another. "
      f"Batch 1: the first {s['batch1_prompts']} prompt(s), one at a time. "
      f"Speculative = `Blockwise(block_size={s['block_size']})` with "
      "`Exact()` (lossless speculative sampling); ancestral = "
      "`Autoregressive()`; same prompts and keys. tokens/s: median of "
      f"{s['repeats']} timed passes after a warm-up (compile) call, the two "
      "methods interleaved; each repeat a fresh key. NLL: nats per generated "
      "token under the unfiltered temperature-1 model, pooled over all "
      "repeats' samples, +- its standard error stratified by prompt "
      "(`nll_stderr_iid` in the JSON treats samples as iid). Greedy rows: "
      "one sample per prompt (the repeats give the same tokens). ms/step: "
      "median pass seconds over the pass's decode-loop steps (one model "
      "call for the batch; a batch runs until its slowest row is done).", "",
      "| method | T | top_p | batch | tokens/call | tokens/s | speedup | "
      "ms/step | NLL +- se | degenerate | samples |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(
        f"| {r['method']} | {fmt_t(r['temperature'])} | "
        f"{'' if r['temperature'] is None else (r['top_p'] or 'none')} | "
        f"{r['batch']} | {r['tokens_per_call']:.2f} | "
        f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
        f"{r['ms_per_step']:.2f} | "
        f"{r['mean_nll']:.3f} +- {r['nll_stderr']:.3f} | "
        f"{r['degenerate_share']:.0%} | {r['num_samples']} |")
  lines += ["", "## Same distribution? (|NLL_spec - NLL_anc| <= 3 combined "
            "standard errors)", ""]
  for anc, spec in pairs(result["rows"]):
    if spec["temperature"] is None:
      lines.append(f"- {setting_label(spec)}: greedy blockwise tokens "
                   f"identical to greedy: {spec['identical_to_greedy']}")
      continue
    lines.append(
        f"- {setting_label(spec)}: {spec['mean_nll']:.3f} - "
        f"{anc['mean_nll']:.3f} = {spec['nll_diff']:+.3f}, combined se "
        f"{spec['nll_diff_se']:.3f}, z = {spec['nll_z']:+.2f}: "
        + ("within 3 se" if spec["nll_within_3se"] else "NOT within 3 se")
        + (" (also with iid se)" if spec["nll_within_3se_iid"] else
           " (iid se: not within)")
        + f"; paired by (prompt, key): z = {spec['nll_paired_z']:+.2f}")
  lines += ["", f"## Target: speculative sampling at temperature "
            f"{TARGET_TEMPERATURE:g} >= {TARGET_TOKENS_PER_CALL:.1f} tokens "
            "per call", ""] + target_lines(result)
  lines += ["", "## What this shows", "", what_this_shows(result), "",
            "Plot: `" + result["plot"] + "`.", ""]
  return "\n".join(lines)


def plot(result, path):
  ps = pairs(result["rows"])
  labels = [setting_label(s, "\n") for _, s in ps]
  x = np.arange(len(ps))
  fig, axes = plt.subplots(2, 1, figsize=(max(7, 1.1 * len(ps)), 7),
                           sharex=True)
  w = 0.38
  for i, side in enumerate(("ancestral / greedy", "speculative / blockwise")):
    axes[0].bar(x + (i - 0.5) * w, [p[i]["tokens_per_call"] for p in ps], w,
                label=side)
    axes[1].bar(x + (i - 0.5) * w, [p[i]["speedup"] for p in ps], w,
                label=side)
  axes[0].axhline(TARGET_TOKENS_PER_CALL, color="gray", ls="--", lw=1,
                  label=f"target (T={TARGET_TEMPERATURE:g})")
  axes[1].axhline(1.0, color="gray", lw=1)
  axes[0].set_ylabel("tokens per call")
  axes[1].set_ylabel("speedup (tokens/s over the\none-token-per-call side)")
  axes[1].set_xticks(x)
  axes[1].set_xticklabels(labels, fontsize=8)
  axes[0].legend(fontsize=8)
  for ax in axes:
    ax.grid(axis="y", alpha=0.3)
  fig.suptitle("Speculative vs ancestral sampling: " + result["machine"],
               fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  t_start = time.perf_counter()
  args = parse_args(argv)
  machine = machine_description()
  print(machine, flush=True)
  load_start = os.getloadavg()[0]
  cfg, params, tokenizer, model_note = load_model(args)
  if args.block_size > cfg.num_prediction_heads:
    raise ValueError(f"--block_size={args.block_size} exceeds the model's "
                     f"{cfg.num_prediction_heads} heads.")
  print(f"model: {model_note}", flush=True)
  texts, prompts, lengths = heldout_prompts(tokenizer, args.num_prompts)
  samplings = [blockdec.Sampling(temperature=t, top_p=p)
               for t in args.temperatures for p in args.top_ps]
  if not args.no_greedy:
    samplings.append(None)
  rows = []
  for batch in args.batches:
    chunks = chunks_for(batch, prompts, lengths, args.batch1_prompts)
    for sampling in samplings:
      t0 = time.perf_counter()
      new = run_setting(params, cfg, tokenizer, prompts, lengths, chunks, args,
                        sampling, batch)
      rows += new
      a, s = new
      print(f"{setting_label(s):<28} tok/call {a['tokens_per_call']:.2f} -> "
            f"{s['tokens_per_call']:.2f}  tok/s {a['tokens_per_s']:7.1f} -> "
            f"{s['tokens_per_s']:7.1f} ({s['speedup']:.2f}x)  NLL "
            f"{a['mean_nll']:.3f} / {s['mean_nll']:.3f}"
            f"{'' if sampling is None else ' z=%+.2f' % s['nll_z']}  "
            f"[{time.perf_counter() - t0:.0f} s, load "
            f"{os.getloadavg()[0]:.2f}]", flush=True)
      jax.clear_caches()  # Each setting compiles its own loops; drop them.
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  loads = [x for r in rows for x in r["load_1min"]]
  command = "python " + " ".join(
      shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)]
      + (sys.argv[1:] if argv is None else list(argv)))
  result = dict(
      machine=machine, command=command,
      load=dict(start=load_start, end=os.getloadavg()[0], min=min(loads),
                max=max(loads), cores=os.cpu_count(),
                note="1-minute load averages (os.getloadavg); per row: "
                "[before, after] its setting"),
      model=model_note, model_config=cfg.to_dict(),
      settings=dict(num_prompts=args.num_prompts,
                    batch1_prompts=args.batch1_prompts,
                    new_tokens=args.new_tokens, repeats=args.repeats,
                    block_size=args.block_size, batches=args.batches,
                    temperatures=args.temperatures, top_ps=args.top_ps,
                    seed=args.seed, prompt_bytes=list(PROMPT_BYTES),
                    prompt_lengths=lengths.tolist(),
                    prompt_degenerate_share=float(np.mean(
                        [metrics.is_degenerate(t) for t in texts]))),
      target=dict(temperature=TARGET_TEMPERATURE,
                  tokens_per_call=TARGET_TOKENS_PER_CALL,
                  lines=None),
      plot=out.with_suffix(".png").name,
      rows=rows)
  result["target"]["lines"] = target_lines(result)
  result["run_seconds"] = time.perf_counter() - t_start
  out.with_suffix(".json").write_text(json.dumps(result, indent=1))
  out.with_suffix(".md").write_text(markdown(result))
  plot(result, out.with_suffix(".png"))
  print(f"wrote {out}.{{json,md,png}} in {result['run_seconds']:.0f} s")


if __name__ == "__main__":
  main()
