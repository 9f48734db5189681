"""XLA flags for the test processes: compile fast, compute the same.

XLA:CPU compiles dominate this suite (tiny models; every decode loop shape
compiles anew). Measured on the 2-core CI machine, the two settings run
alternately on one test function with an empty compilation cache:

- no LLVM optimisation passes: about 40% less compile time;
- the older loop fusion emitters instead of the MLIR ones
  (`--xla_cpu_use_fusion_emitters=false`): a further 20-30% less
  (tests/test_drafters.py's exactness sweep 45-56 s against 61-68 s, the
  encoder-decoder sampling test 41-44 s against 56-63 s).

Neither changes what a program computes beyond float32 rounding, and every
test compares decodes compiled under the same flags. Imported by
tests/conftest.py before jax is imported, and by tests/sharding_checks.py
(its own process); subprocesses of the tests inherit the environment.
No jax import here.
"""

from importlib import metadata

# XLA aborts on a flag it does not know ("Unknown flag in XLA_FLAGS"), and
# the emitter switch is an XLA:CPU implementation detail that a later jaxlib
# may drop: it is set only for the jaxlib minor versions it was measured on.
_EMITTER_FLAG_JAXLIB = ((0, 10),)

FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0"
                      " --xla_llvm_disable_expensive_passes=true")
EMITTER_FLAG = "--xla_cpu_use_fusion_emitters=false"


def _jaxlib_minor() -> tuple[int, int] | None:
  try:
    major, minor = metadata.version("jaxlib").split(".")[:2]
    return int(major), int(minor)
  except (metadata.PackageNotFoundError, ValueError):
    return None


def with_fast_compile(flags: str) -> str:
  """`flags` (an XLA_FLAGS value) plus the fast-compile flags, unless it
  sets an optimisation level of its own."""
  if "xla_backend_optimization_level" in flags:
    return flags
  extra = FAST_COMPILE_FLAGS
  if _jaxlib_minor() in _EMITTER_FLAG_JAXLIB:
    extra += " " + EMITTER_FLAG
  return (flags + " " + extra).strip()
