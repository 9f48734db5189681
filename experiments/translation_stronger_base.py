r"""Does a stronger model lengthen Stern's blocks? "both" over fine-tuning.

Run from the repository root::

    python experiments/translation_stronger_base.py     # cpu, Hydra heads
    python experiments/translation_stronger_base.py --head_type=stern \
        --out=/tmp/stronger

The cpu preset's 1,000-step base is undertrained: the fine-tuning regime
(all parameters, 800 more steps on the references) lifts its greedy BLEU by
several points. This study trains (or reuses) the regimes of
experiments/stern_translation.py and one more,
configs/translation.py:<preset>,both-over-fine-tuning,<head type>: Stern's
"both" (all parameters on distilled data) started from the fine-tuning run
and distilled from the fine-tuned model's greedy translations, where
"both" proper starts from the distillation run over the base. If the heads'
per-token hit rate is limited by the model's strength, this row's heads
agree with their model's greedy translation more often than "both"'s do.

For each of regular (the base with frozen heads: its greedy output is the
base's), fine-tuning, both and both-over-fine-tuning, on the held-out test
pairs: greedy BLEU; tokens per call at each k (exact acceptance, checked
token for token against the model's greedy translations); the lossy
minimum-block rules at the largest k with their BLEU; and the heads'
agreement with the model's own greedy translation, teacher-forced, on the
test sources and on training sources (stern_translation.head_agreement).

Writes `<out>.json` ({"machine", "rows": [{model, greedy_bleu, block,
lossy, agreement, agreement_train}], ...}) and `<out>.md` (default
experiments/results/translation_stronger_base_<head type>).
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags

import blockdec
from blockdec import metrics
from blockdec.training import pipeline

# The sibling script (loaded once; its Translator and configs are reused).
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import stern_translation as st  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
STUDY = "both-over-fine-tuning"
MODELS = ("regular", "fine-tuning", "both", STUDY)
LOSSY = ("minblock2", "minblock3")
AGREEMENT_HEADS = (2, 4, 8)  # The heads whose agreement the table shows.


def measure(preset: str = "cpu", cache_dir: str = "cache",
            head_type: str = "hydra", num_test: int = 400,
            locale_dir: str = "", out=None) -> dict:
  """The report (rows for MODELS); writes <out>.json|md when `out` is
  given. Trains whatever the cache lacks."""
  base, runs = st.train_all(preset, cache_dir, locale_dir,
                            head_type=head_type)
  runs[STUDY] = pipeline.train_or_load(
      st.load_config(f"{preset},{STUDY},{head_type}", locale_dir), cache_dir)
  cfg0 = st.load_config(preset, locale_dir)
  task, rows, translator = st.test_translator(base, cfg0, num_test)
  train_rows, train_translator = st.train_sample(task, base, cfg0, len(rows))
  k_max = runs["regular"].cfg.num_prediction_heads
  k_values = [k for k in st.K_VALUES if k <= k_max] or [k_max]
  report_rows = []
  for name in MODELS:
    run = runs[name]
    greedy = translator.measure(run, blockdec.Autoregressive(), rows)
    row = {"model": name, "run": run.workdir.name,
           "greedy_bleu": greedy["bleu"],
           "degenerate_share": greedy["degenerate_share"],
           "block": {}, "identical_to_greedy": True, "lossy": {}}
    for k in k_values:
      got = translator.measure(run, blockdec.Blockwise(block_size=k), rows)
      row["block"][str(k)] = got["mean_block_size"]
      row["identical_to_greedy"] &= st.identical(got, greedy)
    for rule in LOSSY:
      got = translator.measure(run, blockdec.Blockwise(
          block_size=k_values[-1], acceptance=st.APPROXIMATE[rule]), rows)
      row["lossy"][rule] = {"mean_block_size": got["mean_block_size"],
                            "bleu": got["bleu"]}
    row["agreement"] = st.head_agreement(translator, run, rows, k_max)
    row["agreement_train"] = st.head_agreement(train_translator, run,
                                               train_rows, k_max)
    print(f"[{name}] greedy BLEU {row['greedy_bleu']:.2f}, tokens per call "
          + ", ".join(f"k={k} {v:.2f}" for k, v in row["block"].items()),
          flush=True)
    report_rows.append(row)
  report = {"machine": metrics.machine_description(),
            "command": " ".join(sys.argv), "preset": preset,
            "head_type": head_type, "test_pairs": int(len(rows)),
            "train_sources": int(len(train_rows)),
            "k_values": k_values, "rows": report_rows}
  if out:
    st.write_outputs(report, out, markdown)
  return report


def markdown(report) -> str:
  ks = report["k_values"]
  heads = [j for j in AGREEMENT_HEADS if j <= max(ks)]
  lines = [
      f"# \"both\" over a stronger model ({report['preset']}, "
      f"{report['head_type']} heads)", "",
      f"Machine: {report['machine']}. Written by `{report['command']}`.", "",
      f"{report['test_pairs']} held-out test pairs. regular: the base with "
      "frozen heads (its greedy output is the base's); both: all parameters "
      "on the base's greedy translations, from the distillation run; "
      f"{STUDY}: the same from the fine-tuning run, on the fine-tuned "
      "model's greedy translations (configs/translation.py). Degenerate: "
      "the share of the model's greedy translations that loop "
      "(`blockdec.metrics`' rule; loops are easy to draft). Tokens per "
      "call with exact acceptance (identical: every block decode equals the "
      "model's greedy translations token for token); lossy rules at "
      f"k = {ks[-1]} with their BLEU. Agreement: head j's argmax against "
      "the model's own greedy token j - 1 places later, teacher-forced; "
      "from any position: the block a call starting there would accept "
      f"(test; {report['train_sources']} training sources after the slash).",
      "",
      "| model | greedy BLEU | degenerate | "
      + " | ".join(f"k={k}" for k in ks)
      + " | identical | " + " | ".join(LOSSY) + " | "
      + " | ".join(f"head {j}" for j in heads)
      + " | from any position |",
      "|---" * (5 + len(ks) + len(LOSSY) + len(heads)) + "|"]
  for r in report["rows"]:
    top1 = r["agreement"]["top1"]
    lines.append(
        f"| {r['model']} | {r['greedy_bleu']:.2f} | "
        f"{100 * r['degenerate_share']:.0f}% | "
        + " | ".join(f"{r['block'][str(k)]:.2f}" for k in ks)
        + f" | {r['identical_to_greedy']} | "
        + " | ".join(f"{r['lossy'][x]['mean_block_size']:.2f} / "
                     f"{r['lossy'][x]['bleu']:.2f}" for x in LOSSY) + " | "
        + " | ".join(f"{top1[j - 1]:.2f}" for j in heads)
        + f" | {r['agreement']['block_from_any_position']:.2f} / "
        f"{r['agreement_train']['block_from_any_position']:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  f = flags.FLAGS
  out = f.out or str(ROOT / "experiments" / "results" /
                     f"translation_stronger_base_{f.head_type}")
  measure(f.preset, f.cache_dir, f.head_type, f.num_test, out=out)


if __name__ == "__main__":
  flags.DEFINE_string("preset", "cpu", "configs/translation.py preset.")
  flags.DEFINE_string("cache_dir", "cache", "Folder of cached runs.")
  flags.DEFINE_enum("head_type", "hydra", ["stern", "hydra"],
                    "The regimes' proposal heads.")
  flags.DEFINE_integer("num_test", 400, "Test pairs (0 = all).")
  flags.DEFINE_string("out", "", "Output path without suffix (default "
                      "experiments/results/translation_stronger_base_"
                      "<head type>).")
  app.run(main)
