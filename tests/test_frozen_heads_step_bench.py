"""experiments/frozen_heads_step.py: heads on a frozen trunk, three steps."""

import json

import pytest

from tests.helpers import experiment_script
from tests.test_training_data import write_corpus


def test_rows_files_and_the_three_variants(tmp_path):
  module = experiment_script("frozen_heads_step")
  corpus = write_corpus(tmp_path / "corpus", n=400)
  result = module.main([
      "--configs=configs/heads_hydra.py:tiny_distill",
      "--repeats=1", "--steps=1", f"--corpus={corpus}",
      f"--cache-dir={tmp_path / 'cache'}", f"--out={tmp_path / 'fh'}"])
  (row,) = result["rows"]
  assert (row["regime"], row["head_type"]) == ("distill", "hydra")
  assert row["steps"] * row["batch_size"] > row["rows"]  # Rows revisited.
  for name in module.VARIANTS:
    assert row[f"{name}_s"] > 0
    assert row[f"loss_{name}"] == pytest.approx(row["loss_before"], rel=1e-5)
  assert row["speedup"] == pytest.approx(row["before_s"]
                                         / row["states+slots_s"])
  assert row["phase_before_s"] == pytest.approx(row["steps"]
                                                * row["before_s"])
  assert json.loads((tmp_path / "fh.json").read_text())["rows"] == [row]
  assert "tiny_distill" in (tmp_path / "fh.md").read_text()


def test_a_config_that_moves_the_trunk_is_refused(tmp_path):
  module = experiment_script("frozen_heads_step")
  corpus = write_corpus(tmp_path / "corpus", n=400)
  with pytest.raises(SystemExit, match="not heads or an EAGLE drafter"):
    module.main(["--configs=configs/heads_finetune.py:tiny", "--repeats=1",
                 f"--corpus={corpus}", f"--cache-dir={tmp_path / 'cache'}",
                 f"--out={tmp_path / 'fh'}"])
  for bad in (["--configs=configs/base_lm.py"], ["--repeats=0"]):
    with pytest.raises(SystemExit):
      module.parse_args(bad)
