"""XLA:CPU compiler options for decoding's compiled loops.

Decoding's calls feed 1 to about 17 tokens per row. By default XLA:CPU hands
each matrix product of two or more rows to the YNNPACK library and splits
Eigen's products over its thread pool; a decode whose weights live on the
CPU compiles with `DECODE_OPTIONS` instead: YNNPACK's fusions off (XLA's own
emitters and Eigen do the products) and Eigen on one thread. Which is faster
depends on the call's size: `experiments/cpu_compile_options.py` measures
both per call size and per decoding method, side by side in one process
(on the 2-core CPUs of this project, calls of 8 or more tokens ran faster
with the options and calls of 2 to 4 tokens slower; every decoding method
measured there ran as fast or faster).

The options reach the decodes' own compiles only (through
`jax.jit(..., compiler_options=...)`): the process's `XLA_FLAGS`, training
and every other jit keep XLA's defaults. They change which routine sums a
product, so logits can move in the last bits between a decode with and
without them; every decoding method is compiled the same way, so the
exactness of each method against the greedy loop is unchanged.

    fn = cpu_compile.jit(f, static_argnames=("cfg",))
    fn(params, x, cfg=cfg)   # compiled with DECODE_OPTIONS where params
                             # live on the CPU, with XLA's defaults elsewhere
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# DebugOptions fields, as `jax.jit(compiler_options=...)` takes them.
DECODE_OPTIONS = {
    # No XLA:CPU library fusion goes to YNNPACK (an empty list of kinds).
    "xla_cpu_experimental_ynn_fusion_type": "",
    # Eigen's products run on the calling thread.
    "xla_cpu_multi_thread_eigen": False,
}

# Whether decodes on XLA:CPU compile with DECODE_OPTIONS (tests and
# experiments/cpu_compile_options.py turn it off to compare).
ENABLED = True


def on_cpu(tree) -> bool:
  """Whether a jitted call on `tree`'s arrays runs on XLA:CPU: every
  jax.Array leaf lives on CPU devices, and host (numpy) leaves go to a CPU
  default backend. False under a caller's trace, whose own jit compiles
  the call."""
  leaves = jax.tree_util.tree_leaves(tree)
  if any(isinstance(x, jax.core.Tracer) for x in leaves):
    return False
  if _cpu_only():  # Nothing to look up per array.
    return True
  arrays = [x for x in leaves if isinstance(x, jax.Array)]
  if len(arrays) < len(leaves) and jax.default_backend() != "cpu":
    return False
  return all(d.platform == "cpu" for x in arrays for d in x.devices())


def _top_level(*trees) -> bool:
  """Whether no trace is active (a jit called here is a top-level one).

  A caller's jit may close over concrete arrays, so tracers among the
  arguments do not tell: JAX's trace state does. Where this jax has no
  such hook, tracers among `trees` are the test.
  """
  try:
    from jax._src import core as jax_core  # pylint: disable=g-import-not-at-top
    return bool(jax_core.trace_state_clean())
  except (ImportError, AttributeError):
    return not any(isinstance(x, jax.core.Tracer)
                   for x in jax.tree_util.tree_leaves(trees))


@functools.cache
def _cpu_only() -> bool:
  """Whether this process has XLA:CPU devices only (so every array is on
  the CPU)."""
  if jax.default_backend() != "cpu":
    return False
  for platform in ("gpu", "tpu"):
    try:
      jax.devices(platform)
    except RuntimeError:
      continue
    return False
  return True


@functools.cache
def supported() -> bool:
  """Whether this jaxlib compiles with DECODE_OPTIONS (XLA rejects option
  names it does not know, and these are XLA:CPU details a later jaxlib may
  rename); checked once per process on a one-op program."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=DECODE_OPTIONS).lower(
        jnp.zeros((), jnp.float32)).compile()
  except Exception:  # pylint: disable=broad-except
    return False
  return True


class _Jit:
  """`fn` jitted twice, with XLA's defaults and with DECODE_OPTIONS; a call
  runs the second where ENABLED, its first argument is `on_cpu` and this
  jaxlib takes the options (`supported`)."""

  def __init__(self, fn, **jit_kwargs):
    self.plain = jax.jit(fn, **jit_kwargs)
    self.tuned = jax.jit(fn, compiler_options=DECODE_OPTIONS, **jit_kwargs)

  def pick(self, weights, *args, **kwargs):
    """The jitted function a call on `weights` (and the call's other
    arguments) runs: the plain one under a caller's trace, where a nested
    jit may not carry compiler options."""
    if (ENABLED and _top_level(weights, args, kwargs) and on_cpu(weights)
        and supported()):
      return self.tuned
    return self.plain

  def __call__(self, weights, *args, **kwargs):
    return self.pick(weights, *args, **kwargs)(weights, *args, **kwargs)

  def lower(self, weights, *args, **kwargs):
    """The lowering a call with these arguments would compile."""
    return self.pick(weights, *args, **kwargs).lower(weights, *args, **kwargs)

  def _cache_size(self) -> int:
    """Compiled signatures held, both compiles together (as jax.jit's)."""
    return self.plain._cache_size() + self.tuned._cache_size()  # pylint: disable=protected-access


def jit(fn, **jit_kwargs) -> _Jit:
  """`jax.jit(fn, **jit_kwargs)` that compiles with DECODE_OPTIONS when its
  first argument (the weights) lives on the CPU and ENABLED is on."""
  return _Jit(fn, **jit_kwargs)
