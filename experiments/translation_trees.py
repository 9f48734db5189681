r"""Token trees on a translation regime: tokens per call beside its k-block.

Run from the repository root, after experiments/stern_translation.py has
trained the regime (this script trains nothing)::

    python experiments/translation_trees.py        # cpu,both,hydra
    python experiments/translation_trees.py --regime=cpu,both \
        --out=/tmp/trees                           # Stern's heads

Decodes the held-out test pairs of configs/translation.py with the regime
model's greedy loop, its k-token block (`Blockwise(block_size=k)`, Stern's
method) and dynamic trees of growing size (`DynamicTree(nodes, top_k)`,
EAGLE-2's expansion over the same heads, depth k - 1). Every method is
exact, so each row checks its translations against greedy token for token
and carries the same BLEU. A tree verifies `nodes` tokens per call where
the block verifies k: the rows say what a wider call buys in tokens per
call, which is the currency of an accelerator, where a call of a few
hundred tokens costs about one step (not of this CPU:
experiments/step_costs.py).

Writes `<out>.json` ({"machine", "regime", "rows": [{method, nodes,
top_k, mean_block_size, bleu, identical_to_greedy, seconds}]}) and
`<out>.md` (default experiments/results/translation_trees_<regime>).
"""

from __future__ import annotations

import pathlib
import sys
import time

from absl import app, flags

import blockdec
from blockdec import metrics
from blockdec.training import pipeline

# The sibling script (loaded once; its Translator and configs are reused).
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import stern_translation as st  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# (nodes, top_k) of the dynamic trees measured.
TREES = ((64, 8), (128, 8), (256, 16))


def measure(regime: str = "cpu,both,hydra", cache_dir: str = "cache",
            num_test: int = 400, k: int = 8, trees=TREES,
            locale_dir: str = "", out=None) -> dict:
  """Rows for greedy, the k-block and each (nodes, top_k) tree on the first
  `num_test` test pairs; writes <out>.json|md when `out` is given."""
  preset = regime.split(",")[0]
  base_config = st.load_config(preset, locale_dir)
  run_config = st.load_config(regime, locale_dir)
  base = pipeline.cached_run(base_config, cache_dir)
  run = pipeline.cached_run(run_config, cache_dir)
  if not 2 <= k <= run.cfg.num_prediction_heads:
    raise ValueError(f"k={k}: allowed 2..{run.cfg.num_prediction_heads} "
                     f"(the heads of {regime}).")
  _, rows, translator = st.test_translator(base, base_config, num_test)
  translator.batch_size = min(64, len(rows))
  methods = [("greedy", 1, None, blockdec.Autoregressive()),
             (f"block k={k}", k, None, blockdec.Blockwise(block_size=k))]
  for nodes, top_k in trees:
    methods.append(("dynamic tree", nodes, top_k, blockdec.Blockwise(
        block_size=k, tree=blockdec.DynamicTree(nodes=nodes, top_k=top_k))))
  out_rows, greedy = [], None
  for name, nodes, top_k, method in methods:
    t0 = time.perf_counter()
    got = translator.measure(run, method, rows)
    seconds = time.perf_counter() - t0
    greedy = greedy or got
    row = {"method": name, "nodes": nodes, "top_k": top_k,
           "mean_block_size": got["mean_block_size"], "bleu": got["bleu"],
           "identical_to_greedy": st.identical(got, greedy),
           "seconds": seconds}
    out_rows.append(row)
    print(f"[{name} {nodes}] {row['mean_block_size']:.2f} tokens per call, "
          f"BLEU {row['bleu']:.2f}, identical {row['identical_to_greedy']}")
  base_bleu = translator.measure(base, blockdec.Autoregressive(),
                                 rows)["bleu"]
  report = {"machine": metrics.machine_description(), "regime": regime,
            "command": " ".join(sys.argv), "k": k,
            "test_pairs": int(len(rows)), "base_greedy_bleu": base_bleu,
            "rows": out_rows}
  if out:
    st.write_outputs(report, out, markdown)
  return report


def markdown(report) -> str:
  lines = [
      f"# Token trees on translation ({report['regime']})", "",
      f"Machine: {report['machine']}. Written by `{report['command']}`.", "",
      f"{report['test_pairs']} held-out test pairs (configs/translation.py). "
      "Every method is exact: `identical` checks its translations against "
      "the model's greedy ones token for token. Tokens per call = target "
      "tokens (EOS included) per decoder call; a call verifies `nodes` "
      f"tokens (the block: k = {report['k']}; trees: depth k - 1 below the "
      "decided token). seconds: one pass on this CPU, compilation "
      "included, not a timing. The base model's greedy BLEU: "
      f"{report['base_greedy_bleu']:.2f}.", "",
      "| method | nodes | top_k | tokens per call | BLEU | identical | "
      "seconds |", "|---|---|---|---|---|---|---|"]
  for r in report["rows"]:
    lines.append(f"| {r['method']} | {r['nodes']} | "
                 f"{r['top_k'] if r['top_k'] else '–'} | "
                 f"{r['mean_block_size']:.2f} | {r['bleu']:.2f} | "
                 f"{r['identical_to_greedy']} | {r['seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  f = flags.FLAGS
  out = f.out or str(ROOT / "experiments" / "results" /
                     ("translation_trees_" + f.regime.replace(",", "_")))
  measure(f.regime, f.cache_dir, f.num_test, f.k, out=out)


if __name__ == "__main__":
  flags.DEFINE_string("regime", "cpu,both,hydra",
                      "configs/translation.py argument of the regime model.")
  flags.DEFINE_string("cache_dir", "cache", "Cached training runs.")
  flags.DEFINE_integer("num_test", 400, "Test pairs (0 = all).")
  flags.DEFINE_integer("k", 8, "Block size; the trees' depth is k - 1.")
  flags.DEFINE_string("out", "", "Output prefix (default "
                      "experiments/results/translation_trees_<regime>).")
  app.run(main)
