r"""Refined block drafts (Kim et al. 2024) against plain blockwise decoding.

Draft sources, each with num_drafts p = 1, 2, 4, 8 verified per call as one
token tree, at block sizes k = 4 and 8:

  heads          beam search over the heads' top-K lattice, head log-probs only
                 (p = 1: exactly Stern's plain blockwise draft)
  ngram          + lambda_n * log P of a Kneser-Ney n-gram LM of the training split
  neural         + lambda_m * log P of a tiny blockdec LM (1 layer, d = 64)
  ngram+neural   both terms

Every run is exact (`Exact()`): its tokens are checked against greedy decoding
(`mismatch_rows` counts rows that differ, allowed only at float near-ties).
Block efficiency is tokens per main-model call; tokens/s is wall-clock over
all prompts as one batch, median of `--repeats` runs after a compile run; the
rescorer's calls are part of that time. Plain `blockwise_decode` and greedy
are timed beside them. Degenerate rows (blockdec.metrics rule) are counted
and block efficiency is also given without them.

Launch (from the repository root):

  python experiments/refined_drafts.py                       # newest model found
  python experiments/refined_drafts.py --model=cache/<run dir> --num_prompts=16
  python experiments/refined_drafts.py --quick               # smoke run

Results: experiments/results/refined_drafts.{json,md,png}.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import statistics
import time

from absl import app, flags
import flax.struct
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import blockdec  # noqa: E402
from blockdec import checkpointing, metrics  # noqa: E402
from blockdec.training import data as data_lib  # noqa: E402
from blockdec.training.pipeline import (is_finished, load_config,  # noqa: E402
                                        train_or_load)
from blockdec.training.train import pad_prompts  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ("heads", "ngram", "neural", "ngram+neural")

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "", "Checkpoint folder of a model with proposal "
                    "heads; empty: the first finished run of CANDIDATES.")
flags.DEFINE_list("ks", ["4", "8"], "Block sizes k.")
flags.DEFINE_list("drafts", ["1", "2", "4", "8"], "Drafts per call p.")
flags.DEFINE_integer("num_prompts", 16, "Held-out (test split) prompts.")
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per prompt.")
flags.DEFINE_integer("repeats", 3, "Timed runs per setting (median).")
flags.DEFINE_integer("lattice_width", 8, "K, candidates per head (8: the heads' top-8 holds the greedy token far more often than their top-4; see the draft analysis).")
flags.DEFINE_integer("ngram_order", 4, "n of the n-gram LM.")
flags.DEFINE_float("ngram_weight", 1.0, "lambda of the n-gram log-probs.")
flags.DEFINE_float("neural_weight", 1.0, "lambda of the small LM log-probs.")
flags.DEFINE_bool("neural_parallel", True, "Small LM reads the argmax prefix "
                  "(one call per step) instead of each beam's prefix.")
flags.DEFINE_bool("autoregressive_p1", True, "Also run the left-to-right "
                  "small LM (neural, ngram+neural) at p = 1.")
flags.DEFINE_integer("rescorer_steps", 400, "Training steps of the small LM.")
flags.DEFINE_integer("batch", 0, "Rows per decoding call; 0 = all prompts "
                     "in one batch. With b > 0 the prompts run b at a time, "
                     "one call after another (b = 1: where verifying a token "
                     "tree costs about as much as a single block).")
flags.DEFINE_bool("quick", False, "Smoke run: 2 prompts, k=4, p=1,2.")
flags.DEFINE_bool("only_analysis", False, "Only (re)compute the draft "
                  "analysis and add it to an existing JSON/Markdown.")
flags.DEFINE_string("out", str(ROOT / "experiments/results/refined_drafts"),
                    "Output path prefix (.json, .md, .png).")

# Runs of the training pipeline with k >= 8 frozen heads, best first.
CANDIDATES = ("stern_frozen_cpu_k10", "heads_frozen_demo", "heads_frozen_cpu",
              "stern_frozen_demo_k10")


machine_description = metrics.machine_description  # One definition, in the library.


def find_model() -> pathlib.Path:
  if FLAGS.model:
    return pathlib.Path(FLAGS.model)
  cache = ROOT / "cache"
  for name in CANDIDATES:
    runs = sorted(d for d in cache.glob(f"{name}-*") if is_finished(d))
    if runs:
      return runs[-1]
  raise FileNotFoundError(
      f"no finished run of {CANDIDATES} under {cache}; train one "
      "(blockdec train --config configs/heads_frozen.py:cpu) or pass --model.")


def rescorer_config(steps: int):
  """A tiny byte LM (1 layer, d = 64) trained with the library's trainer."""
  c = load_config(ROOT / "configs/base_lm.py", "cpu")
  c.name = "rescorer_d64_l1"
  c.model.d_model = 64
  c.model.n_layers = 1
  c.model.n_heads = 2
  c.model.max_seq_len = 1024  # Room for prompt + continuation + draft slots.
  c.data.seq_len = 128
  c.batch_size = 16
  c.steps = steps
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = max(steps // 10, 1)
  c.eval_every = steps
  c.checkpoint_every = steps
  c.diagnostics.num_prompts = 0
  return c


def build_ngram(train_docs, tokenizer, order) -> blockdec.NGramLM:
  names = "".join(sorted(d.name for d in train_docs))
  key = hashlib.sha256(f"{names}|{order}|{type(tokenizer).__name__}".encode())
  path = ROOT / "cache" / f"ngram_o{order}_{key.hexdigest()[:12]}.safetensors"
  if path.exists():
    return blockdec.NGramLM.load(str(path))
  arrays = [np.asarray(tokenizer.encode(d.text)) for d in train_docs]
  lm = blockdec.NGramLM.build(arrays, order, tokenizer.vocab_size)
  path.parent.mkdir(parents=True, exist_ok=True)
  lm.save(str(path))
  return lm


def timed(fn, repeats):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return out, statistics.median(times), compile_s


@flax.struct.dataclass
class _Rows:
  tokens: np.ndarray
  lengths: np.ndarray
  num_calls: np.ndarray


def in_batches(decode, prompts, lengths, batch: int):
  """`decode(prompts, lengths)` over all rows, `batch` rows per call (0: all
  at once); the outputs' tokens, lengths and calls concatenated."""
  if batch <= 0 or batch >= len(lengths):
    return decode(prompts, lengths)
  outs = [decode(prompts[i:i + batch], lengths[i:i + batch])
          for i in range(0, len(lengths), batch)]
  cat = lambda f: jnp.concatenate([getattr(o, f) for o in outs])
  return _Rows(tokens=cat("tokens"), lengths=cat("lengths"),
               num_calls=cat("num_calls"))


def summarize(out, greedy_tokens, degenerate):
  tokens = np.asarray(out.tokens)
  lengths, calls = np.asarray(out.lengths), np.asarray(out.num_calls)
  mismatch = int(np.sum(np.any(tokens != greedy_tokens, axis=1)))
  return dict(
      block_efficiency=metrics.block_efficiency(lengths, calls),
      block_efficiency_non_degenerate=metrics.block_efficiency(
          lengths, calls, ~degenerate),
      tokens=int(lengths.sum()), calls=int(calls.sum()),
      mismatch_rows=mismatch)


def draft_analysis(params, cfg, prompts, lengths, n, path) -> dict:
  """Kim et al.'s draft diagnostics on the same prompts, plotted to `path`."""
  from blockdec.analysis import (draft_statistics, head_predictions,
                                 plot_draft_statistics)
  stats = draft_statistics(*head_predictions(params, cfg, prompts, lengths,
                                             max_new_tokens=n))
  plot_draft_statistics(stats, path, title="drafts of the heads along greedy "
                        f"continuations ({stats['num_positions']} positions)")
  return stats


def analysis_markdown(stats) -> str:
  k = stats["num_heads"]
  fmt = lambda xs: " | ".join("" if x != x else f"{x:.3f}" for x in xs)
  lines = ["", "## Draft analysis (Kim et al. sec. 3)", "",
           f"Teacher-forced along the greedy continuations of the same prompts "
           f"({stats['num_positions']} positions); plot: "
           "`refined_drafts_analysis.png`. Oracle block = 1 + leading depths "
           "whose greedy token is in the heads' top-K (upper bound of lattice "
           "rescoring with K candidates).", "",
           "| head j | " + " | ".join(str(j) for j in range(1, k + 1)) + " |",
           "|---" * (k + 1) + "|",
           f"| entropy (nats) | {fmt(stats['entropy'])} |",
           f"| confidence | {fmt(stats['confidence'])} |",
           f"| top-1 accuracy | {fmt(stats['accuracy'])} |"]
  for width, cov in stats["coverage"].items():
    lines.append(f"| in top-{width} | {fmt(cov)} |")
  lines.append(f"| repetition j,j+1 drafts | {fmt(stats['draft_repetition'])} | |")
  lines.append(f"| repetition j,j+1 text | {fmt(stats['text_repetition'])} | |")
  lines += ["", "Oracle block size by K: " + ", ".join(
      f"K={w}: {b:.2f}" for w, b in stats["oracle_block"].items()), ""]
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.only_analysis:
    out_prefix = pathlib.Path(FLAGS.out)
    result = json.loads(out_prefix.with_suffix(".json").read_text())
    cfg, params, tokenizer = checkpointing.load_checkpoint(ROOT / result["model"])
    splits = data_lib.split_corpus(data_lib.load_corpus("stdlib"))
    texts = data_lib.heldout_prompts(splits["test"],
                                     result["settings"]["num_prompts"],
                                     min_bytes=128, max_bytes=192)
    prompts, lengths = pad_prompts([np.asarray(tokenizer.encode(t))
                                    for t in texts])
    result["draft_analysis"] = draft_analysis(
        params, cfg, prompts, lengths, result["settings"]["new_tokens"],
        pathlib.Path(str(out_prefix) + "_analysis.png"))
    out_prefix.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out_prefix.with_suffix(".md").write_text(markdown(result))
    return
  if FLAGS.quick:
    FLAGS.num_prompts, FLAGS.new_tokens, FLAGS.repeats = 2, 16, 1
    FLAGS.ks, FLAGS.drafts, FLAGS.rescorer_steps = ["4"], ["1", "2"], 20
  model_dir = find_model()
  cfg, params, tokenizer = checkpointing.load_checkpoint(model_dir)
  summary_file = model_dir / "summary.json"
  model_summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
  ks = [int(k) for k in FLAGS.ks]
  if max(ks) > cfg.num_prediction_heads:
    raise ValueError(f"--ks={ks} needs {max(ks)} heads; {model_dir} has "
                     f"{cfg.num_prediction_heads}.")
  print(f"model {model_dir.name}: {cfg}")

  docs = data_lib.load_corpus("stdlib")
  splits = data_lib.split_corpus(docs)
  t0 = time.perf_counter()
  ngram = build_ngram(splits["train"], tokenizer, FLAGS.ngram_order)
  ngram_s = time.perf_counter() - t0
  test_stream = data_lib.token_stream(splits["test"], tokenizer)[:20000]
  ngram_bits = float(-np.mean(np.asarray(ngram.sequence_log_probs(test_stream)))
                     / np.log(2))
  print(f"n-gram order {ngram.order}: {ngram.num_entries} entries, "
        f"{ngram_bits:.3f} bits/token on test, built/loaded in {ngram_s:.1f}s")
  rescorer_run = train_or_load(rescorer_config(FLAGS.rescorer_steps),
                               ROOT / "cache")
  rescorer = (rescorer_run.cfg, rescorer_run.params)

  texts = data_lib.heldout_prompts(splits["test"], FLAGS.num_prompts,
                                   min_bytes=128, max_bytes=192)
  prompts, lengths = pad_prompts([np.asarray(tokenizer.encode(t)) for t in texts])
  n, reps = FLAGS.new_tokens, FLAGS.repeats

  b = FLAGS.batch
  if b > 0 and len(texts) % b:
    raise ValueError(f"--batch={b} must divide --num_prompts={len(texts)}.")
  greedy, greedy_s, _ = timed(lambda: in_batches(
      lambda x, l: blockdec.greedy_decode(params, cfg, x, l, max_new_tokens=n),
      prompts, lengths, b), reps)
  greedy_tokens = np.asarray(greedy.tokens)
  degenerate = np.array([metrics.is_degenerate(
      greedy_tokens[b, :int(greedy.lengths[b])]) for b in range(len(texts))])
  greedy_tps = float(np.sum(greedy.lengths) / greedy_s)
  rows = [dict(source="greedy", k=1, num_drafts=1,
               tokens_per_s=greedy_tps, speedup=1.0,
               **summarize(greedy, greedy_tokens, degenerate))]
  for k in ks:
    plain, plain_s, _ = timed(lambda: in_batches(
        lambda x, l: blockdec.blockwise_decode(
            params, cfg, x, l, max_new_tokens=n, block_size=k),
        prompts, lengths, b), reps)
    plain_tps = float(np.sum(plain.lengths) / plain_s)
    rows.append(dict(source="blockwise", k=k, num_drafts=1,
                     tokens_per_s=plain_tps, speedup=plain_tps / greedy_tps,
                     **summarize(plain, greedy_tokens, degenerate)))
    print(rows[-1])
    settings = [(p, source, FLAGS.neural_parallel)
                for p in (int(x) for x in FLAGS.drafts) for source in SOURCES]
    if FLAGS.autoregressive_p1 and FLAGS.neural_parallel:
      settings += [(1, s, False) for s in SOURCES if "neural" in s]
    for p, source, parallel in settings:
      # Each setting compiles its own loops (one per batch size the loop
      # compacts to); dropping the finished ones keeps the process under the
      # kernel's limit on memory mappings, which a full run otherwise hit
      # ("LLVM compilation error: Cannot allocate memory").
      jax.clear_caches()
      kw = {}
      if "ngram" in source:
        kw.update(ngram=ngram, ngram_weight=FLAGS.ngram_weight)
      if "neural" in source:
        kw.update(rescorer=rescorer, rescorer_weight=FLAGS.neural_weight,
                  rescorer_parallel=parallel)
      out, sec, compile_s = timed(lambda: in_batches(
          lambda x, l: blockdec.refined_blockwise_decode(
              params, cfg, x, l, max_new_tokens=n, block_size=k,
              num_drafts=p, lattice_width=max(FLAGS.lattice_width, 1), **kw),
          prompts, lengths, b), reps)
      tps = float(np.sum(out.lengths) / sec)
      rows.append(dict(source=source, k=k, num_drafts=p,
                       lattice_width=FLAGS.lattice_width,
                       neural_mode=("parallel" if parallel else
                                    "autoregressive") if "neural" in source
                       else None,
                       tokens_per_s=tps, speedup=tps / greedy_tps,
                       vs_blockwise_tokens_per_s=tps / plain_tps,
                       compile_s=compile_s,
                       **summarize(out, greedy_tokens, degenerate)))
      print(rows[-1])
  result = dict(
      machine=machine_description(),
      model=str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT)
                else model_dir),
      model_config=cfg.to_dict(),
      base_heldout=model_summary.get("valid"),
      rescorer=dict(config=rescorer_run.cfg.to_dict(),
                    summary=rescorer_run.summary),
      ngram=dict(order=ngram.order, entries=ngram.num_entries,
                 test_bits_per_token=ngram_bits,
                 discounts=list(ngram.discounts)),
      settings=dict(num_prompts=len(texts), new_tokens=n, repeats=reps,
                    batch=b or len(texts),
                    lattice_width=FLAGS.lattice_width,
                    ngram_weight=FLAGS.ngram_weight,
                    neural_weight=FLAGS.neural_weight,
                    neural_parallel=FLAGS.neural_parallel,
                    degenerate_rows=int(degenerate.sum())),
      rows=rows)
  out_prefix = pathlib.Path(FLAGS.out)
  out_prefix.parent.mkdir(parents=True, exist_ok=True)
  result["draft_analysis"] = draft_analysis(
      params, cfg, prompts, lengths, n,
      pathlib.Path(str(out_prefix) + "_analysis.png"))
  out_prefix.with_suffix(".json").write_text(json.dumps(result, indent=1))
  out_prefix.with_suffix(".md").write_text(markdown(result))
  plot(result, out_prefix.with_suffix(".png"))
  print(f"wrote {out_prefix}.{{json,md,png}}")


def markdown(result) -> str:
  s = result["settings"]
  lines = [
      "# Refined block drafts (Kim et al. 2024) vs plain blockwise decoding",
      "",
      f"Machine: {result['machine']}. Model: `{result['model']}` "
      f"(d={result['model_config']['d_model']}, "
      f"{result['model_config']['n_layers']} layers, "
      f"{result['model_config']['num_prediction_heads']} heads). "
      f"Held-out metrics of the model: {result['base_heldout']}.",
      "",
      f"{s['num_prompts']} held-out stdlib prompts (test split), "
      f"{s['new_tokens']} new tokens each, "
      + (f"{s['num_prompts'] // s['batch']} batches of {s['batch']} one after "
         "another" if s.get("batch", s["num_prompts"]) < s["num_prompts"]
         else "one batch") + "; medians of "
      f"{s['repeats']} timed runs. Lattice width K={s['lattice_width']}, "
      f"lambda_ngram={s['ngram_weight']}, lambda_neural={s['neural_weight']}; "
      f"n-gram order {result['ngram']['order']} "
      f"({result['ngram']['entries']} entries, "
      f"{result['ngram']['test_bits_per_token']:.2f} bits/byte on test); "
      f"rescorer d={result['rescorer']['config']['d_model']}, "
      f"{result['rescorer']['config']['n_layers']} layer. Exact acceptance: "
      "every run's tokens are compared with greedy (`mismatch rows`). "
      f"Degenerate greedy rows: {s['degenerate_rows']} of {s['num_prompts']}.",
      "",
      "| source | small LM | k | p | block eff. | block eff. (non-degen.) | "
      "tokens/s | vs blockwise (tok/s) | vs greedy | mismatch rows |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  summary = ["", "Summary (block efficiency over all rows / non-degenerate "
             "rows, best refined setting vs plain blockwise):", ""]
  for k in sorted({r["k"] for r in result["rows"] if r["source"] in SOURCES}):
    plain = next(r for r in result["rows"] if r["source"] == "blockwise"
                 and r["k"] == k)
    best = max((r for r in result["rows"] if r["source"] in SOURCES
                and r["k"] == k), key=lambda r: r["block_efficiency"])
    summary.append(
        f"- k={k}: plain {plain['block_efficiency']:.3f} / "
        f"{plain['block_efficiency_non_degenerate']:.3f}; best {best['source']}"
        f" p={best['num_drafts']}: {best['block_efficiency']:.3f} "
        f"({best['block_efficiency'] / plain['block_efficiency'] - 1:+.1%}) / "
        f"{best['block_efficiency_non_degenerate']:.3f} "
        f"({best['block_efficiency_non_degenerate'] / plain['block_efficiency_non_degenerate'] - 1:+.1%}),"
        f" at {best.get('vs_blockwise_tokens_per_s', float('nan')):.2f}x "
        "plain tokens/s.")
    fast = [r for r in result["rows"] if r["source"] in SOURCES
            and r["k"] == k and r["source"] != "heads"
            and (r.get("vs_blockwise_tokens_per_s") or 0) >= 1.0]
    if fast:
      top = max(fast, key=lambda r: r["block_efficiency"])
      summary.append(
          f"  Best at no wall-clock cost (>= 1.00x plain tokens/s): "
          f"{top['source']} p={top['num_drafts']}: "
          f"{top['block_efficiency']:.3f} "
          f"({top['block_efficiency'] / plain['block_efficiency'] - 1:+.1%}),"
          f" at {top['vs_blockwise_tokens_per_s']:.2f}x.")
  summary += ["", "Wall-clock caveat: timings are medians of few runs on the "
              "machine named above; when it is shared, `heads` p=1 (the same "
              "computation as `blockwise`) shows how large the noise is.", ""]
  lines[-3:-3] = summary
  for r in result["rows"]:
    vs = r.get("vs_blockwise_tokens_per_s")
    lines.append(
        f"| {r['source']} | {r.get('neural_mode') or ''} | {r['k']} | "
        f"{r['num_drafts']} | "
        f"{r['block_efficiency']:.3f} | "
        f"{r['block_efficiency_non_degenerate']:.3f} | "
        f"{r['tokens_per_s']:.1f} | {'' if vs is None else f'{vs:.2f}x'} | "
        f"{r['speedup']:.2f}x | {r['mismatch_rows']} |")
  text = "\n".join(lines) + "\n"
  if result.get("draft_analysis"):
    text += analysis_markdown(result["draft_analysis"])
  return text


def plot(result, path):
  rows = [r for r in result["rows"] if r["source"] in SOURCES
          and r.get("neural_mode") != "autoregressive"]
  ks = sorted({r["k"] for r in rows})
  fig, axes = plt.subplots(2, len(ks), figsize=(5 * len(ks), 7), squeeze=False)
  for col, k in enumerate(ks):
    plain = [r for r in result["rows"] if r["source"] == "blockwise"
             and r["k"] == k]
    for source in SOURCES:
      sel = sorted((r for r in rows if r["k"] == k and r["source"] == source),
                   key=lambda r: r["num_drafts"])
      ps = [r["num_drafts"] for r in sel]
      axes[0, col].plot(ps, [r["block_efficiency"] for r in sel], "o-",
                        label=source)
      axes[1, col].plot(ps, [r["tokens_per_s"] for r in sel], "o-",
                        label=source)
    for row, key in ((0, "block_efficiency"), (1, "tokens_per_s")):
      if plain:
        axes[row, col].axhline(plain[0][key], color="gray", ls="--",
                               label="plain blockwise")
      axes[row, col].set_xscale("log", base=2)
      axes[row, col].set_xlabel("drafts per call p")
    axes[0, col].set_title(f"k = {k}")
    axes[0, col].set_ylabel("block efficiency (tokens/call)")
    axes[1, col].set_ylabel("tokens/s")
  axes[0, 0].legend(fontsize=8)
  fig.suptitle("Refined block drafts: " + result["machine"], fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main)
