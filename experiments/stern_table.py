r"""Stern et al. (2018) Table 1 on the embedded corpus: the blockwise benchmark.

Run from the repository root::

    python experiments/stern_table.py                  # train/reuse, measure
    python experiments/stern_table.py --only=timing    # re-time cached models
    python experiments/stern_table.py --config=configs/stern_table.py:quick

Trains (or reuses from `--cache_dir`) the models of configs/stern_table.py:
one base LM and one k = 10 model per regime of Stern's table (regular =
frozen heads, distillation, fine-tuning, both). Block size k uses the first k
heads of the k = 10 model (Stern trained one model per k). On held-out
stdlib prompts it measures, per (regime, k, acceptance rule):

* mean accepted block size (tokens per model call) over all rows and over
  the non-degenerate rows (`blockdec.metrics.is_degenerate` on each row's
  output), with the degenerate share;
* quality: head 1's held-out loss (nats/byte; the fine-tuned regimes change
  head 1), the share of each row's output that agrees with the ORIGINAL base
  model's greedy output (common prefix / budget), and the output's NLL under
  the base model (nats/token; the quality cost of lossy acceptance);
* wall clock for the regimes in `timing.regimes`: tokens/s and speedup over
  greedy decoding of the same model, same process, same prompts, at batch 1
  (prompts one after another) and batch 8, median of `timing.repeats` after a
  warm-up; compile time separately; per-iteration cost relative to a greedy
  step; and a profile of one step (trunk, heads, loop overhead).

Writes `<out>.json` ({"machine", "rows", ...}), `<out>.md` and
`<out>_block_size.png`, `<out>_speedup.png` (default
experiments/results/stern_table). `--only=timing` keeps the quality numbers
of an existing `<out>.json` and replaces the timing ones; `--only=quality`
does the reverse.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import statistics
import time

from absl import app, flags
import jax
import matplotlib
import numpy as np
from ml_collections import config_flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

import blockdec  # noqa: E402
from blockdec import metrics  # noqa: E402
from blockdec.training import data, pipeline  # noqa: E402
from blockdec.training.train import pad_prompts  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
REGIMES = ("regular", "distillation", "fine-tuning", "both")
RULES = {"exact": blockdec.Exact(), "top2": blockdec.TopK(2),
         "top3": blockdec.TopK(3), "minblock2": blockdec.MinBlock(2),
         "minblock3": blockdec.MinBlock(3)}
PROFILE_PARTS = ("trunk_1", "greedy_step", "trunk_k", "head1_at_k",
                 "heads_k_at_1", "block_step", "loop_greedy", "loop_block")
TIMING_FIELDS = ("speedup_b1", "speedup_b8", "tokens_per_s_b1",
                 "tokens_per_s_b8", "greedy_tokens_per_s_b1",
                 "greedy_tokens_per_s_b8", "step_cost_ratio_b1",
                 "step_cost_ratio_b8", "seconds_b1", "seconds_b8",
                 "greedy_seconds_b1", "greedy_seconds_b8")

# Stern et al. 2018, Table 1 (WMT14 En-De dev, exact acceptance), k = 2..10.
STERN_K = (2, 4, 6, 8, 10)
STERN_BLOCK = {
    "regular": (1.51, 1.73, 1.76, 1.76, 1.74),
    "distillation": (1.55, 1.85, 1.90, 1.91, 1.90),
    "fine-tuning": (1.78, 2.69, 2.98, 3.01, 2.87),
    "both": (1.88, 3.27, 4.18, 4.69, 4.95),
}
STERN_SPEEDUP = (1.72, 2.69, 3.10, 3.31, 3.04)  # "both", wall clock, one GPU.
STERN_APPROX_K10 = {"top2": 5.67, "top3": 5.91}  # "both", block size.

def _define_flags():
  """The script's flags, defined only when it runs as a script: importing it
  (the quick-mode test does) must not clash with other absl flag owners."""
  return (
      config_flags.DEFINE_config_file(
          "config", str(ROOT / "configs" / "stern_table.py") + ":cpu",
          "configs/stern_table.py[:cpu|demo|quick]."),
      flags.DEFINE_enum(
          "only", "all", ("all", "train", "quality", "timing"),
          "What to (re)run: train only trains or reuses the models."),
      flags.DEFINE_string("cache_dir", "cache", "Cached training runs."),
      flags.DEFINE_string(
          "out", str(ROOT / "experiments" / "results" / "stern_table"),
          "Output prefix: writes <out>.json, <out>.md, <out>_*.png."))


# ----------------------------------------------------------------- helpers


machine_description = metrics.machine_description  # One definition, in the library.


def _finite(x):
  """JSON-safe number: NaN/inf -> None."""
  if x is None:
    return None
  x = float(x)
  return x if np.isfinite(x) else None


@dataclasses.dataclass
class Prompts:
  texts: list
  tokens: np.ndarray   # [N, P] int32, right-padded to one width for all rows
  lengths: np.ndarray  # [N] int32


def load_prompts(config, tokenizer, train_config) -> Prompts:
  """Held-out (test split) prompts of the training corpus, cut at lines."""
  e = config.eval
  docs = data.load_corpus(train_config.data.corpus,
                          pattern=train_config.data.pattern)
  splits = data.split_corpus(docs, train_config.data.valid_fraction,
                             train_config.data.test_fraction)
  texts = data.heldout_prompts(splits["test"], e.num_prompts,
                               min_bytes=e.prompt_min_bytes,
                               max_bytes=e.prompt_max_bytes, seed=e.seed)
  tokens, lengths = pad_prompts([tokenizer.encode(t) for t in texts])
  return Prompts(texts, tokens, lengths)


@dataclasses.dataclass
class Decoded:
  tokens: np.ndarray    # [N, M] int32
  lengths: np.ndarray   # [N] generated tokens per row
  num_calls: np.ndarray  # [N] model calls after prefill per row
  hist: np.ndarray      # [k] calls that accepted 1..k tokens (all rows)


def decode_rows(decode, prompts: Prompts, batch: int) -> Decoded:
  """`decode(tokens [b, P], lengths [b])` over every prompt in batches.

  The last batch is filled up with the first rows (dropped afterwards), so
  every call has the shape [batch, P] and one compilation serves them all.
  """
  n = len(prompts.lengths)
  outs = []
  for start in range(0, n, batch):
    rows = np.arange(start, start + batch) % n
    outs.append(jax.device_get(decode(prompts.tokens[rows],
                                      prompts.lengths[rows])))
  cat = lambda f: np.concatenate([np.asarray(getattr(o, f)) for o in outs])[:n]
  return Decoded(cat("tokens"), cat("lengths"), cat("num_calls"),
                 cat("accepted_hist").sum(axis=0))


def common_prefix_share(out: Decoded, ref: Decoded) -> np.ndarray:
  """[N] leading tokens equal to the reference's / the reference's length."""
  shares = []
  for r in range(len(ref.lengths)):
    m = int(min(out.lengths[r], ref.lengths[r]))
    same = out.tokens[r, :m] == ref.tokens[r, :m]
    prefix = m if same.all() else int(np.argmin(same))
    shares.append(prefix / max(int(ref.lengths[r]), 1))
  return np.array(shares)


def output_nll(base, prompts: Prompts, out: Decoded) -> float:
  """Mean NLL (nats/token) of the continuations under the base model."""
  n, p = prompts.tokens.shape
  seqs = np.zeros((n, p + out.tokens.shape[1]), np.int32)
  for r in range(n):
    lp, lo = int(prompts.lengths[r]), int(out.lengths[r])
    seqs[r, :lp] = prompts.tokens[r, :lp]
    seqs[r, lp:lp + lo] = out.tokens[r, :lo]
  logits = blockdec.forward_logits(base.params, base.cfg, seqs)  # [N, T, V]
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll = -np.asarray(np.take_along_axis(np.asarray(logp), seqs[:, 1:, None],
                                       axis=-1)[..., 0])  # [N, T-1]
  t = np.arange(seqs.shape[1] - 1)[None, :]
  start = prompts.lengths[:, None] - 1  # predicts the first generated token
  mask = (t >= start) & (t < start + out.lengths[:, None])
  return float(nll[mask].sum() / max(mask.sum(), 1))


class Clock:
  """Times calls; the first call of each signature includes compilation."""

  def __init__(self):
    self.first_call = {}  # signature -> seconds of its first call

  def run(self, signature, fn):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    dt = time.perf_counter() - t
    self.first_call.setdefault(signature, dt)
    return out, dt

  def median(self, signature, fn, repeats: int):
    """(output, median seconds of `repeats` runs after a warm-up)."""
    out, _ = self.run(signature, fn)
    times = [self.run(signature, fn)[1] for _ in range(repeats)]
    return out, statistics.median(times)


# ---------------------------------------------------------------- training


def train_models(config, cache_dir, log=print):
  """{regime: Run} for every regime, and the base Run (all cached)."""
  runs = {}
  for name in REGIMES:
    runs[name] = pipeline.train_or_load(config.train[name.replace("-", "_")],
                                        cache_dir, log=log)
  base = pipeline.train_or_load(config.train.regular.base, cache_dir, log=log)
  return runs, base


# ------------------------------------------------------------------ quality


def measure_quality(config, runs, base, prompts: Prompts, clock: Clock,
                    log=print) -> list[dict]:
  """One row per (regime, k, acceptance) with block size and quality."""
  e = config.eval
  n_new, batch = e.max_new_tokens, e.batch_size
  cfg = runs["regular"].cfg  # Every regime shares it (k heads, same trunk).

  def greedy(params):
    return lambda t, l: blockdec.greedy_decode(params, cfg, t, l,
                                               max_new_tokens=n_new)

  def blockwise(params, k, rule):
    return lambda t, l: blockdec.blockwise_decode(
        params, cfg, t, l, max_new_tokens=n_new, block_size=k,
        acceptance=RULES[rule])

  # The frozen model's head 1 is the base model's, bit for bit.
  reference = clock.run(("greedy", batch), lambda: decode_rows(
      greedy(runs["regular"].params), prompts, batch))[0]
  k_max = max(e.block_sizes)
  settings = [(k, "exact") for k in e.block_sizes] + \
      [(k_max, rule) for rule in e.approximate]
  rows = []
  for name in REGIMES:
    run = runs[name]
    own = decode_rows(greedy(run.params), prompts, batch)
    for k, rule in settings:
      out, seconds = clock.run((k, rule, batch), lambda: decode_rows(
          blockwise(run.params, k, rule), prompts, batch))
      texts = [run.tokenizer.decode(out.tokens[r, :int(out.lengths[r])])
               for r in range(len(prompts.lengths))]
      degenerate = np.array([metrics.is_degenerate(t) for t in texts])
      agree = common_prefix_share(out, reference)
      row = {
          "regime": name, "k": k, "acceptance": rule,
          "mean_block_size": metrics.block_efficiency(out.lengths,
                                                      out.num_calls),
          "mean_block_size_nondegenerate": _finite(metrics.block_efficiency(
              out.lengths, out.num_calls, ~degenerate)),
          "degenerate_share": float(degenerate.mean()),
          "agreement_with_greedy": float(agree.mean()),
          "identical_to_greedy_share": float(np.mean(agree == 1.0)),
          "agreement_with_own_greedy": float(
              common_prefix_share(out, own).mean()),
          "heldout_nll": run.summary["valid"]["nats_per_byte"],
          "heldout_nll_nats_per_token": run.summary["valid"]["loss"],
          "output_nll_base": output_nll(base, prompts, out),
          "accepted_hist": out.hist.tolist(),
          "num_rows": int(len(out.lengths)),
          **{f: None for f in TIMING_FIELDS},
      }
      rows.append(row)
      log(f"[quality] {name:12s} k={k:2d} {rule:9s} block "
          f"{row['mean_block_size']:.2f} (non-deg "
          f"{row['mean_block_size_nondegenerate'] or float('nan'):.2f}, "
          f"deg {row['degenerate_share']:.0%}) agree "
          f"{row['agreement_with_greedy']:.2f} nll_base "
          f"{row['output_nll_base']:.3f} [{seconds:.1f}s]")
  return rows


# ------------------------------------------------------------------ timing


def measure_timing(config, runs, prompts: Prompts, clock: Clock,
                   log=print):
  """Exact-acceptance timings at batch 1 and batch 8 against greedy.

  Returns ({(regime, k): timing fields}, {setting: compile seconds},
  {(regime, k, batch): seconds per loop iteration}, k = 1 for greedy).
  JAX's compilation caches are cleared first, so the first call of each
  setting includes its compilation: compile = first call - median call.
  """
  e, t = config.eval, config.timing
  n_new, batch, repeats = e.max_new_tokens, e.batch_size, t.repeats
  cfg = runs["regular"].cfg
  one = Prompts(prompts.texts[:t.num_prompts], prompts.tokens[:t.num_prompts],
                prompts.lengths[:t.num_prompts])
  eight = Prompts(prompts.texts[:batch], prompts.tokens[:batch],
                  prompts.lengths[:batch])
  if t.fresh_compile:
    jax.clear_caches()
  results, compile_s, per_iter = {}, {}, {}
  for name in t.regimes:
    params = runs[name].params

    def measure(k, b):
      """(tokens, iterations, median seconds) of greedy (k=1) or blockwise."""
      if k == 1:
        dec = lambda x, l: blockdec.greedy_decode(params, cfg, x, l,
                                                  max_new_tokens=n_new)
      else:
        dec = lambda x, l: blockdec.blockwise_decode(
            params, cfg, x, l, max_new_tokens=n_new, block_size=k)
      sig = ("time", k, b)
      compiled = sig in clock.first_call
      out, seconds = clock.median(sig, lambda: decode_rows(
          dec, one if b == 1 else eight, b), repeats)
      if not compiled and t.fresh_compile:
        label = f"{'greedy' if k == 1 else f'k={k}'} b{b}"
        compile_s[label] = max(clock.first_call[sig] - seconds, 0.0)
      # Batch 1: every prompt's calls; batch b: the loop runs until its
      # slowest row is done.
      iters = float(out.num_calls.sum() if b == 1 else out.num_calls.max())
      per_iter[(name, k, b)] = seconds / iters
      return float(out.lengths.sum()), iters, seconds

    greedy = {b: measure(1, b) for b in (1, batch)}
    # Prefill time, so that step costs compare loop iterations only: a
    # one-token greedy run is prefill + one greedy iteration.
    prefill_s, greedy_step_s = {}, {}
    one_token = lambda x, l: blockdec.greedy_decode(params, cfg, x, l,
                                                    max_new_tokens=1)
    for b in (1, batch):
      out, one_s = clock.median(("prefill", b), lambda: decode_rows(
          one_token, one if b == 1 else eight, b), repeats)
      one_it = float(out.num_calls.sum() if b == 1 else out.num_calls.max())
      _, g_it, g_s = greedy[b]
      step = (g_s - one_s) / max(g_it - one_it, 1.0)
      # Clamped to half a greedy run: at CI sizes timing noise can exceed
      # the prefill itself and would make the difference meaningless.
      prefill_s[b] = min(max(one_s - one_it * step, 0.0), 0.5 * g_s)
      greedy_step_s[b] = (g_s - prefill_s[b]) / g_it
    for k in t.block_sizes:
      fields = {}
      for b, tag in ((1, "b1"), (batch, "b8")):
        g_tok, g_it, g_s = greedy[b]
        tok, it, s = measure(k, b)
        fields.update({
            f"speedup_{tag}": g_s / s, f"tokens_per_s_{tag}": tok / s,
            f"greedy_tokens_per_s_{tag}": g_tok / g_s,
            f"step_cost_ratio_{tag}": (max(s - prefill_s[b], 0.5 * s) / it)
                                      / greedy_step_s[b],
            f"seconds_{tag}": s, f"greedy_seconds_{tag}": g_s})
      results[(name, k)] = fields
      log(f"[timing] {name:12s} k={k:2d} b1 {fields['speedup_b1']:.2f}x "
          f"({fields['tokens_per_s_b1']:.0f} tok/s, step "
          f"{fields['step_cost_ratio_b1']:.2f}x) b{batch} "
          f"{fields['speedup_b8']:.2f}x (step "
          f"{fields['step_cost_ratio_b8']:.2f}x)")
  return results, compile_s, per_iter


def profile_step(run, k: int, batch: int, context: int, repeats: int = 30):
  """Median seconds of one greedy step and one k-step, and their parts.

  Standalone jitted calls on a cache holding `context` tokens: trunk over 1
  and k tokens, head 1 over k positions, the k heads at one position. The
  decoding loop's per-iteration time minus these is its own overhead
  (acceptance, bookkeeping, cache writes, while_loop).
  """
  cfg, params = run.cfg, run.params
  score = blockdec.model_score_fn(cfg, num_heads=k)
  cache = blockdec.KVCache.make(
      num_layers=cfg.n_layers, batch=batch, length=context + 2 * k,
      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.dim_per_head)
  cache = cache.set_end_index(np.full((batch,), context, np.int32))

  def trunk(p, tokens, c):
    positions = context + np.arange(tokens.shape[1], dtype=np.int32)[None, :]
    return score.trunk(p, tokens, np.broadcast_to(positions, tokens.shape),
                       c)[0]

  fns = {
      "trunk_1": jax.jit(lambda p, x, c: trunk(p, x[:, :1], c)),
      "trunk_k": jax.jit(lambda p, x, c: trunk(p, x, c)),
      "greedy_step": jax.jit(
          lambda p, x, c: score.heads(p, trunk(p, x[:, :1], c), 1)),
      "head1_at_k": jax.jit(lambda p, h, c: score.heads(p, h, 1)),
      "heads_k_at_1": jax.jit(lambda p, h, c: score.heads(p, h[:, :1], k)),
      "block_step": jax.jit(lambda p, x, c: (
          lambda h: (score.heads(p, h, 1), score.heads(p, h[:, -1:], k)))(
              trunk(p, x, c))),
  }
  tokens = np.ones((batch, k), np.int32)
  hidden = np.ones((batch, k, cfg.d_model), np.float32)
  out = {}
  for name, fn in fns.items():
    arg = hidden if name.startswith("head") else tokens
    jax.block_until_ready(fn(params, arg, cache))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params, arg, cache))
      times.append(time.perf_counter() - t0)
    out[name] = statistics.median(times)
  return out


def profile(config, runs, prompts: Prompts, per_iter: dict, log=print):
  """`profile_step` of the last timed regime at k = 8 (or the largest k)."""
  e = config.eval
  name = config.timing.regimes[-1]
  k = 8 if 8 in e.block_sizes else max(e.block_sizes)
  context = int(prompts.lengths.max()) + e.max_new_tokens // 2
  by_batch = {}
  for b in (1, e.batch_size):
    parts = profile_step(runs[name], k, b, context)
    parts["loop_greedy"] = per_iter.get((name, 1, b))
    parts["loop_block"] = per_iter.get((name, k, b))
    by_batch[str(b)] = parts
    log(f"[profile] batch {b}: " + ", ".join(
        f"{p} {v * 1e3:.2f}ms" for p, v in parts.items() if v is not None))
  return {"regime": name, "k": k, "context": context,
          "parts": list(PROFILE_PARTS), "by_batch": by_batch}


# ----------------------------------------------------------------- reports


def _fmt(x, spec=".2f", none="–"):
  return none if x is None or (isinstance(x, float) and not np.isfinite(x)) \
      else format(x, spec)


def write_markdown(result: dict, path: pathlib.Path) -> None:
  rows = {(r["regime"], r["k"], r["acceptance"]): r for r in result["rows"]}
  ks = result["settings"]["block_sizes"]
  k_max = max(ks)
  lines = [
      "# Stern et al. (2018) Table 1 on the embedded corpus",
      "",
      f"Machine: {result['machine']}. Load average during timing: "
      f"{result.get('load_average', 'not timed')}. Written by `experiments/stern_table.py` "
      f"(preset `{result['settings']['preset']}`).",
      "",
      f"Base model: {result['base']['description']}; held-out loss "
      f"**{result['base']['heldout_nll']:.3f} nats/byte** "
      f"({result['base']['heldout_loss_nats_per_token']:.3f} nats/token). "
      "A stronger base model would change every number below.",
      "",
      f"Prompts: {result['settings']['num_prompts']} held-out stdlib prompts "
      f"({result['settings']['prompt_bytes'][0]}-"
      f"{result['settings']['prompt_bytes'][1]} bytes, test split), "
      f"{result['settings']['max_new_tokens']} new tokens each. One k = "
      f"{k_max} model per regime; block size k uses its first k heads.",
      "",
      "## Mean accepted block size (exact acceptance)",
      "",
      "Cells: all rows / non-degenerate rows (degenerate share). Stern: WMT14 "
      "En-De, one model per k.",
      "",
      "| regime | " + " | ".join(f"k={k}" for k in ks) + " |",
      "|---|" + "---|" * len(ks),
  ]
  for name in REGIMES:
    cells = []
    for k in ks:
      r = rows.get((name, k, "exact"))
      cells.append("–" if r is None else
                   f"{_fmt(r['mean_block_size'])} / "
                   f"{_fmt(r['mean_block_size_nondegenerate'])} "
                   f"({r['degenerate_share']:.0%})")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
    stern = dict(zip(STERN_K, STERN_BLOCK[name]))
    lines.append(f"| *Stern {name}* | " + " | ".join(
        _fmt(stern.get(k)) for k in ks) + " |")
  lines += [
      "",
      "## Quality",
      "",
      "Head-1 held-out loss of each regime's model (nats/byte; regular and "
      "distillation keep the base's head 1), agreement of the exact k = "
      f"{k_max} output with the ORIGINAL base model's greedy output (common "
      "prefix / budget; share of identical rows), and the output's NLL under "
      "the base model (nats/token).",
      "",
      "| regime | held-out nats/byte | agreement | identical rows | "
      "output NLL under base |",
      "|---|---|---|---|---|",
  ]
  for name in REGIMES:
    r = rows.get((name, k_max, "exact"))
    if r:
      lines.append(f"| {name} | {r['heldout_nll']:.3f} | "
                   f"{r['agreement_with_greedy']:.3f} | "
                   f"{r['identical_to_greedy_share']:.0%} | "
                   f"{r['output_nll_base']:.3f} |")
  lines += [
      "",
      f"## Approximate acceptance at k = {k_max} (lossy)",
      "",
      "Block size all / non-degenerate (degenerate share); quality cost = "
      "agreement with the base model's greedy output and the change in "
      "output NLL under the base model against exact acceptance. Stern "
      "(both): top-2 5.67, top-3 5.91; minimum block size 2-3 hurt quality "
      "badly.",
      "",
      "| regime | rule | block size | agreement | output NLL (Δ vs exact) |",
      "|---|---|---|---|---|",
  ]
  for name in REGIMES:
    exact = rows.get((name, k_max, "exact"))
    for rule in ["exact"] + list(result["settings"]["approximate"]):
      r = rows.get((name, k_max, rule))
      if r is None:
        continue
      delta = r["output_nll_base"] - exact["output_nll_base"] if exact else None
      lines.append(
          f"| {name} | {rule} | {_fmt(r['mean_block_size'])} / "
          f"{_fmt(r['mean_block_size_nondegenerate'])} "
          f"({r['degenerate_share']:.0%}) | {r['agreement_with_greedy']:.3f} "
          f"| {r['output_nll_base']:.3f} ({_fmt(delta, '+.3f')}) |")
  timed = [r for r in result["rows"] if r.get("speedup_b1") is not None]
  if timed:
    lines += [
        "",
        "## Wall clock (exact acceptance)",
        "",
        f"Speedup over greedy decoding of the same model in the same process "
        f"on the same prompts: batch 1 ({result['settings']['timing_prompts']}"
        f" prompts one after another) and batch "
        f"{result['settings']['batch_size']}; median of "
        f"{result['settings']['repeats']} repeats after a warm-up. Step cost "
        "= seconds per loop iteration / a greedy iteration's, prefill "
        "excluded (measured as a one-token greedy run; batch 8: iterations "
        "of the loop, which halves its batch as rows finish). Stern (both, "
        "one GPU): "
        + ", ".join(f"k={k} {s:.2f}x" for k, s in zip(STERN_K, STERN_SPEEDUP))
        + ".",
        "",
        "| regime | k | block size | tok/s b1 (greedy) | speedup b1 | step "
        "cost b1 | tok/s b8 (greedy) | speedup b8 | step cost b8 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in timed:
      lines.append(
          f"| {r['regime']} | {r['k']} | {r['mean_block_size']:.2f} | "
          f"{r['tokens_per_s_b1']:.0f} ({r['greedy_tokens_per_s_b1']:.0f}) | "
          f"{r['speedup_b1']:.2f}x | {r['step_cost_ratio_b1']:.2f}x | "
          f"{r['tokens_per_s_b8']:.0f} ({r['greedy_tokens_per_s_b8']:.0f}) | "
          f"{r['speedup_b8']:.2f}x | {r['step_cost_ratio_b8']:.2f}x |")
    compile_s = result.get("compile_seconds", {})
    if compile_s:
      lines += ["", "Compile (first call minus a steady call, seconds): "
                + ", ".join(f"{k} {v:.1f}" for k, v in compile_s.items()) + "."]
  prof = result.get("profile")
  if prof:
    lines += ["", f"## One step, profiled (regime `{prof['regime']}`, "
              f"k = {prof['k']}, context {prof['context']} tokens)", "",
              "Standalone jitted calls, median milliseconds (each pays a "
              "dispatch the loop does not); `loop_*` is the decoding loop's "
              "measured time per iteration, prefill included.", "",
              "| batch | " + " | ".join(prof["parts"]) + " |",
              "|---|" + "---|" * len(prof["parts"])]
    for b, parts in prof["by_batch"].items():
      lines.append(f"| {b} | " + " | ".join(
          _fmt(parts.get(p) and parts[p] * 1e3, ".2f")
          for p in prof["parts"]) + " |")
  if result.get("targets"):
    lines += ["", "## Targets", "", "| target | value | met |", "|---|---|---|"]
    for t in result["targets"]:
      lines.append(f"| {t['target']} | {_fmt(t['value'])} | "
                   f"{'yes' if t['met'] else 'no'} |")
  if result.get("notes"):
    lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
  path.write_text("\n".join(lines) + "\n")


def plot(result: dict, prefix: pathlib.Path) -> None:
  rows = result["rows"]
  ks = result["settings"]["block_sizes"]
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for i, name in enumerate(REGIMES):
    color = f"C{i}"
    r = {x["k"]: x for x in rows
         if x["regime"] == name and x["acceptance"] == "exact"}
    ax.plot(ks, [r[k]["mean_block_size"] for k in ks], "o-", color=color,
            label=f"{name} (all rows)")
    ax.plot(ks, [r[k]["mean_block_size_nondegenerate"] or np.nan for k in ks],
            "s--", color=color, label=f"{name} (non-degenerate)")
    ax.plot(STERN_K, STERN_BLOCK[name], ":", color=color, alpha=0.6,
            label=f"{name} (Stern)")
  ax.set_xlabel("k (block size)")
  ax.set_ylabel("mean accepted block size")
  ax.set_title("Exact blockwise decoding on stdlib (dotted: Stern WMT14)")
  ax.legend(fontsize=6, ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(f"{prefix}_block_size.png", dpi=120)
  plt.close(fig)

  timed = [x for x in rows if x.get("speedup_b1") is not None]
  if not timed:
    return
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for i, name in enumerate(REGIMES):
    r = sorted((x for x in timed if x["regime"] == name), key=lambda x: x["k"])
    if not r:
      continue
    ax.plot([x["k"] for x in r], [x["speedup_b1"] for x in r], "o-",
            color=f"C{i}", label=f"{name} batch 1")
    ax.plot([x["k"] for x in r], [x["speedup_b8"] for x in r], "s--",
            color=f"C{i}", label=f"{name} batch {result['settings']['batch_size']}")
  ax.plot(STERN_K, STERN_SPEEDUP, "k:", label="Stern both (GPU)")
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.set_xlabel("k (block size)")
  ax.set_ylabel("wall-clock speedup over greedy")
  ax.set_title(f"Speedup on {result['machine'].split(',')[0]}")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(f"{prefix}_speedup.png", dpi=120)
  plt.close(fig)


def targets(rows: list[dict]) -> list[dict]:
  """The issue's benchmark targets, checked where measured."""
  get = lambda name, k: next((r for r in rows if r["regime"] == name and
                              r["k"] == k and r["acceptance"] == "exact"), None)
  out = []
  both8 = get("both", 8)
  if both8:
    v = both8["mean_block_size_nondegenerate"]
    out.append({"target": "both, k=8, exact: block size (non-degenerate) >= 3.0",
                "value": v, "met": v is not None and v >= 3.0})
  timed = [r for r in rows if r.get("speedup_b1") is not None]
  if timed:
    best1 = max(r["speedup_b1"] for r in timed)
    best8 = max(r["speedup_b8"] for r in timed)
    out.append({"target": "best speedup at batch 1 >= 2.0x", "value": best1,
                "met": best1 >= 2.0})
    for r in timed:
      if r["k"] == 8:
        out.append({"target": f"{r['regime']}, k=8: step cost (batch 1) <= "
                              "1.5x a greedy step",
                    "value": r["step_cost_ratio_b1"],
                    "met": r["step_cost_ratio_b1"] <= 1.5})
    out.append({"target": "best speedup at batch 8 >= 1.2x", "value": best8,
                "met": best8 >= 1.2})
  return out


# -------------------------------------------------------------------- main


def run_benchmark(config, cache_dir="cache", out_prefix=None, only="all",
                  log=print) -> dict:
  """Trains or reuses the models, measures, writes the result files."""
  if only not in ("all", "train", "quality", "timing"):
    raise ValueError(f"only={only!r} must be 'all', 'train', 'quality' or "
                     "'timing'.")
  prefix = pathlib.Path(out_prefix or (ROOT / "experiments" / "results" /
                                       "stern_table"))
  json_path = prefix.with_name(prefix.name + ".json")
  previous = json.loads(json_path.read_text()) if json_path.exists() else None
  if only == "timing" and previous is None:
    raise FileNotFoundError(f"--only=timing updates {json_path}, which does "
                            "not exist; run the quality part first.")

  runs, base = train_models(config, cache_dir, log=log)
  if only == "train":
    return {}
  prompts = load_prompts(config, runs["regular"].tokenizer,
                         config.train.regular)
  clock = Clock()
  e, t = config.eval, config.timing
  if only == "timing":
    rows = previous["rows"]
  else:
    rows = measure_quality(config, runs, base, prompts, clock, log=log)
    if previous is not None and only == "quality":
      old = {(r["regime"], r["k"], r["acceptance"]): r for r in
             previous["rows"]}
      for r in rows:
        for f in TIMING_FIELDS:
          r[f] = old.get((r["regime"], r["k"], r["acceptance"]), {}).get(f)

  result = dict(previous or {})
  result.update({
      "machine": machine_description(),
      "settings": {
          "preset": config.preset, "block_sizes": list(e.block_sizes),
          "approximate": list(e.approximate), "num_prompts": e.num_prompts,
          "prompt_bytes": [e.prompt_min_bytes, e.prompt_max_bytes],
          "max_new_tokens": e.max_new_tokens, "batch_size": e.batch_size,
          "timing_regimes": list(t.regimes),
          "timing_block_sizes": list(t.block_sizes),
          "timing_prompts": t.num_prompts,
          "repeats": t.repeats},
      "base": {
          "workdir": str(base.workdir),
          "description": (f"{base.cfg.n_layers}-layer d={base.cfg.d_model} "
                          f"{base.tokenizer.kind}-level LM, "
                          f"{base.summary['steps']} steps"),
          "heldout_nll": base.summary["valid"]["nats_per_byte"],
          "heldout_loss_nats_per_token": base.summary["valid"]["loss"]},
      "regimes": {name: {"workdir": str(r.workdir), "steps": r.summary["steps"],
                         "training_regime": r.summary["regime"],
                         "heldout_nll": r.summary["valid"]["nats_per_byte"],
                         "head_losses": r.summary["valid"]["head_losses"]}
                  for name, r in runs.items()},
  })
  if only in ("all", "timing"):
    load_before = os.getloadavg()
    timing, compile_s, per_iter = measure_timing(config, runs, prompts, clock,
                                                 log=log)
    for r in rows:
      fields = timing.get((r["regime"], r["k"])) \
          if r["acceptance"] == "exact" else None
      for f in TIMING_FIELDS:
        r[f] = fields[f] if fields else None
    result["compile_seconds"] = compile_s
    result["profile"] = profile(config, runs, prompts, per_iter, log=log) \
        if t.profile else None
    load_after = os.getloadavg()
    result["load_average"] = (f"{load_before[0]:.1f} before, "
                              f"{load_after[0]:.1f} after timing (1-minute, "
                              f"{os.cpu_count()} cores)")
  result["rows"] = [{k: (_finite(v) if isinstance(v, float) else v)
                     for k, v in r.items()} for r in rows]
  result["targets"] = targets(result["rows"])
  prefix.parent.mkdir(parents=True, exist_ok=True)
  json_path.write_text(json.dumps(result, indent=1) + "\n")
  write_markdown(result, prefix.with_name(prefix.name + ".md"))
  plot(result, prefix)
  log(f"wrote {json_path} (+ .md, _block_size.png, _speedup.png)")
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run_benchmark(_CONFIG.value, _CACHE_DIR.value, _OUT.value, _ONLY.value)


if __name__ == "__main__":
  _CONFIG, _ONLY, _CACHE_DIR, _OUT = _define_flags()
  app.run(main)
