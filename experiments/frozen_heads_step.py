r"""The train step of heads on a frozen trunk: as it was, and as it is now.

Heads trained on a frozen trunk over distilled rows ("distill" regime: the
`make demo` Hydra heads, configs/heads_hydra.py:demo_distill; the EAGLE
drafter's "eagle_distill" alike) revisit each row several times, and the
trunk never changes, so the Trainer computes its states once
(`Trainer.frozen_trunk_features`) instead of in every step; and
Hydra heads run through slot tables built in the step
(`transformer.hydra_logits_from_slots`) when a batch has more positions
than the vocabulary. This times three steps of each config side by side
in one process, each the Trainer's own step function on its first batch
and initial state, compiled with the Trainer's options:

  before        the trunk in the step, Hydra heads through their own join
  states        the trunk's states from the batch, heads' own join
  states+slots  the trunk's states from the batch, Hydra slot tables
                (what the Trainer runs; for Stern heads and EAGLE the
                same as states)

Each round runs every variant `--steps` times, alternating, so the
machine's drift reaches all alike; cells are medians over `--repeats`
rounds. The first step's losses agree up to float rounding. The phase
estimate is the config's steps times the median step (plus computing the
states once, for the variants that read them): the training time a run
spends in steps.

Launch (from the repository root; the base comes from the cache, which
`make demo` fills, or is trained now):

  python experiments/frozen_heads_step.py   # -> experiments/results/frozen_heads_step.{json,md}
"""

from __future__ import annotations

import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax

from blockdec import metrics
from blockdec.training import losses, train

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
CONFIGS = ("configs/heads_hydra.py:demo_distill",
           "configs/heads_distill.py:demo", "configs/eagle.py:demo_distill")
VARIANTS = ("before", "states", "states+slots")


def parse_args(argv=None):
  return train_step.parse_step_args(train_step.step_arg_parser(
      __doc__, CONFIGS, "frozen_heads_step"), argv)


def variants_of(trainer):
  """{variant: (jitted step, batch)} for `trainer`, and the seconds its
  frozen trunk's states took to compute."""
  batch = trainer.batches.batch(0)  # Distilled rows made or read, states.
  t0 = time.perf_counter()  # The states alone, once more, timed.
  jax.block_until_ready(trainer.frozen_trunk_features(trainer.batches.tokens))
  states_s = time.perf_counter() - t0
  if "hidden" not in batch:
    raise SystemExit(
        f"frozen_heads_step: {trainer.config.name} ({trainer.regime}) does "
        "not reuse the trunk's states: it needs a regime that trains heads "
        "on a frozen trunk over distilled rows the steps revisit.")
  without = {k: v for k, v in batch.items() if k != "hidden"}
  options = train.cpu_compiler_options(
      trainer.regime, trainer.config.get("cpu_ynn_dots_only", "auto"))

  def step(hydra_slots):
    c = trainer.config
    fn = train.make_train_step(trainer.cfg, trainer.regime, trainer.optimizer,
                               trainer.schedule, trainer.first_head_weight,
                               seed=c.seed, eagle_cfg=c.get("eagle"),
                               hydra_slots=hydra_slots)
    return jax.jit(fn, compiler_options=options or None)

  put = trainer._put_batch  # pylint: disable=protected-access
  return {"before": (step(False), put(without)),
          "states": (step(False), put(batch)),
          "states+slots": (step(None), put(batch))}, states_s


def main(argv=None):
  args = parse_args(argv)
  load_before = os.getloadavg()[0]
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="frozen_heads_step_"))
  setups = {}
  for i, spec in enumerate(args.configs):
    config = train_step.load(spec, args.corpus)
    trainer = train_step.trainer_for(config, args.cache_dir, scratch / str(i))
    if losses.REGIMES[trainer.regime]["trains"] not in ("heads", "eagle"):
      raise SystemExit(f"frozen_heads_step: {spec} trains "
                       f"{losses.REGIMES[trainer.regime]['trains']!r}, not "
                       "heads or an EAGLE drafter on a frozen trunk.")
    fns, states_s = variants_of(trainer)
    state = trainer.initial_state
    loss = {}
    for name, (fn, batch) in fns.items():
      _, m = fn(state, batch)
      loss[name] = float(jax.block_until_ready(m["loss"]))
    setups[spec] = (trainer, fns, state, states_s, loss)
    print(f"  {spec}: compiled; states of {trainer.batches.tokens.shape[0]} "
          f"rows in {states_s:.1f} s", flush=True)
  times = train_step.interleaved_step_times(
      {(spec, name): (fn, state, batch)
       for spec, (_, fns, state, _, _) in setups.items()
       for name, (fn, batch) in fns.items()}, args.repeats, args.steps)
  rows = []
  for spec, (trainer, _, _, states_s, loss) in setups.items():
    median = {n: statistics.median(times[spec, n]) for n in VARIANTS}
    steps = trainer.config.steps
    phase = {n: steps * median[n] + (states_s if n != "before" else 0.0)
             for n in VARIANTS}
    rows.append({
        "config": spec, "regime": trainer.regime,
        "head_type": ("EAGLE drafter" if trainer.regime.startswith("eagle")
                      else trainer.cfg.head_type),
        "steps": steps, "batch_size": trainer.config.batch_size,
        "rows": int(trainer.batches.tokens.shape[0]),
        "states_once_s": states_s,
        **{f"{n}_s": median[n] for n in VARIANTS},
        **{f"phase_{n}_s": phase[n] for n in VARIANTS},
        "speedup": median["before"] / median["states+slots"],
        "phase_speedup": phase["before"] / phase["states+slots"],
        **{f"loss_{n}": loss[n] for n in VARIANTS},
        **{f"times_{n}": times[spec, n] for n in VARIANTS}})
    print(f"  {spec:40s} " + " / ".join(
        f"{n} {median[n]:.3f} s" for n in VARIANTS)
          + f" ({rows[-1]['speedup']:.2f}x)", flush=True)
  result = {"repeats": args.repeats, "steps": args.steps, "rows": rows}
  out = metrics.write_results(args.out, result, markdown,
                              script="experiments/frozen_heads_step.py",
                              argv=argv, load_before=load_before)
  print(f"[frozen_heads_step] wrote {out}.json|md")
  return result


def markdown(result) -> str:
  lines = [
      "# Heads on a frozen trunk: the train step as it was and as it is", "",
      f"Machine: {result['machine']}. Written by `{result['command']}`.", "",
      "Each config's step on its first batch and initial state, three ways "
      "(module doc): **before**, the trunk in every step and Hydra heads "
      "through their own join; **states**, the trunk's states computed once "
      "(`Trainer.frozen_trunk_features`) and read from the batch; "
      "**states+slots**, plus Hydra slot tables built in the step "
      "(`transformer.hydra_logits_from_slots`), which is what the Trainer "
      f"runs. Seconds per step, median of {result['repeats']} interleaved "
      f"rounds of {result['steps']} steps each. Phase: the config's steps x "
      "the median step, plus computing the states once where they are read. "
      "The first step's losses agree up to float rounding.", "",
      "| config | trains | steps x batch over rows | states once (s) "
      "| before (s) | states (s) | states+slots (s) | step speedup "
      "| phase: before -> now | first-step loss (before / now) |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(
        f"| {r['config']} | {r['head_type']} | {r['steps']} x "
        f"{r['batch_size']} over {r['rows']} | {r['states_once_s']:.1f} | "
        f"{r['before_s']:.3f} | {r['states_s']:.3f} | "
        f"{r['states+slots_s']:.3f} | **{r['speedup']:.2f}x** | "
        f"{r['phase_before_s'] / 60:.1f} -> "
        f"{r['phase_states+slots_s'] / 60:.1f} min "
        f"({r['phase_speedup']:.2f}x) | "
        f"{r['loss_before']:.6f} / {r['loss_states+slots']:.6f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
