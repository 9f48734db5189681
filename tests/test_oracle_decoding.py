"""Decoding loops against oracle scorers with known acceptance behaviour."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdec import decoding
from blockdec.decoding import DecodeOptions, Exact
from tests.helpers import oracle_greedy, oracle_next, oracle_score_fn

VOCAB = 50


def _run(k, agree, n, prompts, lengths, eos_id=None, loop="blockwise"):
  score = oracle_score_fn(VOCAB, k, agree)
  options = DecodeOptions(max_new_tokens=n, block_size=k, acceptance=Exact(),
                          eos_id=eos_id)
  fn = decoding.blockwise_decode if loop == "blockwise" else decoding.greedy_decode
  return fn(score, None, jnp.asarray(prompts), jnp.asarray(lengths),
            jnp.zeros(()), options)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_heads_agreeing_for_j_tokens_accept_j_plus_one(k):
  prompts = np.array([[5, 9, 1, 0], [7, 0, 0, 0], [3, 3, 0, 0]], np.int32)
  lengths = np.array([3, 1, 2], np.int32)
  n = 23
  for agree in range(k):
    out = _run(k, agree, n, prompts, lengths)
    a = agree + 1
    np.testing.assert_array_equal(out.lengths, n)
    np.testing.assert_array_equal(out.num_calls, math.ceil(n / a))
    # Every call but the last accepts exactly a tokens; the last is cut by the budget.
    hist = np.asarray(out.accepted_hist)
    full = n // a
    for b in range(3):
      expected = np.zeros(k, np.int64)
      expected[a - 1] += full
      if n % a:
        expected[n % a - 1] += 1
      np.testing.assert_array_equal(hist[b], expected)
      want = oracle_greedy(prompts[b, :lengths[b]], n, VOCAB)
      np.testing.assert_array_equal(out.tokens[b], want)


def test_greedy_loop_matches_oracle_and_counts_calls():
  prompts = np.array([[1, 2, 3], [4, 0, 0]], np.int32)
  lengths = np.array([3, 1], np.int32)
  out = _run(4, 3, 10, prompts, lengths, loop="greedy")
  for b in range(2):
    np.testing.assert_array_equal(
        out.tokens[b], oracle_greedy(prompts[b, :lengths[b]], 10, VOCAB))
  np.testing.assert_array_equal(out.num_calls, out.lengths)


@pytest.mark.parametrize("loop", ["greedy", "blockwise"])
def test_eos_ends_row_and_is_counted(loop):
  prompts = np.array([[1, 2, 3], [4, 0, 0]], np.int32)
  lengths = np.array([3, 1], np.int32)
  n = 30
  row0 = oracle_greedy(prompts[0, :3], n, VOCAB)
  eos = row0[6]
  out = _run(4, 3, n, prompts, lengths, eos_id=eos, loop=loop)
  for b in range(2):
    want = oracle_greedy(prompts[b, :lengths[b]], n, VOCAB)
    end = want.index(eos) + 1 if eos in want else n
    assert int(out.lengths[b]) == end
    np.testing.assert_array_equal(out.tokens[b, :end], want[:end])
    np.testing.assert_array_equal(out.tokens[b, end:], 0)  # pad_id after the end
  if loop == "blockwise":
    assert int(out.num_calls[0]) == math.ceil(7 / 4)


def test_ragged_rows_advance_independently():
  """A row whose heads always agree is not held back by one whose never do."""
  prompts = np.array([[1], [2]], np.int32)
  lengths = np.array([1, 1], np.int32)
  fast = _run(8, 7, 40, prompts, lengths)
  assert np.all(np.asarray(fast.num_calls) == 5)


def test_top_k_and_min_block_accept_more():
  prompts = np.array([[1, 2]], np.int32)
  lengths = np.array([2], np.int32)
  # Heads are wrong from the second drafted token on; MinBlock(3) forces 3.
  score = oracle_score_fn(VOCAB, 4, 0)
  options = DecodeOptions(max_new_tokens=12, block_size=4,
                          acceptance=decoding.MinBlock(3))
  out = decoding.blockwise_decode(score, None, jnp.asarray(prompts),
                                  jnp.asarray(lengths), jnp.zeros(()), options)
  assert int(out.num_calls[0]) == 4
  assert np.asarray(out.accepted_hist)[0, 2] == 4


def test_acceptance_rules_match_semantics():
  logits = jnp.asarray([[[0.0, 3.0, 2.0, 1.0], [5.0, 4.0, 0.0, 0.0]]])  # [1, 2, 4]
  draft = jnp.asarray([[2, 1]])
  np.testing.assert_array_equal(decoding.Exact().matches(draft, logits), [[False, False]])
  np.testing.assert_array_equal(decoding.TopK(2).matches(draft, logits), [[True, True]])
  np.testing.assert_array_equal(decoding.TopK(1).matches(draft, logits), [[False, False]])
  np.testing.assert_array_equal(decoding.Distance(1).matches(draft, logits), [[True, True]])
  np.testing.assert_array_equal(decoding.MinBlock(2).matches(draft, logits), [[True, False]])
  np.testing.assert_array_equal(
      decoding.accepted_prefix_length(jnp.asarray([[True, True, False, True], [False, True, True, True]])),
      [3, 1])


@pytest.mark.parametrize("bad", [lambda: decoding.TopK(0), lambda: decoding.Distance(-1),
                                 lambda: decoding.MinBlock(0)])
def test_bad_acceptance_parameters(bad):
  with pytest.raises(ValueError):
    bad()


def _per_row_oracle(k):
  """Like `oracle_score_fn`, but row b's heads agree for cache[b] tokens.

  The "cache" is the [B] vector of agreement counts: a per-row leaf that the
  blockwise loop's row compaction must carry along with its row.
  """

  def score(params, tokens, positions, cache):
    del params
    preds, tok = [], tokens
    for j in range(k):
      tok = oracle_next(tok, positions + j, VOCAB)
      right = (j <= cache)[:, None]
      preds.append(jnp.where(right, tok, (tok + 1) % VOCAB))
    return 10.0 * jax.nn.one_hot(jnp.stack(preds, axis=2), VOCAB), cache

  return score


@pytest.mark.parametrize("eos_id", [None, 6])  # 6 ends rows 0, 2 and 3 early.
def test_row_compaction_keeps_every_row_exact(eos_id):
  """Rows finishing far apart (agreement 0..7, batch 5 -> 3 -> 2 -> 1 rows):
  compacted and uncompacted loops give the same tokens, calls and histograms,
  all equal to the oracle's greedy output."""
  k, n = 8, 29
  agree = np.array([0, 7, 2, 5, 1], np.int32)
  prompts = np.array([[5, 9, 1], [7, 0, 0], [3, 3, 0], [2, 8, 4], [6, 0, 0]],
                     np.int32)
  lengths = np.array([3, 1, 2, 3, 1], np.int32)
  outs = {}
  for compact in (False, True):
    options = DecodeOptions(max_new_tokens=n, block_size=k, eos_id=eos_id,
                            compact_rows=compact)
    outs[compact] = decoding.blockwise_decode(
        _per_row_oracle(k), None, jnp.asarray(prompts), jnp.asarray(lengths),
        jnp.asarray(agree), options)
  for field in ("tokens", "lengths", "num_calls", "accepted_hist"):
    np.testing.assert_array_equal(getattr(outs[True], field),
                                  getattr(outs[False], field), err_msg=field)
  out = outs[True]
  for b in range(5):
    want = oracle_greedy(prompts[b, :lengths[b]], n, VOCAB)
    if eos_id is not None and eos_id in want:
      want = want[:want.index(eos_id) + 1]
    length = len(want)
    assert int(out.lengths[b]) == length
    np.testing.assert_array_equal(out.tokens[b, :length], want)
    np.testing.assert_array_equal(out.tokens[b, length:], 0)
    if eos_id is None:
      assert int(out.num_calls[b]) == math.ceil(n / (agree[b] + 1))
  if eos_id is None:  # Rows really do finish at different calls.
    assert len(set(np.asarray(out.num_calls).tolist())) == 5
  else:
    np.testing.assert_array_equal(np.asarray(out.lengths) < n,
                                  [True, False, True, True, False])
