"""Exact blockwise decoding equals greedy decoding, token for token.

Seeded sweep over random architectures, prompts, batch sizes 1..8 with ragged
lengths, block sizes 1..8, with and without EOS. Random heads rarely agree
with head 1, so the acceptance logic is also covered by the oracle tests; the
`_trained_heads` case below forces agreement by copying head 1 into the
proposal heads' path.
"""

import numpy as np
import pytest

import blockdec
from tests.helpers import (assert_same_or_near_tie, mid_way_eos,
                           ragged_prompts, random_model)

CASES = [  # (arch_seed, batch, block_size, max_prompt, max_new_tokens)
    (0, 1, 1, 5, 12), (1, 1, 2, 3, 17), (2, 2, 3, 8, 20), (3, 3, 4, 6, 15),
    (4, 4, 5, 4, 24), (5, 5, 6, 9, 19), (6, 6, 7, 7, 21), (7, 8, 8, 5, 25),
]
MODELS_PER_CASE = 4  # Same architecture (one compile), different weights.


@pytest.mark.parametrize("arch,batch,k,p,n", CASES)
@pytest.mark.parametrize("with_eos", [False, True])
def test_blockwise_exact_equals_greedy(arch, batch, k, p, n, with_eos):
  check_against_greedy(arch, batch, k, p, n, with_eos, MODELS_PER_CASE)


def check_against_greedy(arch, batch, k, p, n, with_eos, num_models,
                         prepare=None, model=None, **blockwise_kwargs):
  """`num_models` random weight sets of architecture `arch`: blockwise
  decoding (with `blockwise_kwargs`) equals greedy on ragged prompts.

  `prepare(seed, params)` may change a model's params (e.g. its heads);
  `model`: ModelConfig overrides (e.g. the heads' kind). Returns the
  accepted-length histogram summed over every run.
  """
  eos_id, hist = None, 0
  for seed in range(num_models):
    cfg, params = random_model(arch, param_seed=100 * arch + seed,
                               **(model or {}))
    if prepare is not None:
      params = prepare(seed, params)
    prompts, lengths = ragged_prompts(100 * arch + seed, batch, p,
                                      cfg.vocab_size)
    if with_eos and eos_id is None:
      eos_id = mid_way_eos(cfg, params, prompts, lengths, n)
    greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                    max_new_tokens=n, eos_id=eos_id)
    block = blockdec.blockwise_decode(params, cfg, prompts, lengths,
                                      max_new_tokens=n, block_size=k,
                                      eos_id=eos_id, **blockwise_kwargs)
    _check_pair(cfg, params, prompts, lengths, greedy, block, k, n, eos_id,
                eos_expected_in_row=batch // 2 if seed == 0 else None)
    hist = hist + np.asarray(block.accepted_hist).sum(0)
  return hist


def _check_pair(cfg, params, prompts, lengths, greedy, block, k, n, eos_id,
                eos_expected_in_row=None):
  assert_same_or_near_tie(cfg, params, prompts, lengths, greedy, block)
  np.testing.assert_array_equal(block.lengths, greedy.lengths)
  np.testing.assert_array_equal(greedy.num_calls, greedy.lengths)
  calls, lens = np.asarray(block.num_calls), np.asarray(block.lengths)
  assert np.all(np.ceil(lens / k) <= calls) and np.all(calls <= lens)
  np.testing.assert_array_equal(np.asarray(block.accepted_hist).sum(-1), calls)
  hist_tokens = (np.asarray(block.accepted_hist) * np.arange(1, k + 1)).sum(-1)
  np.testing.assert_array_equal(hist_tokens, lens)
  if eos_id is not None:
    batch = lens.shape[0]
    ends_with_eos = np.asarray(greedy.tokens)[np.arange(batch), lens - 1] == eos_id
    assert np.all(ends_with_eos | (lens == n))
    if eos_expected_in_row is not None:
      assert ends_with_eos[eos_expected_in_row]
      assert lens[eos_expected_in_row] <= n // 3 + 1


def _heads_copy_head_one(params):
  """Zero every proposal head's residual: head j then equals head 1's output.

  Head j predicts "the next token" at every position, so a draft agrees with
  greedy exactly when greedy repeats a token: acceptance then varies per row
  and per call, exercising ragged acceptance on a real model.
  """
  import jax
  heads = jax.tree_util.tree_map(np.zeros_like, params["proposal_heads"])
  # On the device once, as users are told to (HostArraysWarning).
  return jax.device_put({**params, "proposal_heads": heads})


def test_exact_with_often_agreeing_heads():
  accepted_more = 0
  for seed in range(6):
    cfg, params = random_model(2, param_seed=seed)
    params = _heads_copy_head_one(params)
    prompts, lengths = ragged_prompts(seed, 6, 6, cfg.vocab_size)
    greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                    max_new_tokens=40)
    block = blockdec.blockwise_decode(params, cfg, prompts, lengths,
                                      max_new_tokens=40, block_size=8)
    _check_pair(cfg, params, prompts, lengths, greedy, block, 8, 40, None)
    accepted_more += int(np.asarray(block.accepted_hist)[:, 1:].sum())
  # Random greedy output falls into repeats, so some calls accept > 1 token.
  assert accepted_more > 0


def test_block_size_one_is_greedy_call_for_call():
  cfg, params = random_model(3)
  prompts, lengths = ragged_prompts(3, 4, 5, cfg.vocab_size)
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths, max_new_tokens=20)
  block = blockdec.blockwise_decode(params, cfg, prompts, lengths,
                                    max_new_tokens=20, block_size=1)
  np.testing.assert_array_equal(block.tokens, greedy.tokens)
  np.testing.assert_array_equal(block.num_calls, greedy.num_calls)
