r"""A training step with XLA:CPU's library fusions limited to dots, or not.

`config.cpu_ynn_dots_only` (training/train.py `cpu_compiler_options`)
compiles the train step with XLA:CPU's YNNPACK fusions limited to dots.
This times, for each config, the Trainer's own pure step (`Trainer.step_fn`,
the first batch of its data, the initial state) compiled both ways in one
process: each round runs every config's two steps `--steps` times each,
alternating, so the machine's drift reaches both alike; the cell is the
median over `--repeats` rounds of the seconds per step. The first call
(compile plus one step) and the first step's loss of each are recorded too:
the two programs compute the same math up to float rounding.

Head and draft regimes need their base: it comes from the cache (`make demo`
leaves the demo base there) or is trained now. Only the step is timed, so
the base's weights do not matter.

Launch (from the repository root):

  python experiments/train_step.py   # -> experiments/results/train_step.{json,md}
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import tempfile
import time

import jax

from blockdec import metrics
from blockdec.training import losses, pipeline, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
CONFIGS = ("configs/base_lm.py:demo", "configs/draft_model.py:demo",
           "configs/heads_finetune.py:demo", "configs/block_diffusion.py:demo",
           "configs/eagle.py:demo", "configs/translation.py:cpu",
           "configs/heads_hydra.py:demo_distill", "configs/heads_frozen.py:demo")


def step_arg_parser(doc: str, configs, out: str) -> argparse.ArgumentParser:
  """The flags of a side-by-side train-step benchmark (this one and
  frozen_heads_step.py): configs, rounds, steps, corpus, cache, output."""
  p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
  p.add_argument("--configs", default=",".join(configs),
                 help="comma-separated config:preset specs")
  p.add_argument("--repeats", type=int, default=5, help="timed rounds")
  p.add_argument("--steps", type=int, default=2,
                 help="steps per config and variant in each round")
  p.add_argument("--corpus", default=None,
                 help="override config.data.corpus (LM configs; tests)")
  p.add_argument("--cache-dir", default=str(ROOT / "cache"),
                 help="where the bases of head and draft regimes are found "
                      "or trained")
  p.add_argument("--out", default=str(RESULTS / out))
  return p


def parse_step_args(p: argparse.ArgumentParser, argv=None):
  args = p.parse_args(argv)
  args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
  bad = [c for c in args.configs if c.count(":") != 1]
  if bad or not args.configs:
    p.error(f"--configs {bad or args.configs}: each must be "
            "'path/to/config.py:preset'")
  if args.repeats < 1 or args.steps < 1:
    p.error(f"--repeats={args.repeats} and --steps={args.steps} must be >= 1")
  return args


def parse_args(argv=None):
  return parse_step_args(step_arg_parser(__doc__, CONFIGS, "train_step"),
                         argv)


def interleaved_step_times(calls: dict, repeats: int, steps: int) -> dict:
  """{key: [seconds per step, one per round]} of calls {key: (step, state,
  batch)}: each of `repeats` rounds runs every call's step `steps` times,
  one call after another, so the machine's drift reaches all alike."""
  times = {key: [] for key in calls}
  for _ in range(repeats):
    for key, (fn, state, batch) in calls.items():
      t0 = time.perf_counter()
      for _ in range(steps):
        out = fn(state, batch)
      jax.block_until_ready(out)
      times[key].append((time.perf_counter() - t0) / steps)
  return times


def load(spec: str, corpus: str | None):
  path, preset = spec.split(":")
  config = pipeline.load_config(ROOT / path if not os.path.isabs(path)
                                else path, preset)
  config.progress = False
  if corpus is not None and config.data.get("kind", "lm") == "lm":
    config.data.corpus = corpus
    node = config.get("base")
    while node is not None:
      node.data.corpus = corpus
      node.progress = False
      node = node.get("base")
  return config


def trainer_for(config, cache_dir: str, workdir: pathlib.Path):
  """A Trainer of `config` in `workdir` (its base trained or reused from
  `cache_dir`, as pipeline.train_or_load would)."""
  init = None
  if config.regime != "base" and not config.init_from:
    base = pipeline.train_or_load(config.base, cache_dir, progress=False)
    init = (base.cfg, base.params, base.tokenizer)
  return train.Trainer(config, workdir, init=init)


def main(argv=None):
  args = parse_args(argv)
  dots = train.cpu_compiler_options("base", "on")
  if not dots:
    raise SystemExit(
        "train_step: the dots-only option applies to XLA:CPU on jaxlib "
        f"0.10 only; here backend={jax.default_backend()!r}, so both "
        "variants would compile alike.")
  load_before = os.getloadavg()[0]
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="train_step_"))
  steps = {}
  for i, spec in enumerate(args.configs):
    config = load(spec, args.corpus)
    trainer = trainer_for(config, args.cache_dir, scratch / str(i))
    state = trainer.initial_state
    batch = trainer._put_batch(trainer.batches.batch(0))  # pylint: disable=protected-access
    variants = {"xla_default": jax.jit(trainer.step_fn),
                "dots_only": jax.jit(trainer.step_fn, compiler_options=dots)}
    first, loss = {}, {}
    for name, fn in variants.items():
      t0 = time.perf_counter()
      _, m = fn(state, batch)
      loss[name] = float(jax.block_until_ready(m["loss"]))
      first[name] = time.perf_counter() - t0
    steps[spec] = (config, variants, state, batch, first, loss)
    print(f"  {spec}: compiled ({first['xla_default']:.1f} s / "
          f"{first['dots_only']:.1f} s)", flush=True)
  times = interleaved_step_times(
      {(spec, name): (fn, state, batch)
       for spec, (_, variants, state, batch, _, _) in steps.items()
       for name, fn in variants.items()}, args.repeats, args.steps)
  rows = []
  for spec, (config, _, _, _, first, loss) in steps.items():
    default = statistics.median(times[spec, "xla_default"])
    only = statistics.median(times[spec, "dots_only"])
    rows.append({
        "config": spec, "regime": config.regime,
        "trains": losses.REGIMES[config.regime]["trains"],
        "auto": bool(train.cpu_compiler_options(config.regime, "auto")),
        "xla_default_s": default, "dots_only_s": only,
        "speedup": default / only,
        "first_call_xla_default_s": first["xla_default"],
        "first_call_dots_only_s": first["dots_only"],
        "loss_xla_default": loss["xla_default"],
        "loss_dots_only": loss["dots_only"],
        "times_xla_default": times[spec, "xla_default"],
        "times_dots_only": times[spec, "dots_only"]})
    print(f"  {spec:40s} {config.regime:24s} {default:.3f} s -> "
          f"{only:.3f} s ({default / only:.2f}x)", flush=True)
  result = {"repeats": args.repeats, "steps": args.steps,
            "option": dots, "rows": rows}
  out = metrics.write_results(args.out, result, markdown,
                              script="experiments/train_step.py", argv=argv,
                              load_before=load_before)
  print(f"[train_step] wrote {out}.json|md")
  return result


def markdown(result) -> str:
  (key, value), = result["option"].items()
  lines = [
      "# The train step with XLA:CPU's library fusions limited to dots", "",
      f"Machine: {result['machine']}. Written by `{result['command']}`.", "",
      f"Each config's own train step (`Trainer.step_fn`, its first batch, "
      f"the initial state) compiled with XLA's defaults and with "
      f"`{key}={value}` (`config.cpu_ynn_dots_only`), timed in one process: "
      f"every round runs each config's two steps {result['steps']} times "
      f"each, alternating; seconds per step, median of {result['repeats']} "
      "rounds. auto: whether `cpu_ynn_dots_only=\"auto\"` (the default) "
      "turns the option on for the regime (on where the step "
      "backpropagates through a model, off for heads on a frozen trunk). "
      "first call: compile plus one step. The losses of the first step "
      "agree up to float rounding.", "",
      "| config | regime (trains) | auto | XLA default (s) | dots only (s) "
      "| speedup | first call (s) | first-step loss |",
      "|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(
        f"| {r['config']} | {r['regime']} ({r['trains']}) | "
        f"{'on' if r['auto'] else 'off'} | {r['xla_default_s']:.3f} | "
        f"{r['dots_only_s']:.3f} | **{r['speedup']:.2f}x** | "
        f"{r['first_call_xla_default_s']:.1f} / "
        f"{r['first_call_dots_only_s']:.1f} | "
        f"{r['loss_xla_default']:.6f} / {r['loss_dots_only']:.6f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
