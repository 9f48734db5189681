r"""How close blockdec's greedy step is to reading the model's weights once.

A greedy step at small batch multiplies one row per sequence by every weight
matrix, so on a CPU it cannot run faster than the machine streams those
bytes. This times, for a model shape, (1) blockdec's greedy step inside its
compiled loop: (a decode of 1 + N tokens minus a decode of 1) / N, random
weights, prompt P = 192; and (2) a floor: every weight matrix of the same
parameters (each array of two or more axes, flattened to [first axis,
rest]) multiplied by M rows in one chain, M = 1, 2, 4, 8, 16, inside a
`lax.fori_loop`, so there is no dispatch and nothing else. bytes / floor
time is the bandwidth the chain reaches; greedy step / floor at M = batch
says how much of a step is anything but the weight stream.

On the 2-core CPUs of this project the demo model's greedy step and the
M = 1 floor come out about equal: the loop runs at the memory bandwidth,
which bounds how far any implementation's greedy loop can get ahead of
another's on the same weights (`experiments/hf_peers.py`).

Launch (from the repository root):

  python experiments/greedy_floor.py   # -> experiments/results/greedy_floor.{json,md}
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import blockdec
from blockdec import calibration, metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
# name -> (d_model, n_layers, n_heads); byte vocabulary, 512 positions.
MODELS = {
    "demo (configs/base_lm.py:demo)": (256, 4, 4),
    "mid (configs/base_lm.py:mid)": (384, 6, 6),
}
ROWS = (1, 2, 4, 8, 16)
PROMPT, NEW, LOOPS = 192, 64, 32


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batches", default="1,8",
                 help="batch sizes of the greedy step (comma-separated)")
  p.add_argument("--repeats", type=int, default=7, help="timed repeats")
  p.add_argument("--models", default=",".join(MODELS),
                 help=f"comma-separated subset of {list(MODELS)}")
  p.add_argument("--out", default=str(RESULTS / "greedy_floor"))
  args = p.parse_args(argv)
  args.batches = [int(b) for b in args.batches.split(",")]
  args.models = [m.strip() for m in args.models.split(",") if m.strip()]
  unknown = [m for m in args.models if m not in MODELS]
  if unknown or not args.models:
    p.error(f"--models {unknown or args.models}: allowed {list(MODELS)}")
  if args.repeats < 1 or any(b < 1 for b in args.batches):
    p.error("--repeats and every --batches entry must be >= 1")
  return args


def median_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # Compile.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def weight_matrices(params) -> list[jax.Array]:
  """Every parameter array of two or more axes as [first axis, rest]."""
  return [x.reshape(x.shape[0], -1) for x in jax.tree_util.tree_leaves(params)
          if x.ndim >= 2]


@jax.jit
def _chain(mats, x0):
  """LOOPS passes of M rows through every matrix, each product feeding a
  scalar into the next, so the chain is serial and nothing is skipped."""
  def body(_, s):
    for w in mats:
      s = 1.0 + 1e-3 * jnp.mean((x0[:, :w.shape[0]] * s) @ w)
    return s
  return jax.lax.fori_loop(0, LOOPS, body, jnp.float32(1.0))


def floor_ms(mats, rows: int, repeats: int) -> float:
  width = max(w.shape[0] for w in mats)
  x0 = jnp.ones((rows, width), jnp.float32)
  return 1e3 * median_seconds(lambda: _chain(mats, x0), repeats) / LOOPS


def greedy_step_ms(params, cfg, batch: int, repeats: int) -> float:
  prompts = np.random.RandomState(0).randint(
      1, cfg.vocab_size, (batch, PROMPT)).astype(np.int32)
  lengths = np.full((batch,), PROMPT, np.int32)
  run = lambda n: lambda: blockdec.greedy_decode(
      params, cfg, prompts, lengths, max_new_tokens=n)
  one = median_seconds(run(1), repeats)
  many = median_seconds(run(1 + NEW), repeats)
  return 1e3 * (many - one) / NEW


def main(argv=None):
  args = parse_args(argv)
  load_before = os.getloadavg()[0]
  rows = []
  for name in args.models:
    cfg, params = calibration.random_model(*MODELS[name])
    params = jax.device_put(params)
    mats = weight_matrices(params)
    mb = sum(w.size * w.dtype.itemsize for w in mats) / 1e6
    floors = {m: floor_ms(mats, m, args.repeats) for m in ROWS}
    for m, ms in floors.items():
      rows.append({"model": name, "weights_mb": round(mb, 1),
                   "kind": "floor", "rows": m, "ms": ms,
                   "gb_per_s": mb / ms, "vs_floor_1": ms / floors[1]})
      print(f"  {name:32s} floor M={m:2d} {ms:7.3f} ms "
            f"({mb / ms:5.1f} GB/s)", flush=True)
    for batch in args.batches:
      ms = greedy_step_ms(params, cfg, batch, args.repeats)
      floor = floors.get(batch)
      rows.append({"model": name, "weights_mb": round(mb, 1),
                   "kind": "greedy step", "rows": batch, "ms": ms,
                   "gb_per_s": mb / ms, "vs_floor_1": ms / floors[1],
                   "vs_floor_same_rows": None if floor is None
                   else ms / floor})
      print(f"  {name:32s} greedy step batch {batch:2d} {ms:7.3f} ms",
            flush=True)
  result = {"prompt": PROMPT, "new_tokens": NEW, "repeats": args.repeats,
            "rows": rows}
  out = metrics.write_results(args.out, result, markdown,
                              script="experiments/greedy_floor.py",
                              argv=argv, load_before=load_before)
  print(f"[greedy_floor] wrote {out}.json|md")
  return result


def markdown(result) -> str:
  lines = [
      "# blockdec's greedy step beside the weight-streaming floor", "",
      f"Machine: {result['machine']}. Written by `{result['command']}`.", "",
      "floor: every weight matrix of the model (random weights, same "
      "shapes) multiplied by M rows in one serial chain inside a compiled "
      "loop, nothing else; greedy step: blockdec.greedy_decode's step in "
      f"its loop ((decode of 1 + {result['new_tokens']} tokens - decode of "
      f"1) / {result['new_tokens']}, prompt {result['prompt']}). GB/s: "
      "weight bytes / time. Medians of "
      f"{result['repeats']} timed calls.", "",
      "| model | weights (MB) | what | rows M / batch | ms | GB/s | "
      "x floor M=1 | x floor, same M |",
      "|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    same = r.get("vs_floor_same_rows")
    lines.append(
        f"| {r['model']} | {r['weights_mb']:.1f} | {r['kind']} | "
        f"{r['rows']} | {r['ms']:.3f} | {r['gb_per_s']:.1f} | "
        f"{r['vs_floor_1']:.2f}x | "
        + ("–" if same is None else f"{same:.2f}x") + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
