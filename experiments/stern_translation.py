r"""Stern et al. (2018) Table 1 on translation: block size beside BLEU.

Run from the repository root::

    python experiments/stern_translation.py                 # preset cpu
    python experiments/stern_translation.py --preset=demo
    python experiments/stern_translation.py --preset=tiny --num_test=16 \
        --out=/tmp/st    # smoke run
    python experiments/stern_translation.py --head_type=hydra \
        --out=experiments/results/stern_translation_hydra

Trains (or reuses from `--cache_dir`) the models of configs/translation.py:
an English -> German encoder-decoder on the installed gettext catalogs and
one k-head model per regime of Stern's Table 1 (regular = frozen base with
heads on the references, distillation = heads on the base's greedy
translations, fine-tuning, both). Block size k uses the first k heads of
that model (Stern trained one model per k). `--head_type=hydra` trains the
same regimes with dependent heads (each also reads the tokens before its
target: configs/heads_hydra.py) in place of Stern's independent ones, on the
same base. On the held-out test catalogs
(programs unseen in training) it measures, per (regime, k, acceptance):

* mean accepted block size: target tokens (EOS included) per decoder call,
  Stern's k-hat;
* BLEU (sacreBLEU, default 13a tokenisation) of the decoded translations
  against the catalogs' human translations;
* why blocks end where they do: each head's agreement with the regime
  model's own greedy translation, teacher-forced along it (head j at t
  against the greedy token at t + j; the tokens exact acceptance keeps);
* wall clock for the regimes in `--timed`: speedup over greedy decoding of
  the same model, same process, same sentences, at batch 1 (sentences one
  after another) and batch 8, median of `--repeats` after a warm-up.

Writes `<out>.json` ({"machine", "rows", ...}, rows `{regime, k,
acceptance, mean_block_size, bleu, speedup_b1, speedup_b8}`), `<out>.md`
and `<out>.png` (default experiments/results/stern_translation).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time

from absl import app, flags
import jax
import matplotlib
import numpy as np
import sacrebleu

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

import blockdec  # noqa: E402
from blockdec import metrics  # noqa: E402
from blockdec.analysis import drafts  # noqa: E402
from blockdec.training import pipeline, translation  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "translation.py"
REGIMES = ("regular", "distillation", "fine-tuning", "both")
APPROXIMATE = {"top2": blockdec.TopK(2), "top3": blockdec.TopK(3),
               "distance1": blockdec.Distance(1),
               "minblock2": blockdec.MinBlock(2),
               "minblock3": blockdec.MinBlock(3)}
K_VALUES = (2, 4, 6, 8, 10)  # As Stern's table (STERN_BLOCK).
# Training sources the head-agreement table also reads (a random sample).
AGREEMENT_TRAIN_SOURCES = 256


def _sibling(name: str):
  """experiments/<name>.py as a module (these scripts are not a package)."""
  spec = importlib.util.spec_from_file_location(
      name, pathlib.Path(__file__).with_name(f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules.setdefault(name, module)  # Its dataclasses look it up there.
  spec.loader.exec_module(module)
  return module


# Stern et al. 2018, Table 1 (WMT14 En-De dev, exact acceptance): mean
# accepted block size for k = 2, 4, 6, 8, 10, and the "both" model's
# wall-clock speedups (one GPU); one copy, in experiments/stern_table.py.
_stern = _sibling("stern_table")
STERN_BLOCK, STERN_SPEEDUP = _stern.STERN_BLOCK, _stern.STERN_SPEEDUP
STERN_APPROX_K10 = _stern.STERN_APPROX_K10  # "both", block size.


def _define_flags():
  return (
      flags.DEFINE_enum("preset", "cpu", ("tiny", "cpu", "demo"),
                        "configs/translation.py preset."),
      flags.DEFINE_enum("only", "all", ("all", "train"),
                        "train: only train or reuse the models."),
      flags.DEFINE_enum("head_type", "stern", ("stern", "hydra"),
                        "The regimes' proposal heads: Stern's independent "
                        "heads, or Hydra's dependent ones."),
      flags.DEFINE_integer("num_test", 0,
                           "Test pairs decoded (0 = all of the test split)."),
      flags.DEFINE_list("approximate", list(APPROXIMATE),
                        "Lossy rules measured at the largest k."),
      flags.DEFINE_list("timed", ["regular", "both"],
                        "Regimes timed against greedy decoding."),
      flags.DEFINE_integer("timing_sentences", 16,
                           "Test sentences timed (batch 1: one by one)."),
      flags.DEFINE_integer("repeats", 3, "Timed repeats (median)."),
      flags.DEFINE_integer("batch_size", 64, "Rows per decoding call (BLEU)."),
      flags.DEFINE_string("cache_dir", "cache", "Cached training runs."),
      flags.DEFINE_list("override", [],
                        "Studies: <regime>:<config key>=<value> entries "
                        "(e.g. both:steps=2400, or both:model.head_hidden="
                        "1024 with both:base.model.head_hidden=1024 for its "
                        "starting run) changing those regimes' training "
                        "configs; the others keep the preset's."),
      flags.DEFINE_string(
          "out", str(ROOT / "experiments" / "results" / "stern_translation"),
          "Output prefix: writes <out>.json, <out>.md, <out>.png."))


def _load() -> float:
  return os.getloadavg()[0]


def load_config(arg: str, locale_dir: str = ""):
  """configs/translation.py:`arg`, reading catalogs from `locale_dir` (""
  = the config's), in the run and in every base it trains first."""
  c = pipeline.load_config(CONFIG, arg)
  run = c
  while locale_dir and run is not None:
    run.data.locale_dir = locale_dir
    run = run.get("base")
  return c


def overrides_flag(items) -> dict:
  """--override ["both:steps=2400", ...] -> {"both": {"steps": 2400}}
  (values read as Python literals, else kept as text), or ValueError."""
  overrides = {}
  for item in items or ():
    regime, _, assignment = str(item).partition(":")
    key, eq, text = assignment.partition("=")
    if regime not in REGIMES or not key or not eq:
      raise ValueError(f"--override entry {item!r} must be "
                       f"<regime>:<config key>=<value> with a regime of "
                       f"{REGIMES}.")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    overrides.setdefault(regime, {})[key] = value
  return overrides


def apply_overrides(config, regime: str, changes: dict):
  """Sets each dotted key of `changes` in `config` (a regime's training
  config); a key it lacks or a value of the wrong type is a ValueError."""
  for key, value in changes.items():
    *path, last = key.split(".")
    node = config
    for name in path:
      node = node.get(name) if hasattr(node, "get") else None
    if not hasattr(node, "get") or last not in node:
      raise ValueError(f"--override {regime}:{key}: the {regime} config has "
                       f"no field {key!r}.")
    try:
      node[last] = value
    except TypeError as e:
      raise ValueError(f"--override {regime}:{key}={value!r}: {e}") from None
  return config


def train_all(preset: str, cache_dir: str, locale_dir: str = "",
              overrides: dict | None = None, head_type: str = "stern"):
  """{regime: Run} and the base Run, trained now or reused.

  `overrides` {regime: {dotted config key: value}} changes those regimes'
  training configs (a study; the other regimes keep the preset's).
  `head_type`: the regimes' proposal heads (configs/translation.py).
  """
  base = pipeline.train_or_load(load_config(preset, locale_dir), cache_dir)
  runs = {}
  for r in REGIMES:
    c = apply_overrides(load_config(f"{preset},{r},{head_type}", locale_dir),
                        r,
                        (overrides or {}).get(r, {}))
    runs[r] = pipeline.train_or_load(c, cache_dir)
  return base, runs


class Translator:
  """Decodes fixed-width test sources with any method (one compile each)."""

  def __init__(self, encoded, refs, tokenizer, n_new: int, batch_size: int):
    self.sources = encoded.sources
    self.source_lengths = encoded.source_lengths
    self.refs = refs
    self.tokenizer = tokenizer
    self.n_new = n_new
    self.batch_size = batch_size

  def decode(self, run, method, rows, batch_size=None):
    """(tokens [N, n_new], lengths [N], calls [N]) of `rows` in batches of
    `batch_size` (default: the translator's); the last batch is padded with
    copies of row 0 (dropped after), so every call has one shape."""
    batch_size = batch_size or self.batch_size
    tokens, lengths, calls = [], [], []
    for start in range(0, len(rows), batch_size):
      part = rows[start:start + batch_size]
      pad = batch_size - len(part) if len(rows) > batch_size else 0
      idx = np.concatenate([part, np.full(pad, rows[0])]).astype(int)
      out = blockdec.decode(
          run.params, run.cfg, np.full((len(idx), 1), translation.BOS_ID),
          np.ones(len(idx), np.int32), self.n_new, method=method,
          eos_id=translation.EOS_ID, source=self.sources[idx],
          source_lengths=self.source_lengths[idx])
      keep = slice(0, len(part))
      tokens.append(np.asarray(out.tokens)[keep])
      lengths.append(np.asarray(out.lengths)[keep])
      calls.append(np.asarray(out.num_calls)[keep])
    return (np.concatenate(tokens), np.concatenate(lengths),
            np.concatenate(calls))

  def text(self, tokens, lengths) -> list[str]:
    out = []
    for row, n in zip(tokens, lengths):
      ids = [int(t) for t in row[:n] if t > translation.EOS_ID]
      out.append(self.tokenizer.decode(ids))
    return out

  def measure(self, run, method, rows) -> dict:
    tokens, lengths, calls = self.decode(run, method, rows)
    hyps = self.text(tokens, lengths)
    bleu = sacrebleu.corpus_bleu(hyps, [[self.refs[i] for i in rows]])
    # Loops ("TTTT...") are easy to draft: block sizes also without them.
    ok = ~np.array([metrics.is_degenerate(h) for h in hyps], bool)
    return {"mean_block_size": float(lengths.sum() / max(calls.sum(), 1)),
            "mean_block_size_non_degenerate": (
                metrics.block_efficiency(lengths, calls, ok)
                if ok.any() else None),
            "degenerate_share": float(1.0 - ok.mean()),
            "bleu": float(bleu.score), "tokens": tokens, "lengths": lengths}


def test_translator(base, cfg0, num_test: int = 0, batch_size: int = 64):
  """(task, rows, translator) for the first `num_test` held-out test pairs
  (0 = all) of the base's corpus (`cfg0`: the base's config)."""
  task = translation.TranslationTask(cfg0.data, base.tokenizer)
  test = task.encoded["test"]
  refs = [task.splits.test[i].target for i in test.indices]
  rows = np.arange(min(num_test, len(test)) if num_test else len(test))
  return task, rows, Translator(test, refs, base.tokenizer,
                                cfg0.data.max_target_len, batch_size)


def train_sample(task, base, cfg0, n: int, batch_size: int = 64):
  """(rows, translator) of a fixed random sample of at most
  min(n, AGREEMENT_TRAIN_SOURCES) training sources, for the head agreement
  on the text the heads trained on (no references)."""
  train = task.encoded["train"]
  rows = np.random.RandomState(0).choice(
      len(train), min(n, AGREEMENT_TRAIN_SOURCES, len(train)), replace=False)
  return rows, Translator(train, [""] * len(train), base.tokenizer,
                          cfg0.data.max_target_len, batch_size)


def identical(got, greedy) -> bool:
  """Whether two `Translator.measure` results hold the same translations,
  token for token and in length."""
  return bool(np.array_equal(got["tokens"], greedy["tokens"])
              and np.array_equal(got["lengths"], greedy["lengths"]))


def write_outputs(report, out, markdown_fn):
  """<out>.json (the report) and <out>.md (markdown_fn(report))."""
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
  out.with_suffix(".md").write_text(markdown_fn(report))


def head_agreement(translator: Translator, run, rows, k: int,
                   chunk: int = 32) -> dict:
  """Each head's agreement with `run`'s own greedy translation of `rows`.

  Teacher-forced along that translation (EOS included): head j at target
  position t against the greedy token at t + j (`analysis.drafts`), in
  chunks of `chunk` sentences (a chunk's log-probs are [positions, k, V]).
  Returns {"positions", "top1": [k], "top5": [k] (the greedy token among
  the head's 5 likeliest), "block_from_any_position": 1 + the run of
  leading heads 2..k that agree, averaged over positions (what a call
  starting there would accept)}.
  """
  # `drafts.draft_statistics` per chunk, its means weighted back together
  # by how many positions each chunk gave each head (0 where it had none).
  top1, top5, block = np.zeros(k), np.zeros(k), 0.0
  per_head, positions = np.zeros(k), 0
  for start in range(0, len(rows), chunk):
    idx = np.asarray(rows[start:start + chunk])
    log_probs, targets, ok = drafts.head_predictions(
        run.params, run.cfg, np.full((len(idx), 1), translation.BOS_ID),
        np.ones(len(idx), np.int32), max_new_tokens=translator.n_new,
        num_heads=k, eos_id=translation.EOS_ID,
        source=translator.sources[idx],
        source_lengths=translator.source_lengths[idx])
    st = drafts.draft_statistics(log_probs, targets, ok, widths=(1, 5))
    counts = ok.sum(axis=0)
    top1 += np.nan_to_num(st["accuracy"]) * counts
    top5 += np.nan_to_num(st["coverage"][5]) * counts
    block += st["oracle_block"][1] * st["num_positions"]
    per_head += counts
    positions += st["num_positions"]
  return {"positions": positions, "top1": (top1 / per_head).tolist(),
          "top5": (top5 / per_head).tolist(),
          "block_from_any_position": block / positions}


def time_method(translator: Translator, run, method, rows, batch: int,
                repeats: int) -> float:
  """Median seconds to decode `rows` in batches of `batch` (after a
  warm-up call that compiles)."""
  translator.decode(run, method, rows[:batch], batch)  # Compile.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    translator.decode(run, method, rows, batch)
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run_benchmark(preset="cpu", cache_dir="cache", out=None, num_test=0,
                  timed=("regular", "both"), timing_sentences=16, repeats=3,
                  batch_size=64, only="all", approximate=tuple(APPROXIMATE),
                  locale_dir="", overrides=None,
                  head_type="stern") -> dict:
  """Trains or reuses the models, measures, writes <out>.json|md|png.

  `approximate`: the lossy rules measured at the largest k (names of
  APPROXIMATE). `locale_dir`: read the catalogs there (tests build their
  own). Returns the report (the JSON's content).
  """
  base, runs = train_all(preset, cache_dir, locale_dir, overrides,
                         head_type)
  if only == "train":
    return {}
  cfg0 = load_config(preset, locale_dir)
  task, rows, translator = test_translator(base, cfg0, num_test, batch_size)
  refs = translator.refs
  k_max = runs["regular"].cfg.num_prediction_heads
  k_values = [k for k in K_VALUES if k <= k_max] or [k_max]
  result_rows = []
  load_before = _load()

  greedy_out = translator.measure(base, blockdec.Autoregressive(), rows)
  base_bleu = greedy_out["bleu"]
  print(f"[base] greedy BLEU {base_bleu:.2f} on {len(rows)} test pairs")
  heads = {}  # regime -> head_agreement on the test sources
  # ... and on training sources: do the heads fit the text they trained on?
  heads_train = {}
  train_rows, train_translator = train_sample(task, base, cfg0, len(rows),
                                              batch_size)
  ceilings = {}  # regime -> the block sizes if every head were right
  for regime in REGIMES:
    run = runs[regime]
    greedy = translator.measure(run, blockdec.Autoregressive(), rows)
    result_rows.append(_row(regime, 1, "exact", greedy, greedy, greedy_out))
    ceilings[regime] = ceiling(greedy["lengths"], k_values)
    for k in k_values:
      got = translator.measure(run, blockdec.Blockwise(block_size=k), rows)
      result_rows.append(_row(regime, k, "exact", got, greedy, greedy_out))
      print(f"[{regime}] k={k} exact: block {got['mean_block_size']:.2f} "
            f"BLEU {got['bleu']:.2f}")
    for name in approximate:
      rule = APPROXIMATE[name]
      got = translator.measure(
          run, blockdec.Blockwise(block_size=k_values[-1], acceptance=rule),
          rows)
      result_rows.append(_row(regime, k_values[-1], name, got, greedy,
                              greedy_out))
    heads[regime] = head_agreement(translator, run, rows, k_values[-1])
    heads_train[regime] = head_agreement(train_translator, run, train_rows,
                                         k_values[-1])
    print(f"[{regime}] heads agree with own greedy (top-1): " + ", ".join(
        f"{x:.2f}" for x in heads[regime]["top1"]) + "; on training "
          "sources: " + ", ".join(
              f"{x:.2f}" for x in heads_train[regime]["top1"]))
  # Wall clock, with nothing else decoding: regimes x k against greedy.
  t_rows = rows[:timing_sentences]
  for regime in timed:
    run = runs[regime]
    for batch in (1, 8):
      greedy_s = time_method(translator, run, blockdec.Autoregressive(),
                             t_rows, batch, repeats)
      for k in k_values:
        block_s = time_method(translator, run,
                              blockdec.Blockwise(block_size=k), t_rows, batch,
                              repeats)
        r = find_row(result_rows, regime, k)
        r[f"speedup_b{batch}"] = greedy_s / block_s
        r[f"seconds_b{batch}"] = block_s
        r[f"greedy_seconds_b{batch}"] = greedy_s
      print(f"[timing] {regime} batch {batch}: greedy {greedy_s:.2f} s")
  load_after = _load()
  base_valid = json.loads((base.workdir / "summary.json").read_text())["valid"]
  report = {
      "machine": metrics.machine_description(),
      "load_1min": {"before": load_before, "after": load_after},
      "preset": preset, "command": " ".join(sys.argv),
      "head_type": head_type,
      "overrides": dict(overrides or {}),
      "num_test": int(num_test),
      "test_pairs": int(len(rows)),
      "reference_degenerate_share": float(np.mean(
          [metrics.is_degenerate(refs[i]) for i in rows])),
      "test_domains": task.splits.domains["test"],
      "corpus": task.splits.summary(),
      "base": {"bleu": base_bleu, "valid_loss": base_valid["loss"],
               "model": base.cfg.to_dict()},
      "timing_sentences": int(len(t_rows)), "repeats": repeats,
      "stern_block": STERN_BLOCK, "stern_speedup": STERN_SPEEDUP,
      "training": {r: _training(run) for r, run in runs.items()},
      "rows": result_rows,
      "head_agreement": heads,
      "head_agreement_train": heads_train,
      "ceiling": ceilings,
      "agreement_train_sources": int(len(train_rows)),
      "examples": _examples(translator, rows, greedy_out, 5),
  }
  report["target"] = target(report)
  if out:
    write_outputs(report, out, markdown)
    plot(report, pathlib.Path(out).with_suffix(".png"))
  return report


def _row(regime, k, acceptance, got, greedy, base_greedy) -> dict:
  """One JSON row; agreement = share of sentences identical to the regime
  model's own greedy translation (exact acceptance: 1.0 by construction)."""
  same = np.all(got["tokens"] == greedy["tokens"], axis=1)
  same_base = np.all(got["tokens"] == base_greedy["tokens"], axis=1)
  return {"regime": regime, "k": k, "acceptance": acceptance,
          "mean_block_size": got["mean_block_size"], "bleu": got["bleu"],
          "mean_block_size_non_degenerate":
              got["mean_block_size_non_degenerate"],
          "degenerate_share": got["degenerate_share"],
          "identical_to_own_greedy": float(same.mean()),
          "identical_to_base_greedy": float(same_base.mean()),
          "speedup_b1": None, "speedup_b8": None}


def ceiling(lengths, k_values) -> dict:
  """The mean accepted block size if every head were right, from greedy
  output lengths [N] (EOS included): a call commits at most k tokens, so a
  sentence of L tokens takes ceil(L / k) calls.
  {"mean_length", "block_if_all_heads_right": {str(k): tokens per call}}."""
  lengths = np.asarray(lengths, np.int64)
  return {"mean_length": float(lengths.mean()),
          "block_if_all_heads_right": {
              str(k): float(lengths.sum() / np.ceil(lengths / k).sum())
              for k in k_values}}


def _share(x) -> str:
  return "–" if x is None else f"{100 * x:.0f}%"


def _block_cell(r) -> str:
  """'1.74 (1.70) / 21.40': block size (non-degenerate rows) / BLEU."""
  nd = r.get("mean_block_size_non_degenerate")
  inner = "" if nd is None or r["k"] == 1 else f" ({nd:.2f})"
  return f"{r['mean_block_size']:.2f}{inner} / {r['bleu']:.2f}"


def _ceiling_cell(c) -> str:
  """'6.65 (14.5)' for the target k, or '–'."""
  if not c or str(TARGET_K) not in c["block_if_all_heads_right"]:
    return "–"
  return (f"{c['block_if_all_heads_right'][str(TARGET_K)]:.2f} "
          f"({c['mean_length']:.1f})")


def find_row(rows, regime, k, acceptance="exact") -> dict | None:
  """The row of (regime, k, acceptance rule), or None."""
  return next((r for r in rows if (r["regime"], r["k"], r["acceptance"])
               == (regime, k, acceptance)), None)


TARGET_K, TARGET_BLOCK, TARGET_BLEU_DROP = 8, 4.0, 1.0
HEAD_KINDS = {
    "stern": "Stern's (each head reads the decoder's final state; "
             "configs/translation.py, `head_type=\"stern\"`)",
    "hydra": "Hydra's dependent heads, not Stern's (head j also reads the "
             "embeddings of the j - 1 tokens before its target, at decoding "
             "time the drafts of the heads before it; "
             "`head_type=\"hydra\"`); regimes, data and budgets as Stern's "
             "rows of experiments/results/stern_translation.md. In the "
             "head-agreement table head j reads the greedy tokens before "
             "its target, so its agreement is the chance a draft survives "
             "once the drafts before it have"}


def target(report) -> dict | None:
  """The issue's target: "both" at k = 8 with a mean accepted block size of
  at least 4.0 and BLEU within 1 point of the regular model's greedy
  output (its frozen trunk's: the base's)."""
  both = find_row(report["rows"], "both", TARGET_K)
  regular = find_row(report["rows"], "regular", 1)
  if both is None or regular is None:
    return None
  drop = regular["bleu"] - both["bleu"]
  return {"k": TARGET_K, "block_size": both["mean_block_size"],
          "block_size_non_degenerate":
              both.get("mean_block_size_non_degenerate"),
          "bleu": both["bleu"], "regular_greedy_bleu": regular["bleu"],
          "bleu_drop": drop,
          "met": bool(both["mean_block_size"] >= TARGET_BLOCK
                      and drop <= TARGET_BLEU_DROP)}


def _training(run) -> dict:
  """A regime's training budget and its held-out loss per head."""
  c = json.loads((run.workdir / "train_config.json").read_text())
  return {"steps": int(run.summary["steps"]),
          "batch_size": int(c["batch_size"]),
          "learning_rate": float(c["optim"]["learning_rate"]),
          "trunk_lr_scale": c["optim"].get("trunk_lr_scale"),
          "valid_head_losses": run.summary["valid"].get("head_losses")}


def _examples(translator, rows, greedy_out, n):
  hyps = translator.text(greedy_out["tokens"][:n], greedy_out["lengths"][:n])
  return [{"reference": translator.refs[i], "base_greedy": h}
          for i, h in zip(rows[:n], hyps)]


def _fmt(x, digits=2):
  return "–" if x is None else f"{x:.{digits}f}"


def markdown(report) -> str:
  rows = report["rows"]
  get = lambda regime, k, acc="exact": find_row(rows, regime, k, acc)
  ks = sorted({r["k"] for r in rows if r["acceptance"] == "exact"})
  base = report["base"]
  lines = [
      "# Stern et al. (2018) Table 1 on translation (gettext En-De)", "",
      f"Machine: {report['machine']}. Load average (1-minute): "
      f"{report['load_1min']['before']:.1f} before, "
      f"{report['load_1min']['after']:.1f} after. Written by "
      f"`experiments/stern_translation.py --preset={report['preset']}"
      + (f" --num_test={report['num_test']}" if report.get("num_test")
         else "")
      + (f" --head_type={report['head_type']}"
         if report.get("head_type", "stern") != "stern" else "")
      + (" --override=" + ",".join(
          f"{r}:{k}={v}" for r, changes in report["overrides"].items()
          for k, v in changes.items())
         if report.get("overrides") else "")
      + "`.", "",
      f"Corpus: {report['corpus'].splitlines()[0]}; "
      f"{report['test_pairs']} test pairs from the held-out catalogs "
      f"({', '.join(report['test_domains'])}), unseen in training.", "",
      f"Base model: encoder-decoder, {base['model']['encoder_layers']} + "
      f"{base['model']['n_layers']} layers, d = {base['model']['d_model']}, "
      f"shared BPE vocabulary of {base['model']['vocab_size']}; held-out "
      f"loss {base['valid_loss']:.3f} nats/token; greedy **BLEU "
      f"{base['bleu']:.2f}** (sacreBLEU 13a).", "",
      "Proposal heads: " + HEAD_KINDS[report.get("head_type", "stern")]
      + ".", "",
      "## Mean accepted block size and BLEU (exact acceptance)", "",
      "Cells: mean accepted block size (in brackets: over the sentences "
      "whose translation is not degenerate, `blockdec.metrics`' rule: "
      "loops such as 'TTTT...' are easy to draft) / BLEU. k = 1 is the "
      "regime model's own greedy decoding; degenerate: the share of its "
      "greedy translations flagged (references: "
      f"{_share(report.get('reference_degenerate_share'))}). Stern: WMT14 "
      "En-De, one model per k (block size only).", "",
      "| regime | " + " | ".join(f"k={k}" for k in ks)
      + " | degenerate |",
      "|---|" + "---|" * (len(ks) + 1)]
  for regime in REGIMES:
    cells = []
    for k in ks:
      r = get(regime, k)
      cells.append("–" if r is None else _block_cell(r))
    greedy = get(regime, 1)
    lines.append(f"| {regime} | " + " | ".join(cells) + " | "
                 + _share(greedy and greedy.get("degenerate_share")) + " |")
    stern = dict(zip(K_VALUES, STERN_BLOCK[regime]))
    lines.append(f"| *Stern {regime}* | " + " | ".join(
        _fmt(stern.get(k)) for k in ks) + " | – |")
  t = report.get("target")
  if t:
    lines += ["", f"**Target** (\"both\" at k = {t['k']}: block size >= "
              f"{TARGET_BLOCK:.1f}, BLEU within {TARGET_BLEU_DROP:.0f} point "
              f"of the regular model's greedy {t['regular_greedy_bleu']:.2f}):"
              f" block size {t['block_size']:.2f}"
              + (f" ({t['block_size_non_degenerate']:.2f} without "
                 "degenerate translations)"
                 if t.get("block_size_non_degenerate") is not None else "")
              + f", BLEU {t['bleu']:.2f} "
              f"({-t['bleu_drop']:+.2f}); Stern's row: "
              f"{dict(zip(K_VALUES, STERN_BLOCK['both']))[t['k']]:.2f}. "
              + ("Met." if t["met"] else "Not met.")]
  training = report.get("training")
  if training:
    lines += ["", "Training (each regime from configs/translation.py; held-"
              "out loss in nats/token, heads 1, 2, 4, k):", "",
              "| regime | steps x batch | lr | trunk lr scale | head losses |",
              "|---|---|---|---|---|"]
    for regime in REGIMES:
      tr = training[regime]
      hl = tr["valid_head_losses"] or []
      picks = [hl[i] for i in (0, 1, 3, len(hl) - 1) if i < len(hl)]
      lines.append(f"| {regime} | {tr['steps']} x {tr['batch_size']} | "
                   f"{tr['learning_rate']:g} | "
                   f"{_fmt(tr['trunk_lr_scale'], 1)} | "
                   + ", ".join(f"{x:.2f}" for x in picks) + " |")
  heads = report.get("head_agreement")
  if heads:
    k = len(next(iter(heads.values()))["top1"])
    shown = sorted({j for j in (2, 3, 4, 6, 8, k) if j <= k})
    lines += ["", "## Why blocks end: the heads against the model's own "
              "greedy translation", "",
              "Teacher-forced along each regime model's greedy translation "
              "of the test sources (EOS included): the share of positions "
              "where head j's argmax is the greedy token j - 1 places "
              "later (head 1: 1.00 by construction), top-5 in brackets; "
              "from any position = 1 + the run of leading heads that "
              "agree there, averaged over positions (the block a "
              f"k = {k} call starting there would accept). Training "
              "sources: the same on a sample of the regime's training "
              "sources (the text its heads learned from), to tell "
              "underfitting from the held-out programs' novelty. Every "
              f"head right, k = {TARGET_K}: the block size if all heads "
              "agreed everywhere (a sentence of L tokens, EOS included, in "
              f"ceil(L / {TARGET_K}) calls), beside the mean greedy length "
              "it comes from: how much of the short messages' room the "
              "heads use.", "",
              "| regime | " + " | ".join(f"head {j}" for j in shown)
              + " | from any position | training sources: head 2, from "
              f"any position | every head right, k = {TARGET_K} (mean "
              "length) |",
              "|---|" + "---|" * (len(shown) + 3)]
    for regime in REGIMES:
      h = heads.get(regime)
      if h is None:
        continue
      t = report.get("head_agreement_train", {}).get(regime)
      lines.append(f"| {regime} | " + " | ".join(
          f"{h['top1'][j - 1]:.2f} ({h['top5'][j - 1]:.2f})" for j in shown)
                   + f" | {h['block_from_any_position']:.2f} | "
                   + ("–" if t is None else
                      f"{t['top1'][1]:.2f}, "
                      f"{t['block_from_any_position']:.2f}") + " | "
                   + _ceiling_cell(report.get("ceiling", {}).get(regime))
                   + " |")
  lines += ["", "## Approximate acceptance at the largest k (lossy)", "",
            "BLEU cost against the regime's exact decoding; identical = share "
            "of sentences equal to the regime model's greedy translation. "
            "Distance-based acceptance (|proposal - argmax| <= 1) is Stern's "
            "rule for ordinal outputs (pixel intensities); BPE ids are not "
            "ordinal, so it is shown only for completeness. Stern (both, "
            "k = 10): " + ", ".join(f"{n.replace('top', 'top-')} {v:.2f}"
                                    for n, v in STERN_APPROX_K10.items())
            + ".", "",
            "| regime | rule | block size | BLEU | ΔBLEU | identical |",
            "|---|---|---|---|---|---|"]
  k_top = ks[-1]
  for regime in REGIMES:
    exact = get(regime, k_top)
    for name in APPROXIMATE:  # Those measured.
      r = get(regime, k_top, name)
      if r is None or exact is None:
        continue
      lines.append(f"| {regime} | {name} | {r['mean_block_size']:.2f} | "
                   f"{r['bleu']:.2f} | {r['bleu'] - exact['bleu']:+.2f} | "
                   f"{r['identical_to_own_greedy']:.0%} |")
  timed = sorted({r["regime"] for r in rows if r["speedup_b1"]})
  lines += ["", "## Wall clock (exact acceptance)", ""]
  if not timed:
    lines.append("Not timed in this run (`--timed=` named no regime).")
  else:
    lines += [
        f"Speedup over greedy decoding of the same model on "
        f"{report['timing_sentences']} test sentences, median of "
        f"{report['repeats']}; batch 1 = sentences one after another. "
        "Stern (both, one GPU): " + ", ".join(
            f"k={k} {s:.2f}x" for k, s in zip(K_VALUES, STERN_SPEEDUP))
        + ".", "",
        "| regime | batch | " + " | ".join(f"k={k}" for k in ks[1:])
        + " |", "|---|---|" + "---|" * len(ks[1:])]
  for regime in timed:
    for batch in (1, 8):
      lines.append(f"| {regime} | {batch} | " + " | ".join(
          _fmt(get(regime, k)[f"speedup_b{batch}"]) + "x" for k in ks[1:])
                   + " |")
  lines += ["", "## Examples (base model, greedy)", ""]
  for ex in report["examples"]:
    lines.append(f"- reference: {ex['reference']!r}  \n"
                 f"  greedy: {ex['base_greedy']!r}")
  return "\n".join(lines) + "\n"


def plot(report, path) -> None:
  """Left: block size against k beside Stern's rows. Right: BLEU against
  block size, exact decoding (k = 1..10) and the lossy rules at the
  largest k, with the target's corner shaded."""
  rows = report["rows"]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  markers = dict(zip(APPROXIMATE, "^vDsPXh*"))  # One per lossy rule.
  for i, regime in enumerate(REGIMES):
    mine = sorted((r["k"], r["mean_block_size"], r["bleu"]) for r in rows
                  if r["regime"] == regime and r["acceptance"] == "exact")
    color = f"C{i}"
    ax1.plot([m[0] for m in mine], [m[1] for m in mine], "o-", color=color,
             label=f"{regime} (ours)")
    ax1.plot(K_VALUES, STERN_BLOCK[regime], "x--", color=color, alpha=0.6,
             label=f"{regime} (Stern)")
    ax2.plot([m[1] for m in mine], [m[2] for m in mine], "o-", color=color,
             label=f"{regime}, exact")
    for r in rows:
      if r["regime"] == regime and r["acceptance"] in markers:
        ax2.plot(r["mean_block_size"], r["bleu"], markers[r["acceptance"]],
                 color=color, alpha=0.7, markersize=6)
  for name, marker in markers.items():  # One legend entry per rule.
    if any(r["acceptance"] == name for r in rows):
      ax2.plot([], [], marker, color="grey", label=name)
  t = report.get("target")
  if t:
    floor = t["regular_greedy_bleu"] - TARGET_BLEU_DROP
    top = max(r["bleu"] for r in rows) + 1.0
    ax2.fill_between([TARGET_BLOCK, TARGET_BLOCK + 1.0], floor, top,
                     color="C2", alpha=0.12,
                     label=f"target: both k = {t['k']}")
  ax1.set(xlabel="k (block size)", ylabel="mean accepted block size",
          title="Tokens per decoder call")
  ax2.set(xlabel="mean accepted block size", ylabel="BLEU (test catalogs)",
          title="BLEU against block size (exact: k = 1..10; lossy: "
                "largest k)")
  ax1.legend(fontsize=7, ncol=2)
  ax2.legend(fontsize=7, ncol=2, loc="upper center",
             bbox_to_anchor=(0.43, 1.0))  # Clear of the target's corner.
  fig.suptitle("Blockwise parallel decoding, gettext En-De "
               f"(preset {report['preset']})")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  f = flags.FLAGS
  unknown = sorted(set(f.approximate) - set(APPROXIMATE))
  if unknown:
    raise app.UsageError(f"--approximate {unknown} unknown; allowed: "
                         f"{sorted(APPROXIMATE)}.")
  try:
    overrides = overrides_flag(f.override)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  run_benchmark(f.preset, f.cache_dir, f.out, f.num_test, tuple(f.timed),
                f.timing_sentences, f.repeats, f.batch_size, f.only,
                tuple(f.approximate), overrides=overrides,
                head_type=f.head_type)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
