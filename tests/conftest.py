import gc
import os
import sys

import pytest

from tests import compile_flags

# Keep XLA to the two CI cores and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# XLA:CPU compiles dominate this suite: tests/compile_flags.py's flags cut
# them by half and change results only by float32 rounding. Set before jax
# is imported; subprocesses (sharding checks, README snippets, the
# notebook's kernel) inherit them.
os.environ["XLA_FLAGS"] = compile_flags.with_fast_compile(
    os.environ.get("XLA_FLAGS", ""))

# The same programs compile again and again across the suite (the same
# random architectures decode in many modules, caches are cleared between
# modules, below, and subprocesses start empty): XLA's persistent
# compilation cache, shared by the xdist workers and the subprocesses (they
# inherit the environment), serves the repeats from disk. Keyed by the
# program, jax version and flags, so a stale entry is never used; kept
# between runs under .pytest_cache (ignored by git).
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    _REPO, ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# `make test` runs the JAX tests in pytest-xdist workers that must never load
# torch (it adds thousands of memory mappings, see below, and nothing in
# them needs it). The torch tests (marker `torch`, file tests/test_hf.py) run
# in a process of their own; with BLOCKDEC_TESTS_WITHOUT_TORCH=1 a test that
# finds torch loaded fails and says so.
_WITHOUT_TORCH = os.environ.get("BLOCKDEC_TESTS_WITHOUT_TORCH") == "1"

# Every executable XLA:CPU compiles keeps a few memory mappings until JAX's
# caches drop it. A long-lived worker that compiled the whole suite reached
# 58,000 mappings, and one that crossed Linux's vm.max_map_count (65,530)
# aborted inside XLA's compiler ("Fatal Python error: Aborted"). So caches
# are cleared after every test module, and after any test that leaves the
# process above _MAX_MAPPINGS.
_MAPS = "/proc/self/maps"
_MAX_MAPPINGS = 30_000


def _mappings() -> int:
  try:
    with open(_MAPS, "rb") as f:
      return sum(1 for _ in f)
  except OSError:  # Not Linux: nothing to watch.
    return 0


def _clear_jax_caches():
  jax = sys.modules.get("jax")
  if jax is not None:
    jax.clear_caches()
  gc.collect()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  if _WITHOUT_TORCH and "torch" in sys.modules:
    pytest.fail(
        f"torch is loaded in this process before {item.nodeid}; tests that "
        "import torch belong under the `torch` marker and outside the "
        "xdist run (see the Makefile's test target)", pytrace=False)


def pytest_runtest_teardown(item, nextitem):
  if (nextitem is None or nextitem.module is not item.module
      or _mappings() > _MAX_MAPPINGS):
    _clear_jax_caches()
