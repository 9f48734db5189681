import os
import sys

import pytest

# Keep XLA to the two CI cores and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# `make test` runs the JAX tests in pytest-xdist workers that must never load
# torch: XLA's CPU compiler crashed sporadically in workers that had it
# loaded. The torch tests (marker `torch`, file tests/test_hf.py) run in a
# process of their own; with BLOCKDEC_TESTS_WITHOUT_TORCH=1 a test that finds
# torch loaded fails and says so, instead of a worker crashing later.
_WITHOUT_TORCH = os.environ.get("BLOCKDEC_TESTS_WITHOUT_TORCH") == "1"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  if _WITHOUT_TORCH and "torch" in sys.modules:
    pytest.fail(
        f"torch is loaded in this process before {item.nodeid}; tests that "
        "import torch belong under the `torch` marker and outside the "
        "xdist run (see the Makefile's test target)", pytrace=False)
