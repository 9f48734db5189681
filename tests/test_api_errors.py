"""Bad input raises clear errors; repeated calls do not retrace."""

import re
import warnings

import jax
import numpy as np
import pytest

import blockdec
from blockdec import api
from tests.helpers import random_model


@pytest.fixture(scope="module")
def model():
  return random_model(0)


def _call(model, fn="blockwise", **kw):
  cfg, params = model
  args = dict(prompts=np.array([[1, 2, 3]]), prompt_lengths=np.array([3]),
              max_new_tokens=5)
  args.update(kw)
  params = args.pop("params", params)
  cfg = args.pop("cfg", cfg)
  f = blockdec.blockwise_decode if fn == "blockwise" else blockdec.greedy_decode
  return f(params, cfg, args.pop("prompts"), args.pop("prompt_lengths"), **args)


@pytest.mark.parametrize("fn", ["greedy", "blockwise"])
@pytest.mark.parametrize("kw,message", [
    (dict(prompt_lengths=np.array([0])), "empty prompt"),
    (dict(prompts=np.zeros((1, 0), np.int32), prompt_lengths=np.array([0])), "non-empty"),
    (dict(prompt_lengths=np.array([4])), "exceed the prompt width"),
    (dict(max_new_tokens=200), "exceeds max_seq_len=96"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(prompts=np.array([[1, 2, 999]])), "token id 999 outside the vocabulary"),
    (dict(prompts=np.array([[1, -1, 2]])), "token id -1"),
    (dict(prompt_lengths=np.array([3, 3])), "prompt_lengths must have shape"),
    (dict(eos_id=10_000), "eos_id=10000"),
])
def test_bad_inputs(model, fn, kw, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    _call(model, fn, **kw)


@pytest.mark.parametrize("k", [0, 9, -1])
def test_block_size_out_of_range(model, k):
  with pytest.raises(ValueError, match=re.escape(f"block_size={k}")):
    _call(model, block_size=k)


def test_min_block_larger_than_block(model):
  with pytest.raises(ValueError, match="exceeds block_size"):
    _call(model, block_size=2, acceptance=blockdec.MinBlock(3))


def test_padding_garbage_is_ignored(model):
  a = _call(model, prompts=np.array([[1, 2, 3, 0]]), prompt_lengths=np.array([3]))
  b = _call(model, prompts=np.array([[1, 2, 3, 12345]]), prompt_lengths=np.array([3]))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  # The compiled decode masks the padding of every kind of input: jax
  # arrays, lists, and tracers under the caller's own jit (whose values the
  # host checks cannot read).
  c = _call(model, prompts=jax.numpy.asarray([[1, 2, 3, 12345]]),
            prompt_lengths=jax.numpy.asarray([3]))
  d = _call(model, prompts=[[1, 2, 3, 12345]], prompt_lengths=[3])
  traced = jax.jit(lambda p, n: _call(model, prompts=p, prompt_lengths=n))
  e = traced(np.array([[1, 2, 3, 12345]]), np.array([3]))
  for other in (c, d, e):
    np.testing.assert_array_equal(a.tokens, other.tokens)


def test_non_integer_prompts_name_the_argument(model):
  with pytest.raises(TypeError, match="prompts must be an integer array"):
    _call(model, prompts=[[1.5, 2.0, 3.0]])
  with pytest.raises(TypeError, match="prompt_lengths must be an integer"):
    _call(model, prompt_lengths=np.array([3.0]))


def test_mismatched_params_and_config(model):
  cfg, params = model
  with pytest.raises(ValueError, match="params do not match the config"):
    _call(model, cfg=cfg.replace(num_prediction_heads=4))
  with pytest.raises(ValueError, match="has shape"):
    _call(model, cfg=cfg.replace(vocab_size=cfg.vocab_size + 1))
  with pytest.raises(ValueError, match="params do not match"):
    blockdec.forward_logits(params, cfg.replace(n_layers=cfg.n_layers + 1),
                            np.array([[1]]))


def test_no_retrace_on_same_shapes(model):
  cfg, params = model
  prompts, lengths = np.array([[1, 2, 3], [4, 5, 6]]), np.array([3, 1])
  kw = dict(max_new_tokens=7, block_size=3)
  blockdec.blockwise_decode(params, cfg, prompts, lengths, **kw)
  before = api._decode._cache_size()
  for seed in range(3):  # New values, same shapes: no new trace.
    p = np.random.RandomState(seed).randint(0, cfg.vocab_size, (2, 3))
    params2 = jax.tree_util.tree_map(lambda x: x * (1 + seed), params)
    blockdec.blockwise_decode(params2, cfg, p, lengths, **kw)
  assert api._decode._cache_size() == before


def test_host_weights_warn_once_placed_weights_do_not(model, tmp_path):
  cfg, params = model
  host = jax.tree.map(np.asarray, params)
  prompts, lengths = np.array([[1, 2, 3]]), np.array([3])
  with pytest.warns(blockdec.HostArraysWarning,
                    match=r"params: \d+ arrays .* jax.device_put") as caught:
    blockdec.greedy_decode(host, cfg, prompts, lengths, max_new_tokens=3)
  # The warning names the caller's line, not blockdec's internals.
  assert caught[0].filename == __file__
  with pytest.warns(blockdec.HostArraysWarning, match="DraftModel's weights"):
    blockdec.decode(params, cfg, prompts, lengths, 3,
                    method=blockdec.DraftModel(cfg, host, block_size=2))
  # A checkpoint loads onto the device: decoding it copies nothing per call.
  blockdec.save_checkpoint(tmp_path, cfg, host)
  _, loaded, _ = blockdec.load_checkpoint(tmp_path, with_tokenizer=False)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(loaded))
  with warnings.catch_warnings():
    warnings.simplefilter("error", blockdec.HostArraysWarning)
    out = blockdec.decode(loaded, cfg, prompts, lengths, 3,
                          method=blockdec.DraftModel(cfg, loaded, block_size=2))
  ref = blockdec.greedy_decode(params, cfg, prompts, lengths, max_new_tokens=3)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
