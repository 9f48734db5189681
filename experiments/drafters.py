r"""Lossless drafters on one frozen base: tokens per call and wall-clock.

Every drafter here leaves its base (--model: the `make demo` base
configs/base_lm.py:demo by default; the memory-bound configs/base_lm.py:mid;
configs/base_lm.py:tiny for smoke runs; or the tiny GPT-2 of
configs/gpt2_tiny.py) bit-for-bit unchanged, so every row decodes the base's
own greedy text (or samples the base's own distribution, losslessly). The
drafters, each from the config of the model's preset (shown for demo):

  heads-frozen   Stern's proposal heads trained on data
                 (configs/heads_frozen.py:demo), Blockwise(k)
  heads-distill  the same heads trained on the base's greedy text
                 (configs/heads_distill.py:demo), Blockwise(k)
  draft-model    a 1-layer draft model distilled from the base
                 (configs/draft_model.py:demo), DraftModel(k)
  eagle          the EAGLE-style drafter on the trunk's features
                 (configs/eagle.py:demo), Eagle(k)
  hydra-distill  Hydra's dependent heads trained on the base's greedy text
                 (configs/heads_hydra.py:demo_distill), Blockwise(k)

each as a chain at k = --block_sizes, greedy and at temperature
--temperature, at batch 1 and --batch; EAGLE also as a token tree of
--tree_chains chains (its C likeliest first tokens, each continued
greedily; with sampling C independent draws, verified by multi-candidate
rejection). heads-distill, hydra-distill and eagle also as a static tree
of --tree_budget nodes shaped Sequoia-style (`blockdec.tree_shapes`): the
acceptance per depth and rank measured with probe trees on --tree_prompts
prompts of the corpus's *valid* split (not the test prompts timed here),
then the best tree for that matrix (its predicted tokens per call are in
the JSON beside the measured ones). heads-distill and hydra-distill also
as an EAGLE-2-style dynamic tree (blockdec.DynamicTree: --dynamic_nodes
nodes grown from the --dynamic_top_k likeliest paths per level, every
call). Drafters that are not cached are skipped unless --train. The mid base
runs every drafter by default; gpt2-tiny has heads-distill and hydra-distill,
trained on its Hugging Face export by configs/hf_heads.py
(experiments/gpt2_tiny.py), and eagle, distilled on the run itself
(configs/eagle.py:gpt2_tiny_distill).

Rows: {model, drafter, block_size, tree, temperature, batch,
tokens_per_call, tokens_per_call_nondegenerate, degenerate_share,
tokens_per_s, speedup}. tokens_per_call = generated tokens / target calls;
..._nondegenerate over the rows blockdec.metrics.is_degenerate does not
flag (looping text is easy to draft); tokens_per_s = generated tokens of one
pass over all prompts / the median of --repeats timed passes after a
warm-up (compilation); speedup = tokens_per_s over the same model's greedy
(or ancestral sampling, at the same temperature and batch), timed pass for
pass in alternation with each method: the median of the --repeats per-pair
ratios (this machine's speed drifts within a run; alternating passes keeps
the drift out of the ratio). Each batch decodes with its own longest
prompt's columns, rounded up to --prompt_bucket (a batch-1 prompt is not
padded to the longest prompt of the set).

Launch (from the repository root):

  python experiments/drafters.py            # -> experiments/results/drafters.{json,md,png}
  python experiments/drafters.py --train    # train/reuse every drafter first
  python experiments/drafters.py --quick    # k = 8, 8 prompts, 64 tokens
  python experiments/drafters.py --model=mid --train   # -> drafters_mid.*
  python experiments/drafters.py --model=gpt2-tiny     # -> drafters_gpt2_tiny.*
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import blockdec  # noqa: E402
from blockdec import metrics, tree_shapes  # noqa: E402
from blockdec.training import evaluation, pipeline  # noqa: E402

import gpt2_tiny  # noqa: E402  (experiments/gpt2_tiny.py)

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
# --model -> its base config. demo, mid and tiny are configs/base_lm.py
# presets whose drafters are the same presets of the drafter configs;
# gpt2-tiny is configs/gpt2_tiny.py with heads trained on its HF export
# (experiments/gpt2_tiny.py).
MODELS = {
    "demo": "configs/base_lm.py:demo",
    "mid": "configs/base_lm.py:mid",
    "tiny": "configs/base_lm.py:tiny",
    "gpt2-tiny": "configs/gpt2_tiny.py",
}
# name -> (config file:preset template, method factory (run, k) -> spec,
# whose params decode)
DRAFTERS = {
    "heads-frozen": ("configs/heads_frozen.py:{preset}",
                     lambda run, k: blockdec.Blockwise(block_size=k), "own"),
    "heads-distill": ("configs/heads_distill.py:{preset}",
                      lambda run, k: blockdec.Blockwise(block_size=k), "own"),
    "draft-model": ("configs/draft_model.py:{preset}",
                    lambda run, k: blockdec.DraftModel(run.cfg, run.params,
                                                       block_size=k), "base"),
    "eagle": ("configs/eagle.py:{preset}",
              lambda run, k: blockdec.Eagle(block_size=k), "own"),
    "hydra-distill": ("configs/heads_hydra.py:{preset}_distill",
                      lambda run, k: blockdec.Blockwise(block_size=k), "own"),
}
# Drafters of gpt2-tiny: name -> base run -> config. Heads are distilled on
# its HF export (by head type); EAGLE on the run itself.
GPT2_DRAFTERS = {
    "heads-distill": lambda base: gpt2_tiny.heads_config(base, "stern"),
    "hydra-distill": lambda base: gpt2_tiny.heads_config(base, "hydra"),
    "eagle": lambda base: "configs/eagle.py:gpt2_tiny_distill",
}
# The drafters run when --drafters is not given (all of DRAFTERS otherwise).
DEFAULT_DRAFTERS = {"gpt2-tiny": tuple(GPT2_DRAFTERS)}
# Drafters that take a static tree: name -> (run, tree) -> spec.
TREE_METHODS = {
    "heads-distill": lambda run, tree: blockdec.Blockwise(tree=tree),
    "hydra-distill": lambda run, tree: blockdec.Blockwise(tree=tree),
    "eagle": lambda run, tree: blockdec.Eagle(tree=tree),
}
# Drafters that grow an EAGLE-2-style tree each call (heads only: the EAGLE
# drafter's own cache has no tree attention).
DYNAMIC_TREES = ("heads-distill", "hydra-distill")
PROMPT_BYTES = (128, 192)
TARGETS = dict(greedy_nondegenerate=5.0, sampled_nondegenerate=3.0)
# Issue targets on wall clock: the best greedy batch-1 speedup.
SPEEDUP_TARGETS = {"mid": 2.5}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--num_prompts", type=int, default=16)
  p.add_argument("--batch", type=int, default=8,
                 help="the second batch size beside 1 (1: batch 1 only)")
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--prompt_bytes", default="128,192",
                 help="min,max bytes of the held-out prompts")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--prompt_bucket", type=int, default=16,
                 help="each batch's prompt columns: its longest prompt "
                 "rounded up to a multiple of this")
  p.add_argument("--block_sizes", default="4,8")
  p.add_argument("--temperature", type=float, default=1.0,
                 help="the sampled rows' temperature (0: greedy rows only)")
  p.add_argument("--tree_chains", type=int, default=4,
                 help="chains of the EAGLE token tree rows (0: none)")
  p.add_argument("--tree_budget", type=int, default=24,
                 help="nodes of the Sequoia-shaped static trees (0: none)")
  p.add_argument("--dynamic_nodes", type=int, default=24,
                 help="nodes of the EAGLE-2-style dynamic trees (0: none)")
  p.add_argument("--dynamic_top_k", type=int, default=4,
                 help="paths expanded per level of the dynamic trees")
  p.add_argument("--tree_width", type=int, default=4,
                 help="ranks per depth measured for the tree shapes")
  p.add_argument("--tree_prompts", type=int, default=8,
                 help="valid-split prompts the tree shapes are measured on")
  p.add_argument("--model", default="demo", choices=tuple(MODELS),
                 help="the frozen base: configs/base_lm.py presets demo, mid "
                 "(past the CPU cache), tiny (smoke runs), or gpt2-tiny")
  p.add_argument("--drafters", default="",
                 help="comma-separated subset of the drafters ('': the "
                 "model's default set)")
  p.add_argument("--cache_dir", default=str(ROOT / "cache"))
  p.add_argument("--train", action="store_true",
                 help="train (or reuse) every drafter first")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out", default=None,
                 help="output stem (default experiments/results/drafters, "
                 "drafters_<model> for other models)")
  args = p.parse_args(argv)
  if args.quick:
    args.num_prompts, args.new_tokens, args.repeats = 8, 64, 1
    args.block_sizes = "8"
  args.block_sizes = [int(x) for x in args.block_sizes.split(",") if x]
  args.prompt_bytes = tuple(int(x) for x in args.prompt_bytes.split(","))
  if len(args.prompt_bytes) != 2 or not 0 < args.prompt_bytes[0] <= \
      args.prompt_bytes[1]:
    raise ValueError(f"--prompt_bytes={args.prompt_bytes} must be min,max "
                     "with 0 < min <= max.")
  if args.prompt_bucket < 1:
    raise ValueError(f"--prompt_bucket={args.prompt_bucket} must be >= 1.")
  allowed = GPT2_DRAFTERS if args.model == "gpt2-tiny" else DRAFTERS
  args.drafters = ([x for x in args.drafters.split(",") if x] or
                   list(DEFAULT_DRAFTERS.get(args.model, DRAFTERS)))
  unknown = sorted(set(args.drafters) - set(allowed))
  if unknown:
    raise ValueError(f"--drafters: unknown {unknown} for --model="
                     f"{args.model}; allowed: {sorted(allowed)}.")
  if args.out is None:
    suffix = "" if args.model == "demo" else "_" + args.model.replace("-", "_")
    args.out = str(RESULTS / f"drafters{suffix}")
  if args.num_prompts % args.batch:
    raise ValueError(f"--num_prompts={args.num_prompts} must be a multiple "
                     f"of --batch={args.batch}.")
  return args


def load(spec, args, *, required=True):
  return pipeline.cached_run(spec, args.cache_dir, train=args.train,
                             required=required)


def load_models(args):
  """(base run, {drafter name: (run, method factory, whose params)}); the
  drafters not cached are skipped (trained with --train)."""
  base = (gpt2_tiny.base_run(args.cache_dir, train=args.train, required=True)
          if args.model == "gpt2-tiny" else load(MODELS[args.model], args))
  drafters = {}
  for name in args.drafters:
    _, make, params_of = DRAFTERS[name]
    if args.model == "gpt2-tiny":
      spec = GPT2_DRAFTERS[name](base)
    else:
      spec = DRAFTERS[name][0].format(preset=args.model)
    run = load(spec, args, required=False)
    if run is not None:
      drafters[name] = (run, make, params_of)
  if not drafters:
    raise FileNotFoundError(
        f"none of the drafters {args.drafters} of --model={args.model} is in "
        f"{args.cache_dir}; pass --train to train them.")
  return base, drafters


def batch_width(lengths, bucket: int, width: int) -> int:
  """The prompt columns a batch decodes with: its longest prompt rounded up
  to a multiple of `bucket` (at most `width`, the padded array's)."""
  return min(width, -(-int(np.max(lengths)) // bucket) * bucket)


def make_pass(params, cfg, prompts, lengths, n, method, batch, sampling,
              bucket=16):
  """A function decoding every prompt once with `method` (batches of
  `batch`) -> the DecodeOutput of all prompts, ready.

  Each batch is cut to `batch_width` columns: a caller with one prompt
  passes it unpadded, not padded to the longest prompt of the whole set,
  and the prefill's cost grows with the columns. Rounding to `bucket`
  bounds the number of compiled programs (one per width).
  """
  calls = []
  for i in range(0, len(prompts), batch):
    w = batch_width(lengths[i:i + batch], bucket, prompts.shape[1])
    calls.append((jnp.asarray(prompts[i:i + batch, :w]),
                  jnp.asarray(lengths[i:i + batch]), i))

  def one_pass():
    # A fixed key per call: every pass draws the same samples. Each call is
    # waited for, as an interactive caller waits for its text. Dispatched
    # ahead, a draft-model pass on the mid base at batch 1 ran 6-10% slower
    # and a greedy pass unchanged, presumably the next call's host work
    # competing with the running decode for the 2 cores.
    outs = [jax.block_until_ready(
        blockdec.decode(params, cfg, p, l, n, method=method,
                        sampling=sampling,
                        key=None if sampling is None else jax.random.key(i)))
            for p, l, i in calls]
    return jax.block_until_ready(
        jax.tree_util.tree_map(lambda *x: jnp.concatenate(x), *outs))

  return one_pass


def _seconds(fn):
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


def run_paired(ref_pass, method_pass, repeats):
  """Times `method_pass` pass for pass in alternation with the reference
  (the base's greedy or ancestral pass), after a warm-up of each.

  This machine's speed drifts within minutes, so a reference timed once
  at the start of a long run and a method timed many minutes later give a
  ratio that measures the drift as much as the method; alternating passes
  puts both under the same conditions. Returns (method's DecodeOutput,
  its median pass seconds, the reference's median pass seconds, the median
  over pairs of reference seconds / method seconds).
  """
  out = method_pass()  # Warm-up: compiles.
  ref_pass()  # The caches were cleared after the last method: recompiles.
  ref_s, method_s = [], []
  for _ in range(repeats):
    ref_s.append(_seconds(ref_pass)[1])
    out, seconds = _seconds(method_pass)
    method_s.append(seconds)
  ratio = float(np.median(np.array(ref_s) / np.array(method_s)))
  out = jax.device_get(out)
  # Every method compiles its own loops; kept, the ~60 programs of a full run
  # exhaust the process's memory mappings (vm.max_map_count) and XLA aborts.
  jax.clear_caches()
  return out, float(np.median(method_s)), float(np.median(ref_s)), ratio


def main(argv=None):
  args = parse_args(argv)
  base, drafters = load_models(args)
  _, prompts, lengths = evaluation.heldout_prompts(
      base.tokenizer, args.num_prompts, *args.prompt_bytes)
  n = args.new_tokens
  shapes = {}  # (name, k) -> (tree, acceptance matrix)
  if args.tree_budget:
    _, vprompts, vlengths = evaluation.heldout_prompts(
        base.tokenizer, args.tree_prompts, *args.prompt_bytes, split="valid")
    for name, (run, _, _) in drafters.items():
      if name not in TREE_METHODS:
        continue
      for k in args.block_sizes:
        def probe(tree, run=run, name=name):
          return blockdec.decode(run.params, run.cfg, jnp.asarray(vprompts),
                                 jnp.asarray(vlengths), n,
                                 method=TREE_METHODS[name](run, tree))
        acc = tree_shapes.measure_acceptance(probe, k - 1, args.tree_width)
        tree = tree_shapes.best_tree(acc, args.tree_budget)
        shapes[name, k] = (tree, acc)
        jax.clear_caches()
        print(f"[drafters] {name} k={k}: tree of {tree.size} nodes, depth "
              f"{tree.depth - 1}, {tree.num_drafts} leaves; predicted "
              f"{tree_shapes.expected_tokens(tree, acc):.2f} tokens/call")
  load_before = os.getloadavg()[0]
  print(f"[drafters] {len(prompts)} prompts, {n} new tokens, batches 1 and "
        f"{args.batch}, {args.repeats} repeats; load {load_before:.1f}")
  rows = []
  for temperature in sorted({0.0, args.temperature}):
    sampling = (None if temperature == 0 else
                blockdec.Sampling(temperature=temperature))
    for batch in sorted({1, args.batch}):
      ref_pass = make_pass(base.params, base.cfg, prompts, lengths, n,
                           blockdec.Autoregressive(), batch, sampling,
                           args.prompt_bucket)
      ref, _, ref_s = evaluation.timed(ref_pass, args.repeats)
      ref = jax.device_get(ref)
      plans = [("autoregressive", None, base.params, base.cfg,
                blockdec.Autoregressive(), "chain")]
      for name, (run, make, params_of) in drafters.items():
        own = params_of == "own"
        for k in args.block_sizes:
          plans.append((name, k, run.params if own else base.params,
                        run.cfg if own else base.cfg, make(run, k), "chain"))
          if (name, k) in shapes:
            plans.append((name, k, run.params, run.cfg, TREE_METHODS[name](
                run, shapes[name, k][0]),
                          f"static, Sequoia {args.tree_budget} nodes"))
          if name in DYNAMIC_TREES and args.dynamic_nodes:
            plans.append((name, k, run.params, run.cfg, blockdec.Blockwise(
                k, tree=blockdec.DynamicTree(nodes=args.dynamic_nodes,
                                             top_k=args.dynamic_top_k)),
                          f"dynamic, {args.dynamic_nodes} nodes"))
          if name == "eagle" and args.tree_chains > 1:
            plans.append((name, k, run.params, run.cfg, blockdec.Eagle(
                k, num_drafts=args.tree_chains),
                          f"static, {args.tree_chains} chains"))
      for name, k, params, cfg, method, tree in plans:
        if name == "autoregressive":
          out, seconds, pair_ref_s, ratio = ref, ref_s, ref_s, 1.0
        else:
          out, seconds, pair_ref_s, ratio = run_paired(
              ref_pass, make_pass(params, cfg, prompts, lengths, n, method,
                                  batch, sampling, args.prompt_bucket),
              args.repeats)
          if sampling is None:  # Exact: the base's greedy text.
            np.testing.assert_array_equal(out.tokens, ref.tokens,
                                          err_msg=f"{name} k={k}")
        lens, calls = out.lengths, out.num_calls
        texts = [base.tokenizer.decode(t[:m]) for t, m in zip(out.tokens, lens)]
        degenerate = np.array([metrics.is_degenerate(t) for t in texts])
        row = {
            "model": args.model, "drafter": name, "block_size": k,
            "tree": tree, "temperature": temperature, "batch": batch,
            "tokens_per_call": metrics.block_efficiency(lens, calls),
            "tokens_per_call_nondegenerate": (
                metrics.block_efficiency(lens, calls, rows=~degenerate)
                if (~degenerate).any() else None),
            "degenerate_share": float(degenerate.mean()),
            "tokens_per_s": float(lens.sum() / seconds),
            # Tokens/s over the reference's, pass for pass (sampled passes
            # may end at EOS after different numbers of tokens).
            "speedup": ratio * float(lens.sum() / ref.lengths.sum()),
            "median_pass_s": seconds,
            "reference_median_pass_s": pair_ref_s,
        }
        rows.append(row)
        print(f"  T={temperature:g} batch {batch:2d} {name:15s} k={k} "
              f"{tree}: "
              f"{row['tokens_per_call']:.2f} tokens/call "
              f"({_fmt(row['tokens_per_call_nondegenerate'])} non-degenerate)"
              f", {row['tokens_per_s']:.0f} tokens/s, {row['speedup']:.2f}x")
  load_after = os.getloadavg()[0]
  result = {
      "machine": metrics.machine_description(
          f"load average {load_before:.1f} before, {load_after:.1f} after"),
      "command": "python experiments/drafters.py " + shlex.join(
          sys.argv[1:] if argv is None else argv),
      "model": args.model, "base": MODELS[args.model],
      "prompt_bytes": list(args.prompt_bytes),
      "prompts": int(len(prompts)), "new_tokens": n, "repeats": args.repeats,
      "prompt_bucket": args.prompt_bucket,
      "paired": True,
      "base_heldout_nats_per_byte": base.summary["valid"].get(
          "nats_per_byte"),
      "base_heldout_loss": base.summary["valid"]["loss"],
      "training": {name: {"steps": run.summary.get("steps"),
                          **({"eagle_top1": run.summary["valid"]["eagle_top1"]}
                             if "eagle_top1" in run.summary["valid"] else {})}
                   for name, (run, _, _) in drafters.items()},
      "tree_shapes": [
          {"drafter": name, "block_size": k, "nodes": tree.size,
           "parents": list(tree.parents),
           "acceptance": np.round(acc, 4).tolist(),
           "predicted_tokens_per_call": tree_shapes.expected_tokens(tree,
                                                                    acc)}
          for (name, k), (tree, acc) in shapes.items()],
      "targets": {**TARGETS, **({"speedup_b1": SPEEDUP_TARGETS[args.model]}
                                if args.model in SPEEDUP_TARGETS else {})},
      "rows": rows,
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
  out.with_suffix(".md").write_text(markdown(result))
  plot(result, out.with_suffix(".png"))
  print(f"[drafters] wrote {out}.json|md|png")
  return result


_TITLES = {"demo": "`make demo`", "mid": "mid-size (memory-bound)",
           "tiny": "tiny (smoke)", "gpt2-tiny": "tiny GPT-2 (BPE)"}


def _fmt(x, f="{:.2f}"):
  return "-" if x is None else f.format(x)


def markdown(result) -> str:
  rows = result["rows"]
  model = result.get("model", "demo")
  lo, hi = result.get("prompt_bytes", PROMPT_BYTES)
  nats = result["base_heldout_nats_per_byte"]
  loss = (f"{nats:.3f} nats/byte" if nats is not None else
          f"{result['base_heldout_loss']:.3f} nats/token")
  lines = [
      f"# Lossless drafters on the frozen {_TITLES.get(model, model)} base "
      f"(`{result.get('base', MODELS['demo'])}`)",
      "",
      f"Machine: {result['machine']}. Written by `{result['command']}`.",
      "",
      f"{result['prompts']} held-out stdlib prompts (test split, "
      f"{lo}-{hi} bytes), {result['new_tokens']} "
      "new tokens"
      + (f"; each batch's prompts padded only to its longest, rounded up to "
         f"a multiple of {result['prompt_bucket']} bytes (at batch 1 a "
         f"prompt is not padded to the longest of the set)"
         if result.get("prompt_bucket") else "")
      + ". Every drafter leaves the base unchanged: greedy rows are "
      "checked token for token against the base's greedy output, sampled "
      "rows are lossless. tokens/s are medians of "
      f"{result['repeats']} passes after a warm-up; speedups are ratios to "
      "the base's greedy decoding (ancestral sampling at the same "
      "temperature) at the same batch"
      + (", timed pass for pass in alternation with each method (the median "
         "of the per-pair ratios), so the machine's drift during the run "
         "cancels" if result.get("paired") else " in the same run")
      + f". Base held-out loss "
      f"{loss}.",
      "",
      "| temperature | batch | drafter | k | tree | tokens/call | "
      "non-degenerate | degenerate | tokens/s | speedup |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['temperature']:g} | {r['batch']} | {r['drafter']} | "
        f"{_fmt(r['block_size'], '{}')} | {r['tree']} | "
        f"{r['tokens_per_call']:.2f} | "
        f"{_fmt(r['tokens_per_call_nondegenerate'])} | "
        f"{r['degenerate_share']:.0%} | {r['tokens_per_s']:.0f} | "
        f"{r['speedup']:.2f}x |")
  t = result["targets"]

  def best(temperature):
    rs = [r for r in rows if r["temperature"] == temperature
          and r["drafter"] != "autoregressive"
          and r["tokens_per_call_nondegenerate"] is not None]
    return max(rs, key=lambda r: r["tokens_per_call_nondegenerate"],
               default=None)

  def describe(r, target):
    if r is None:
      return "-"
    met = "met" if r["tokens_per_call_nondegenerate"] >= target else "not met"
    return (f"{r['drafter']} k={r['block_size']} (batch {r['batch']}): "
            f"{r['tokens_per_call_nondegenerate']:.2f} ({met})")
  temps = sorted({r["temperature"] for r in rows})
  lines += [
      "",
      "## Targets (tokens per call over non-degenerate rows)",
      "",
      f"- Greedy >= {t['greedy_nondegenerate']}: "
      f"{describe(best(0.0), t['greedy_nondegenerate'])}.",
  ]
  if len(temps) > 1:
    lines.append(f"- Temperature {temps[-1]:g} >= "
                 f"{t['sampled_nondegenerate']}: "
                 f"{describe(best(temps[-1]), t['sampled_nondegenerate'])}.")
  fastest = max((r for r in rows if r["temperature"] == 0 and r["batch"] == 1
                 and r["drafter"] != "autoregressive"),
                key=lambda r: r["speedup"], default=None)
  if fastest is not None:
    target = t.get("speedup_b1")
    verdict = ("" if target is None else
               f" (target >= {target}x: "
               f"{'met' if fastest['speedup'] >= target else 'not met'})")
    lines.append(f"- Fastest greedy batch-1 drafter: {fastest['drafter']} "
                 f"k={fastest['block_size']} {fastest['tree']}, "
                 f"{fastest['speedup']:.2f}x its base's greedy{verdict}.")
  if result.get("tree_shapes"):
    lines += ["", "## Static tree shapes (Sequoia-style)", "",
              "Acceptance per depth and rank measured with probe trees on "
              "valid-split prompts; the tree is the best one of its node "
              "budget for that matrix (`blockdec.tree_shapes.best_tree`).",
              "", "| drafter | k | nodes | depth | leaves | predicted "
              "tokens/call | measured (greedy, batch 1) |",
              "|---|---|---|---|---|---|---|"]
    for sh in result["tree_shapes"]:
      tree = blockdec.DraftTree.from_parents(sh["parents"])
      got = [r["tokens_per_call"] for r in rows
             if r["drafter"] == sh["drafter"] and r["temperature"] == 0
             and r["batch"] == 1 and r["block_size"] == sh["block_size"]
             and r["tree"].startswith("static, Sequoia")]
      lines.append(f"| {sh['drafter']} | {sh['block_size']} | {sh['nodes']} "
                   f"| {tree.depth - 1} | {tree.num_drafts} | "
                   f"{sh['predicted_tokens_per_call']:.2f} | "
                   f"{_fmt(got[0] if got else None)} |")
  training = result["training"]
  if "eagle" in training and "eagle_top1" in training["eagle"]:
    top1 = training["eagle"]["eagle_top1"]
    lines += ["", f"EAGLE drafter: {training['eagle']['steps']} steps; "
              "held-out top-1 agreement with the base's next token "
              f"{top1[0]:.3f} on true states, {top1[-1]:.3f} on its own "
              "first predictions."]
  lines.append("")
  return "\n".join(lines)


def _tree_label(tree: str) -> str:
  """A row's `tree` column as a short plot label suffix."""
  if tree == "chain":
    return ""
  if "Sequoia" in tree:
    return " Sequoia tree"
  return " dynamic tree" if tree.startswith("dynamic") else " chains tree"


def plot(result, path):
  rows = [r for r in result["rows"] if r["drafter"] != "autoregressive"]
  temps = sorted({r["temperature"] for r in rows})
  batches = sorted({r["batch"] for r in rows})
  fig, axes = plt.subplots(1, len(temps), figsize=(6.5 * len(temps), 4.5),
                           squeeze=False)
  width = 0.8 / max(len(batches), 1)
  for ax, temperature in zip(axes[0], temps):
    at = [r for r in rows if r["temperature"] == temperature]
    names = sorted({(r["drafter"], r["block_size"], r["tree"]) for r in at})
    for j, batch in enumerate(batches):
      values = [next((r["speedup"] for r in at if r["batch"] == batch and
                      (r["drafter"], r["block_size"], r["tree"]) == name), 0)
                for name in names]
      ax.bar(np.arange(len(names)) + j * width, values, width,
             label=f"batch {batch}")
    ax.axhline(1.0, color="gray", lw=1, ls=":")
    ax.set_xticks(np.arange(len(names)) + width * (len(batches) - 1) / 2)
    ax.set_xticklabels([f"{n} k={k}{_tree_label(t)}" for n, k, t in names],
                       fontsize=8, rotation=35, ha="right")
    ax.set_ylabel("speedup over the base's own decoding")
    ax.set_title("greedy" if temperature == 0 else
                 f"sampling, T={temperature:g}")
    ax.legend(fontsize=8)
  fig.suptitle("Lossless drafters on the frozen "
               f"{_TITLES.get(result.get('model', 'demo'), 'demo')} base")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
