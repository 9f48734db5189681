"""experiments/train_step.py: the train step compiled both ways, side by side."""

import json

import pytest

from blockdec.training import train
from tests.helpers import experiment_script
from tests.test_training_data import write_corpus


def test_rows_files_and_the_auto_column(tmp_path):
  module = experiment_script("train_step")
  if not train.cpu_compiler_options("base", "on"):
    with pytest.raises(SystemExit, match="jaxlib 0.10 only"):
      module.main([f"--out={tmp_path / 'ts'}"])
    return
  corpus = write_corpus(tmp_path / "corpus", n=400)  # 2% held out: ~8 files
  result = module.main([
      "--configs=configs/base_lm.py:tiny,configs/heads_frozen.py:tiny",
      "--repeats=1", "--steps=1", f"--corpus={corpus}",
      f"--cache-dir={tmp_path / 'cache'}", f"--out={tmp_path / 'ts'}"])
  rows = result["rows"]
  assert [(r["regime"], r["trains"], r["auto"]) for r in rows] == [
      ("base", "all", True), ("frozen", "heads", False)]
  for r in rows:
    assert r["xla_default_s"] > 0 and r["dots_only_s"] > 0
    assert r["speedup"] == pytest.approx(r["xla_default_s"] / r["dots_only_s"])
    assert r["loss_dots_only"] == pytest.approx(r["loss_xla_default"],
                                                rel=1e-5)
  assert json.loads((tmp_path / "ts.json").read_text())["rows"] == rows
  md = (tmp_path / "ts.md").read_text()
  assert md.startswith("# The train step") and "heads_frozen.py:tiny" in md


def test_flag_errors():
  module = experiment_script("train_step")
  for bad in (["--configs=configs/base_lm.py"], ["--repeats=0"],
              ["--steps=0"]):
    with pytest.raises(SystemExit):
      module.parse_args(bad)
