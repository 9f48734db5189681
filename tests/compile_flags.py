"""XLA flags for the test processes: compile fast, compute the same.

XLA:CPU compiles dominate this suite (tiny models; every decode loop shape
compiles anew). Measured on the 2-core CI machine, each pair run
alternately on one test module with an empty compilation cache:

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

FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0"
                      " --xla_llvm_disable_expensive_passes=true"
                      " --xla_cpu_use_fusion_emitters=false")


def with_fast_compile(flags: str) -> str:
  """`flags` (an XLA_FLAGS value) plus the fast-compile flags, unless it
  sets an optimisation level of its own."""
  if "xla_backend_optimization_level" in flags:
    return flags
  return (flags + " " + FAST_COMPILE_FLAGS).strip()
