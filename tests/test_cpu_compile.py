"""blockdec/cpu_compile.py: decodes on XLA:CPU compile with its options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blockdec
from blockdec import api, calibration, cpu_compile
from tests.helpers import ragged_prompts, random_model


def _dot_hlo(fn: cpu_compile._Jit) -> str:
  x = jnp.ones((4, 256), jnp.float32)
  w = jnp.ones((256, 512), jnp.float32)
  return fn.lower(x, w).compile().as_text()


def test_tuned_compile_has_no_ynnpack_fusion_and_only_it():
  fn = cpu_compile.jit(lambda x, w: x @ w)
  plain = _dot_hlo(fn.plain)
  tuned = _dot_hlo(fn.tuned)
  assert cpu_compile.supported()
  assert "__ynn_fusion" not in tuned
  if "__ynn_fusion" not in plain:
    pytest.skip("this XLA:CPU hands no dot to YNNPACK by default")
  # The options stay with their own compile: a plain jit of the same
  # function after the tuned one still uses the library.
  assert "__ynn_fusion" in _dot_hlo(jax.jit(lambda x, w: x @ w))


@pytest.mark.parametrize("cpu_only", [True, False])
def test_on_cpu_and_pick(cpu_only, monkeypatch):
  # cpu_only False: a process that also has accelerators looks at every
  # array's devices.
  monkeypatch.setattr(cpu_compile, "_cpu_only", lambda: cpu_only)
  fn = cpu_compile.jit(lambda w: w + 1)
  w = jnp.ones((3,))
  assert cpu_compile.on_cpu({"a": w, "b": np.ones(2)})
  assert fn.pick(w) is fn.tuned

  seen = []

  @jax.jit
  def under_trace(w):
    seen.append(fn.pick(w) is fn.plain and not cpu_compile.on_cpu(w))
    return w

  under_trace(w)
  assert seen == [True]


def test_off_switch_and_unknown_options(monkeypatch):
  fn = cpu_compile.jit(lambda w: w + 1)
  w = jnp.ones((3,))
  monkeypatch.setattr(cpu_compile, "ENABLED", False)
  assert fn.pick(w) is fn.plain
  monkeypatch.setattr(cpu_compile, "ENABLED", True)
  # A jaxlib that no longer knows an option: plain compiles, no error.
  monkeypatch.setattr(cpu_compile, "DECODE_OPTIONS",
                      {"xla_cpu_no_such_option_anywhere": ""})
  cpu_compile.supported.cache_clear()
  try:
    assert not cpu_compile.supported()
    assert fn.pick(w) is fn.plain
    np.testing.assert_array_equal(fn(w), 2.0)
  finally:
    monkeypatch.undo()
    cpu_compile.supported.cache_clear()
  assert cpu_compile.supported()


@pytest.mark.parametrize("seed", [0, 1])
def test_decode_runs_the_tuned_compile_and_gives_the_same_tokens(
    seed, monkeypatch):
  cfg, params = random_model(seed)
  prompts, lengths = ragged_prompts(seed, 3, 7, cfg.vocab_size)
  methods = [blockdec.Autoregressive(), blockdec.Blockwise(block_size=4),
             blockdec.PromptLookup(ngram=2, block_size=3)]
  for method in methods:
    tuned = api._decode.tuned._cache_size()
    plain = api._decode.plain._cache_size()
    on = blockdec.decode(params, cfg, prompts, lengths, 12, method=method)
    assert api._decode.tuned._cache_size() == tuned + 1, method
    monkeypatch.setattr(cpu_compile, "ENABLED", False)
    off = blockdec.decode(params, cfg, prompts, lengths, 12, method=method)
    monkeypatch.setattr(cpu_compile, "ENABLED", True)
    assert api._decode.plain._cache_size() == plain + 1, method
    np.testing.assert_array_equal(on.tokens, off.tokens)
    np.testing.assert_array_equal(on.lengths, off.lengths)


def test_call_costs_are_timed_in_the_decodes_compile(monkeypatch):
  cfg, params = calibration.random_model(32, 1, 2, vocab_size=31,
                                         max_seq_len=64)
  before = calibration._calls.tuned._cache_size()
  calibration.call_timer(params, cfg, 1, range(3), prompt_len=8)
  assert calibration._calls.tuned._cache_size() == before + 1
  monkeypatch.setattr(cpu_compile, "ENABLED", False)
  before = calibration._calls.plain._cache_size()
  once = calibration.call_timer(params, cfg, 1, range(3), prompt_len=8)
  assert calibration._calls.plain._cache_size() == before + 1
  # The timer keeps the compile it was made with.
  monkeypatch.setattr(cpu_compile, "ENABLED", True)
  tuned = calibration._calls.tuned._cache_size()
  assert once() > 0
  assert calibration._calls.tuned._cache_size() == tuned


def test_a_callers_jit_over_concrete_weights_compiles_the_decode_itself():
  # The weights are concrete inside (closed over), but a nested jit may not
  # carry compiler options: the decode runs inside the caller's compile.
  cfg, params = random_model(4)
  prompts, lengths = ragged_prompts(4, 2, 5, cfg.vocab_size)
  method = blockdec.Blockwise(block_size=3)
  run = jax.jit(lambda p: blockdec.decode(params, cfg, p, lengths, 6,
                                          method=method).tokens)
  np.testing.assert_array_equal(
      run(prompts),
      blockdec.decode(params, cfg, prompts, lengths, 6, method=method).tokens)
