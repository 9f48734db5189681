"""experiments/greedy_floor.py: the greedy step beside the weight floor."""

import json

import jax
import pytest

from blockdec import calibration
from tests.helpers import experiment_script


def _module():
  return experiment_script("greedy_floor")


def test_rows_files_and_the_weights_it_streams(tmp_path):
  module = _module()
  name = next(iter(module.MODELS))
  result = module.main([f"--models={name}", "--batches=1", "--repeats=1",
                        f"--out={tmp_path / 'gf'}"])
  rows = result["rows"]
  floors = [r for r in rows if r["kind"] == "floor"]
  steps = [r for r in rows if r["kind"] == "greedy step"]
  assert [r["rows"] for r in floors] == list(module.ROWS)
  assert [r["rows"] for r in steps] == [1]
  assert all(r["ms"] > 0 and r["gb_per_s"] > 0 for r in rows)
  assert floors[0]["vs_floor_1"] == 1.0
  assert steps[0]["vs_floor_same_rows"] == pytest.approx(
      steps[0]["ms"] / floors[0]["ms"])
  assert json.loads((tmp_path / "gf.json").read_text())["rows"] == rows
  md = (tmp_path / "gf.md").read_text()
  assert md.startswith("# blockdec's greedy step") and "greedy step" in md
  # The floor streams every weight array of two or more axes, whole.
  layers = module.MODELS[name][1]
  cfg, params = calibration.random_model(*module.MODELS[name])
  assert cfg.num_prediction_heads == 1 and cfg.n_layers == layers
  leaves = [x for x in jax.tree_util.tree_leaves(params) if x.ndim >= 2]
  mats = module.weight_matrices(params)
  assert len(mats) == len(leaves) > 4 * layers
  assert [m.size for m in mats] == [x.size for x in leaves]
  assert floors[0]["weights_mb"] == round(
      sum(x.size * 4 for x in leaves) / 1e6, 1)


def test_flag_errors():
  module = _module()
  with pytest.raises(SystemExit):
    module.parse_args(["--models=huge"])
  with pytest.raises(SystemExit):
    module.parse_args(["--repeats=0"])
