"""experiments/draft_model_budget.py: a draft-model decode split beside its
GEMM floor."""

import json

import pytest

from tests.helpers import experiment_script

pytestmark = pytest.mark.torch  # hf_peers' timing helpers import torch.


def _module():
  return experiment_script("draft_model_budget")


def test_split_adds_up_and_files(tmp_path):
  module = _module()
  m = module.main(["--model=tiny", "--repeats=1", "--num_prompts=2",
                   "--prompt_len=12", "--new_tokens=6", "--block_size=3",
                   f"--out={tmp_path / 'b'}"])
  rows = {r["part"].strip(): r for r in m["rows"]}
  pp = m["per_prompt_ms"]
  assert set(pp) == {"decode", "prefill", "fixed"}
  assert all(v > 0 for v in pp.values())
  assert rows["decode"]["ms"] == pp["decode"]
  loop = next(r for name, r in rows.items() if name.startswith("loop"))
  assert loop["ms"] == pytest.approx(pp["decode"] - pp["prefill"])
  calls = m["loop_calls_per_prompt"]
  assert calls > 0 and 1 <= m["tokens_per_call"] <= 3
  assert rows["per call"]["ms"] == pytest.approx(loop["ms"] / calls)
  assert rows["the rest"]["ms"] == pytest.approx(
      rows["per call"]["ms"] - m["call_ms"]["verify"]
      - m["call_ms"]["draft steps"])
  assert rows["the rest"]["floor_ms"] is None
  f = m["floor_ms"]
  assert all(v > 0 for v in f.values())
  assert rows["decode"]["floor_ms"] == pytest.approx(
      f["prefill"] + f["draft prompt"] + 3 * f["draft step"]
      + calls * (f["verify"] + 2 * f["draft step"]))
  assert json.loads((tmp_path / "b.json").read_text())["rows"] == m["rows"]
  md = (tmp_path / "b.md").read_text()
  assert md.startswith("# A draft-model decode's time beside its weight-GEMM")
  assert any(line.strip().startswith("|") and "the rest" in line
             and line.endswith("| – | – |") for line in md.splitlines())


def test_flag_errors():
  module = _module()
  for bad in (["--model=huge"], ["--block_size=1"], ["--repeats=0"],
              ["--prompt_len=4"]):
    with pytest.raises(SystemExit):
      module.parse_args(bad)
  with pytest.raises(ValueError, match="max_seq_len|positions"):
    module.main(["--model=tiny", "--prompt_len=500", "--new_tokens=64",
                 "--repeats=1"])
