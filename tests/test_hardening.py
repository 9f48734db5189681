"""Hardening (issue 19): bad input gets a clear error naming the argument,
NumPy integer scalars are ints, non-finite weights are caught, damaged
checkpoints are named and survived, the CLI speaks UTF-8."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blockdec
from blockdec import sharding
from tests.helpers import random_model

PROMPTS, LENGTHS = np.array([[1, 2, 3]]), np.array([3])


@pytest.fixture(scope="module")
def model():
  return random_model(0)


def _raises(error, message):
  return pytest.raises(error, match=re.escape(message))


# ---------------------------------------------------------- decode arguments


@pytest.mark.parametrize("kw,error,message", [
    (dict(eos_id=2.5), TypeError, "eos_id=2.5 must be None or an integer"),
    (dict(eos_id="2"), TypeError, "eos_id='2'"),
    (dict(pad_id=None), TypeError, "pad_id=None must be an integer in [0, "),
    (dict(pad_id=-1), ValueError, "pad_id=-1"),
    (dict(max_new_tokens=8.0), TypeError, "max_new_tokens=8.0"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens=True"),
    (dict(prompt_lengths=np.array([2.7])), TypeError,
     "prompt_lengths must be an integer array"),
    (dict(prompts=np.array([[1.0, 2.0, 3.0]])), TypeError,
     "prompts must be an integer array"),
    (dict(compact_rows="yes"), TypeError, "compact_rows='yes'"),
    (dict(sampling=blockdec.Sampling()), ValueError, "PRNG key"),
    (dict(method=blockdec.Blockwise(1, adaptive=blockdec.AdaptiveBlockSize())),
     ValueError, "block_size=1 drafts none"),
    (dict(method=blockdec.Blockwise(2, acceptance="exact")), TypeError,
     "acceptance='exact'"),
    (dict(method="blockwise"), TypeError, "method='blockwise'"),
])
def test_decode_arguments_are_named(model, kw, error, message):
  cfg, params = model
  args = dict(prompts=PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=4)
  args.update(kw)
  with _raises(error, message):
    blockdec.decode(params, cfg, args.pop("prompts"), args.pop("prompt_lengths"),
                    args.pop("max_new_tokens"), **args)


def test_wrappers_name_their_arguments(model):
  cfg, params = model
  with _raises(ValueError, "block_size=1 drafts none"):
    blockdec.blockwise_decode(params, cfg, PROMPTS, LENGTHS, max_new_tokens=4,
                              block_size=1,
                              adaptive=blockdec.AdaptiveBlockSize())
  with _raises(TypeError, "block_size=2.0"):
    blockdec.blockwise_decode(params, cfg, PROMPTS, LENGTHS, block_size=2.0)
  with _raises(TypeError, "lattice_width='4'"):
    blockdec.refined_blockwise_decode(params, cfg, PROMPTS, LENGTHS,
                                      lattice_width="4")
  with _raises(TypeError, "cfg must be a blockdec.ModelConfig"):
    blockdec.greedy_decode(params, cfg.to_dict(), PROMPTS, LENGTHS)


def test_numpy_integer_scalars_are_ints(model):
  cfg, params = model
  want = blockdec.blockwise_decode(params, cfg, PROMPTS, LENGTHS,
                                   max_new_tokens=8, block_size=2, eos_id=5)
  got = blockdec.blockwise_decode(
      params, cfg, PROMPTS, LENGTHS, max_new_tokens=np.int64(8),
      block_size=np.int32(2), eos_id=np.int16(5), pad_id=np.uint8(0))
  np.testing.assert_array_equal(got.tokens, want.tokens)
  got = blockdec.refined_blockwise_decode(
      params, cfg, PROMPTS, LENGTHS, max_new_tokens=np.int64(8),
      block_size=np.int32(2), num_drafts=np.int64(1),
      lattice_width=np.int64(2))
  np.testing.assert_array_equal(got.tokens, want.tokens)


def test_numpy_scalars_in_specs_are_python_numbers():
  assert blockdec.TopK(np.int64(2)) == blockdec.TopK(2)
  assert type(blockdec.MinBlock(np.int32(2)).l) is int
  assert type(blockdec.Distance(np.int64(1)).eps) is int
  s = blockdec.Sampling(np.float32(0.5), np.int64(4), np.float64(0.9))
  assert s == blockdec.Sampling(0.5, 4, 0.9) and type(s.top_k) is int
  assert hash(s) == hash(blockdec.Sampling(0.5, 4, 0.9))
  a = blockdec.AdaptiveBlockSize(np.float32(0.5), sizes=(np.int64(2),))
  assert a == blockdec.AdaptiveBlockSize(0.5, sizes=(2,))
  assert blockdec.Typical(np.float32(0.5)).posterior_threshold == 0.5


@pytest.mark.parametrize("make,error,message", [
    (lambda: blockdec.MinBlock(2, base="x"), TypeError, "MinBlock base='x'"),
    (lambda: blockdec.MinBlock(0), ValueError, "MinBlock l=0"),
    (lambda: blockdec.TopK(2.0), TypeError, "TopK n=2.0"),
    (lambda: blockdec.Distance(-1), ValueError, "Distance eps=-1"),
    (lambda: blockdec.Sampling(top_k=2.5), TypeError, "Sampling top_k=2.5"),
    (lambda: blockdec.Sampling(top_p="0.9"), TypeError, "Sampling top_p='0.9'"),
    (lambda: blockdec.Sampling(float("nan")), ValueError,
     "Sampling temperature=nan"),
    (lambda: blockdec.Typical("0.1"), TypeError,
     "Typical posterior_threshold='0.1'"),
    (lambda: blockdec.AdaptiveBlockSize(token_cost="0.3"), TypeError,
     "AdaptiveBlockSize token_cost='0.3'"),
    (lambda: blockdec.AdaptiveBlockSize(sizes=(2.0,)), ValueError,
     "AdaptiveBlockSize sizes=(2.0,)"),
    (lambda: blockdec.NGramLM.build([np.arange(4)], order=2.0, vocab_size=8),
     TypeError, "order=2.0"),
    (lambda: sharding.ShardingConfig(rules=(("batch", "dat"),)), ValueError,
     "names the mesh axis 'dat'"),
    (lambda: sharding.ShardingConfig(rules=(("btch", "data"),)), ValueError,
     "names the logical axis 'btch'"),
])
def test_specs_name_bad_fields(make, error, message):
  with _raises(error, message):
    make()


def test_decode_with_a_mesh_checks_its_rules(model):
  cfg, params = model
  mesh = blockdec.make_mesh((1, 1))
  with _raises(ValueError, "names the mesh axis 'modle'"):
    blockdec.greedy_decode(params, cfg, PROMPTS, LENGTHS, max_new_tokens=2,
                           mesh=mesh, rules=(("heads", "modle"),))


# ------------------------------------------------------------ forward_logits


@pytest.mark.parametrize("tokens,error,message", [
    (np.zeros((0, 3), np.int32), ValueError, "tokens must be a non-empty"),
    (np.zeros((1, 0), np.int32), ValueError, "got shape (1, 0)"),
    (np.array([[1.5, 2.0]]), TypeError, "tokens must be an integer array"),
    (np.array([1, 2]), ValueError, "tokens must be a non-empty int array [B, T]"),
    (np.array([[1, 99]]), ValueError, "tokens holds token id 99"),
])
def test_forward_logits_arguments(model, tokens, error, message):
  cfg, params = model
  with _raises(error, message):
    blockdec.forward_logits(params, cfg, tokens)


# ------------------------------------------------------------ non-finite weights


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_named(model, bad):
  cfg, params = model
  broken = jax.tree_util.tree_map(lambda x: x, params)
  kernel = np.array(broken["layer_0"]["mlp"]["down"]["kernel"])
  kernel[0, 0] = bad
  broken["layer_0"]["mlp"]["down"]["kernel"] = jnp.asarray(kernel)
  message = "params['layer_0']['mlp']['down']['kernel'] holds 1 NaN or infinite"
  with _raises(ValueError, message):
    blockdec.blockwise_decode(broken, cfg, PROMPTS, LENGTHS, max_new_tokens=4)
  with _raises(ValueError, message):
    blockdec.forward_logits(broken, cfg, PROMPTS)
  with _raises(ValueError, message):
    blockdec.check_params(broken, cfg)


def test_finite_weights_are_checked_once_per_params_object(model, monkeypatch):
  from blockdec import api
  cfg, params = model
  params = jax.tree_util.tree_map(lambda x: x + 0, params)  # Fresh arrays.
  calls = []
  real = api._non_finite_counts
  monkeypatch.setattr(api, "_non_finite_counts",
                      lambda leaves: calls.append(1) or real(leaves))
  for _ in range(3):
    blockdec.check_params(params, cfg)
  assert len(calls) == 1
  blockdec.check_params(jax.tree_util.tree_map(lambda x: x + 0, params), cfg)
  assert len(calls) == 2


def test_checks_that_need_values_are_skipped_under_jit(model):
  """The documented caveat: under a caller's jax.jit, out-of-vocabulary ids
  pass unchecked (shapes and options are still checked)."""
  cfg, params = model
  fn = jax.jit(lambda p, t: blockdec.forward_logits(p, cfg, t))
  fn(params, np.array([[1, cfg.vocab_size + 5]]))  # No error: values unseen.
  with _raises(TypeError, "tokens must be an integer array"):
    fn(params, np.array([[1.0, 2.0]]))
