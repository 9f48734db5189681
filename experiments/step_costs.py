r"""What one verification call costs beside a greedy step, per model size.

Blockwise decoding pays off when verifying k tokens costs little more than
generating one. A call's cost is the weights it streams plus the work on
its tokens: while the weights sit in the last-level cache (the `make demo`
model's 17 MB) the work dominates and a k-token call costs several greedy
steps; past the cache, streaming the weights dominates and extra tokens are
nearly free, as on accelerators. This measures the ratio for the demo
architecture and larger ones (configs/base_lm.py:mid and a 149 MB one), at
batch 1 and 8, for chains of T = 1..16 fed tokens and the token trees the
drafters use. Costs depend on shapes only, so the weights are random.

Each call is the decoding loop's target call (`blockdec.calibration`): T
tokens at positions P..P+T-1 against a KV cache of the loop's length
(prompt P = 192, 128 new tokens), donated and written in place as in the
loop, causal for a chain and through the tree mask for a tree, head 1's
logits at every fed node. Medians of --repeats timed calls after a warm-up.
`blockdec.measure_call_costs` measures the same ratios for any model, as
the adaptive rule's `call_costs`.

Rows: {model, params_mb, batch, nodes, shape, ms_per_call, ratio} with
ratio = ms_per_call / the same model's and batch's one-token call.

Launch (from the repository root):

  python experiments/step_costs.py         # -> experiments/results/step_costs.{json,md,png}
  python experiments/step_costs.py --out experiments/results/step_costs_h200   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import pathlib

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import blockdec  # noqa: E402
from blockdec import calibration  # noqa: E402
from blockdec import metrics  # noqa: E402
from blockdec.decoding.lattice import DraftTree  # noqa: E402
from blockdec.kernels import masks  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
# name -> (d_model, n_layers, n_heads); byte vocabulary, 512 positions.
MODELS = {
    "demo (configs/base_lm.py:demo)": (256, 4, 4),
    "mid (configs/base_lm.py:mid)": (384, 6, 6),
    "large (d=512, 8 layers)": (512, 8, 8),
}
CHAINS = (1, 2, 4, 8, 12, 16)
TREES = ((2, 8), (4, 8))  # DraftTree(C, k): 1 + C (k - 1) nodes.
PROMPT, NEW = 192, 128


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batches", default="1,8")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--models", default=",".join(str(i) for i in range(len(MODELS))),
                 help="indices into the model list")
  p.add_argument("--out", default=str(RESULTS / "step_costs"))
  args = p.parse_args(argv)
  args.batches = [int(x) for x in args.batches.split(",") if x]
  args.models = [list(MODELS)[int(i)] for i in args.models.split(",") if i]
  return args


def time_call(params, cfg, batch, depths, mask, repeats) -> float:
  """Median milliseconds of one call feeding len(depths) nodes (the cache
  donated and written in place, as in the decoding loop)."""
  return calibration.time_call(params, cfg, batch, depths, mask,
                               prompt_len=PROMPT, cache_len=PROMPT + NEW + 32,
                               repeats=repeats)


def main(argv=None):
  args = parse_args(argv)
  load_before = os.getloadavg()[0]
  rows = []
  for name in args.models:
    d, layers, heads = MODELS[name]
    cfg, params = calibration.random_model(d, layers, heads)
    mb = sum(x.size * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(params)) / 2**20
    shapes = [(f"chain {t}", tuple(range(t)), None) for t in CHAINS]
    for c, k in TREES:
      tree = DraftTree(c, k)
      shapes.append((f"tree {c}x{k - 1}", tuple(int(x) for x in tree.depths),
                     masks.TreeMask(tree.parents)))
    for batch in args.batches:
      base = None
      for shape, depths, mask in shapes:
        ms = time_call(params, cfg, batch, depths, mask, args.repeats)
        base = ms if base is None else base
        row = {"model": name, "params_mb": round(mb, 1), "batch": batch,
               "nodes": len(depths), "shape": shape, "ms_per_call": ms,
               "ratio": ms / base}
        rows.append(row)
        print(f"  {name:32s} {mb:6.1f} MB batch {batch:2d} {shape:12s} "
              f"{ms:8.2f} ms  {row['ratio']:.2f}x", flush=True)
  result = {"prompt": PROMPT, "new_tokens": NEW, "repeats": args.repeats,
            "rows": rows}
  out = metrics.write_results(args.out, result, markdown,
                              script="experiments/step_costs.py", argv=argv,
                              load_before=load_before)
  plot(result, out.with_suffix(".png"))
  print(f"[step_costs] wrote {out}.json|md|png")
  return result


def markdown(result) -> str:
  lines = [
      "# Verification call cost beside a greedy step",
      "",
      f"Machine: {result['machine']}. Written by `{result['command']}`.",
      "",
      f"One target call of the decoding loop: the fed nodes at positions "
      f"{result['prompt']}.. against a KV cache of the loop's length, head "
      f"1's logits at every node; median of {result['repeats']} calls after "
      "a warm-up, random weights (costs depend on shapes only). ratio = the "
      "call's time over the same model's one-token call at the same batch: "
      "a drafter gains wall-clock only where its tokens per call exceed it.",
      "",
      "| model | weights (MB) | batch | fed nodes | shape | ms/call | ratio |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    lines.append(f"| {r['model']} | {r['params_mb']:.0f} | {r['batch']} | "
                 f"{r['nodes']} | {r['shape']} | {r['ms_per_call']:.2f} | "
                 f"{r['ratio']:.2f}x |")
  lines.append("")
  return "\n".join(lines)


def plot(result, path):
  rows = result["rows"]
  batches = sorted({r["batch"] for r in rows})
  fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.2),
                           squeeze=False)
  for ax, batch in zip(axes[0], batches):
    for model in dict.fromkeys(r["model"] for r in rows):
      at = [r for r in rows if r["model"] == model and r["batch"] == batch]
      chain = [r for r in at if r["shape"].startswith("chain")]
      line, = ax.plot([r["nodes"] for r in chain], [r["ratio"] for r in chain],
                      "o-", label=f"{model}, {at[0]['params_mb']:.0f} MB")
      trees = [r for r in at if r["shape"].startswith("tree")]
      ax.plot([r["nodes"] for r in trees], [r["ratio"] for r in trees], "s",
              color=line.get_color())
    ax.plot([1, 16], [1, 16], color="gray", ls=":", lw=1,
            label="cost = nodes (no gain possible)")
    ax.set_xlabel("fed nodes per call (squares: token trees)")
    ax.set_ylabel("call cost / one-token call")
    ax.set_title(f"batch {batch}")
    ax.legend(fontsize=7)
  fig.suptitle("What verifying T tokens costs beside a greedy step")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
