"""notebooks/quickstart: the paired files agree, and the notebook runs.

The notebook is executed top to bottom in a Jupyter kernel of this
interpreter at its quick settings (BLOCKDEC_NOTEBOOK_QUICK=1: tiny presets,
trained into a temporary cache), so an API change that breaks it fails CI.
"""

from __future__ import annotations

import os
import pathlib

import pytest

jupytext = pytest.importorskip("jupytext", reason="needs the notebook extra")
nbclient = pytest.importorskip("nbclient", reason="needs the notebook extra")
pytest.importorskip("ipykernel", reason="needs the notebook extra")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
SOURCE = NOTEBOOKS / "quickstart.py"
NOTEBOOK = NOTEBOOKS / "quickstart.ipynb"


def _cells(nb) -> list[tuple[str, str]]:
  return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_ipynb_matches_jupytext_source():
  """The .ipynb is what `jupytext --sync notebooks/quickstart.py` makes."""
  from_py = jupytext.read(SOURCE)
  from_ipynb = jupytext.read(NOTEBOOK)
  code = lambda nb: [s for t, s in _cells(nb) if t == "code"]
  assert code(from_ipynb) == code(from_py), (
      "notebooks/quickstart.ipynb and quickstart.py differ in code cells; run "
      "`.venv/bin/jupytext --sync notebooks/quickstart.py`.")
  assert _cells(from_ipynb) == _cells(from_py), (
      "notebooks/quickstart.ipynb and quickstart.py differ in markdown cells; "
      "run `.venv/bin/jupytext --sync notebooks/quickstart.py`.")
  assert all(not c.get("outputs") for c in from_ipynb.cells), (
      "commit notebooks/quickstart.ipynb without outputs (jupytext --sync).")


def test_notebook_executes_at_quick_settings(tmp_path, monkeypatch):
  nb = jupytext.read(NOTEBOOK)
  # The kernel inherits this environment: quick presets, a fresh cache.
  monkeypatch.setenv("BLOCKDEC_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("BLOCKDEC_CACHE", str(tmp_path / "cache"))
  # "python3" is ipykernel's spec; jupyter_client starts it with
  # sys.executable, so the kernel sees this venv's packages.
  client = nbclient.NotebookClient(
      nb, kernel_name="python3", timeout=300,
      resources={"metadata": {"path": str(NOTEBOOKS.parent)}})
  client.execute()

  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.outputs if o.output_type == "stream")
  assert "identical to greedy: True" in outputs, outputs
  assert "tokens/s" in outputs and "block efficiency" in outputs, outputs
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert len(images) == 1, "the accepted-block-length histogram is missing."
  assert os.listdir(tmp_path / "cache"), "the notebook trained nothing."
