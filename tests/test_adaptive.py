"""Adaptive block sizes: exact output, and the size the rule picks.

The rule is checked on its own (the module docstring's worked example), on
an oracle scorer whose heads are always right but report chosen
confidences (so the verified length, and with it every accepted count, is
known in advance), and against greedy decoding on random models with
ragged prompts, several batch and block sizes, with and without EOS.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blockdec
from blockdec import decoding
from blockdec.decoding import AdaptiveBlockSize, DecodeOptions
from tests.helpers import (oracle_greedy, oracle_next, oracle_score_fn,
                           ragged_prompts, random_model)
from tests.test_exactness import check_against_greedy, _heads_copy_head_one

VOCAB = 50


def test_rule_on_the_worked_example():
  rule = AdaptiveBlockSize(token_cost=0.3)
  assert rule.candidate_sizes(4) == (1, 2, 4)
  assert rule.candidate_sizes(6) == (1, 2, 4, 6)
  assert AdaptiveBlockSize(sizes=(4, 2, 4)).candidate_sizes(8) == (2, 4)
  q = jnp.array([[1.0, 0.9, 0.5, 0.1]])
  active = jnp.array([True])
  assert int(rule.choose(q, active, 4)) == 1  # T = 2 (1.46 > 1.26 > 1.00).
  assert int(AdaptiveBlockSize(0.0).choose(q, active, 4)) == 2  # T = 4.
  assert int(AdaptiveBlockSize(100.0).choose(q, active, 4)) == 0  # T = 1.


def test_rule_with_measured_call_costs():
  q = jnp.array([[1.0, 0.9, 0.5, 0.1]])
  active = jnp.array([True])
  # The linear model's own costs as a table: the same choice (T = 2).
  linear = AdaptiveBlockSize(call_costs=((1, 1.0), (2, 1.3), (4, 1.9)))
  assert int(linear.choose(q, active, 4)) == 1
  # Nearly free extra tokens: 2.40 / 1.1 beats 1.90 / 1.05, so T = 4.
  flat = AdaptiveBlockSize(call_costs={4: 1.1, 1: 1.0, 2: 1.05})
  assert flat.call_costs == ((1, 1.0), (2, 1.05), (4, 1.1))
  assert int(flat.choose(q, active, 4)) == 2
  # A table need not be monotonic in T: 8 certain drafts at 2.0 beat
  # 4 at 3.0; the sizes are the table's up to the block size.
  bumpy = AdaptiveBlockSize(call_costs=((1, 1.0), (4, 3.0), (8, 2.0)))
  assert bumpy.candidate_sizes(8) == (1, 4, 8)
  assert bumpy.candidate_sizes(6) == (1, 4)
  assert int(bumpy.choose(jnp.ones((1, 8)), active, 8)) == 2
  assert bumpy.call_cost(4) == 3.0
  assert AdaptiveBlockSize(0.5).call_cost(3) == 2.0


def test_call_costs_errors():
  allowed = "allowed: \\(\\(T, cost\\), ...\\)"
  for bad in [((0, 1.0),), ((1, 0.0),), ((1, 1.0), (1, 2.0)), "cheap",
              ((1, float("nan")),), (), ((2.5, 1.0),), ((1, True),)]:
    with pytest.raises(ValueError, match=f"call_costs=.*; {allowed}"):
      AdaptiveBlockSize(call_costs=bad)
  with pytest.raises(ValueError, match=r"sizes \[8\] have no entry in "
                     r"call_costs"):
    AdaptiveBlockSize(sizes=(2, 8), call_costs=((1, 1.0), (2, 1.1)))
  with pytest.raises(ValueError, match="no size <= block_size=2"):
    AdaptiveBlockSize(call_costs=((4, 1.5),)).validate(2)
  with pytest.raises(ValueError, match="no entry for a call of 3 tokens"):
    AdaptiveBlockSize(call_costs=((4, 1.5),)).call_cost(3)


def test_measured_call_costs_drive_an_exact_decode():
  """measure_call_costs times real calls (values depend on the machine, so
  only their form is checked) and its table runs the adaptive rule; the
  output stays greedy's."""
  cfg, params = random_model(3)
  costs = blockdec.measure_call_costs(params, cfg, batch=2, sizes=(4, 1, 2),
                                      prompt_len=6, repeats=2)
  assert [t for t, _ in costs] == [1, 2, 4]
  assert costs[0][1] == 1.0
  assert all(np.isfinite(c) and c > 0 for _, c in costs)
  rule = AdaptiveBlockSize(call_costs=costs)
  prompts, lengths = ragged_prompts(4, 3, 5, cfg.vocab_size)
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=12)
  out = blockdec.blockwise_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=12, block_size=4,
                                  adaptive=rule)
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  with pytest.raises(ValueError, match="sizes=\\(0, 2\\) must be"):
    blockdec.measure_call_costs(params, cfg, sizes=(0, 2))
  with pytest.raises(ValueError, match="max_seq_len"):
    blockdec.measure_call_costs(params, cfg, prompt_len=cfg.max_seq_len)


def test_call_costs_are_ratios_within_rounds():
  """A machine that slows 3x between rounds (or within one) leaves the
  costs exact: each round's times are divided by the same round's
  one-token time, and the order alternates between rounds."""
  from blockdec import calibration
  log, speed = [], iter([1, 1, 1, 3, 3, 3, 1, 1, 1])

  def timer(name, cost):
    def once():
      log.append(name)
      return cost * next(speed)
    return once

  timers = {1: timer(1, 1.0), 2: timer(2, 1.7), 8: timer(8, 3.4)}
  ratios = calibration.interleaved_ratios(timers, 1, repeats=3)
  assert log == [1, 2, 8, 8, 2, 1, 1, 2, 8]
  assert ratios == pytest.approx({1: 1.0, 2: 1.7, 8: 3.4})


def test_measure_call_costs_of_an_encoder_decoder():
  cfg, params = random_model(1, encoder_layers=1)
  costs = blockdec.measure_call_costs(params, cfg, sizes=(1, 3),
                                      prompt_len=2, repeats=1)
  assert [t for t, _ in costs] == [1, 3] and costs[1][1] > 0


def test_forget_lets_an_early_failure_fade():
  """One early failure at depth 8 then only 8-token calls that pass: with
  every call counted alike the rule never verifies 11 again (depth 8 stays
  at survival 1/2 and E(11) / cost(11) = 9.5 / 2.05 < 8 / 1.7); keeping
  70% of the history per call, depth 8 drifts back towards certain and 11
  is tried again."""
  costs = ((8, 1.7), (11, 2.05))
  active = jnp.array([True])
  chosen = {}
  for forget in (1.0, 0.7):
    rule = AdaptiveBlockSize(call_costs=costs, forget=forget)
    carry = rule.init(1, 11)
    carry = rule.update(carry, jnp.array([7]), 11, active)  # Fails at 8.
    sizes = []
    for _ in range(6):
      q = rule.survival(carry, decoding.Draft(tokens=jnp.zeros((1, 1, 10))))
      t = rule.candidate_sizes(11)[int(rule.choose(q, active, 11))]
      sizes.append(t)
      carry = rule.update(carry, jnp.array([t - 1]), t, active)  # All pass.
    chosen[forget] = sizes
  assert chosen[1.0] == [8] * 6
  assert chosen[0.7][0] == 8 and 11 in chosen[0.7]
  # Inactive rows keep their counts.
  rule = AdaptiveBlockSize(forget=0.5)
  carry = rule.update(rule.init(2, 4), jnp.array([3, 3]), 4,
                      jnp.array([True, True]))
  carry = rule.update(carry, jnp.array([0, 0]), 1, jnp.array([True, False]))
  np.testing.assert_allclose(carry["tested"], [[0, .5, .5, .5], [0, 1, 1, 1]])


def test_rule_counts_only_active_rows():
  rule = AdaptiveBlockSize(token_cost=0.3)
  q = jnp.array([[1.0, 0.05, 0.05, 0.05], [1.0, 1.0, 1.0, 1.0]])
  assert int(rule.choose(q, jnp.array([True, True]), 4)) == 2  # T = 4.
  assert int(rule.choose(q, jnp.array([True, False]), 4)) == 0  # T = 1.


def _scale(confidence: float) -> float:
  """One-hot logit scale giving the hot token probability `confidence`."""
  return math.log(confidence * (VOCAB - 1) / (1 - confidence))


def confident_oracle(confidences):
  """Scorer: head 1 is the oracle model, heads 2..k always right, head j's
  drafts reported with probability confidences[j - 1]."""
  k = len(confidences)
  scales = jnp.array([_scale(c) if c < 1 else 30.0 for c in confidences])

  def score(params, tokens, positions, cache):
    del params
    preds, tok = [], tokens
    for j in range(k):
      tok = oracle_next(tok, positions + j, VOCAB)
      preds.append(tok)
    hot = jax.nn.one_hot(jnp.stack(preds, axis=2), VOCAB)  # [B, T, k, V]
    return hot * scales[None, None, :, None], cache

  return score


@pytest.mark.parametrize("token_cost,verified", [
    (0.3, 2),    # The worked example: T = 2 every call.
    (0.05, 4),   # Cheap tokens: all four.
    (100.0, 1),  # Expensive tokens: greedy calls.
])
def test_oracle_accepts_exactly_the_chosen_size(token_cost, verified):
  prompts = np.array([[5, 9, 1, 0], [7, 0, 0, 0], [3, 3, 0, 0]], np.int32)
  lengths = np.array([3, 1, 2], np.int32)
  n = 21
  options = DecodeOptions(
      max_new_tokens=n, block_size=4,
      adaptive=AdaptiveBlockSize(token_cost, estimate="confidence"))
  out = decoding.blockwise_decode(confident_oracle([1.0, 0.9, 0.5, 0.1]), None,
                                  jnp.asarray(prompts), jnp.asarray(lengths),
                                  jnp.zeros(()), options)
  np.testing.assert_array_equal(out.num_calls, math.ceil(n / verified))
  hist = np.asarray(out.accepted_hist)
  np.testing.assert_array_equal(hist[:, verified - 1], n // verified)
  for b in range(3):
    np.testing.assert_array_equal(
        out.tokens[b], oracle_greedy(prompts[b, :lengths[b]], n, VOCAB))


def test_history_tries_every_depth_then_settles():
  """Heads right for one token, wrong after: the first calls verify all 8
  (untried depths count as certain); once depth 2 has failed twice, every
  call verifies 2 tokens, and each call still accepts exactly 2."""
  seen = []

  def score(params, tokens, positions, cache):
    t = tokens.shape[1]
    jax.debug.callback(lambda: seen.append(t))
    return oracle_score_fn(VOCAB, 8, 1)(params, tokens, positions, cache)

  prompts = np.array([[5, 9, 1]], np.int32)
  n = 20
  options = DecodeOptions(max_new_tokens=n, block_size=8,
                          adaptive=AdaptiveBlockSize(0.3, sizes=(2, 8)))
  out = decoding.blockwise_decode(score, None, jnp.asarray(prompts),
                                  jnp.asarray([3]), jnp.zeros(()), options)
  assert seen == [3] + [8, 8] + [2] * 8  # Prefill, exploration, settled.
  np.testing.assert_array_equal(out.num_calls, [n // 2])
  np.testing.assert_array_equal(out.accepted_hist[0, 1], n // 2)
  np.testing.assert_array_equal(out.tokens[0],
                                oracle_greedy(prompts[0], n, VOCAB))


CASES = [  # (arch_seed, batch, block_size, max_prompt, max_new_tokens, rule)
    (0, 1, 2, 5, 14, AdaptiveBlockSize(0.3)),
    (2, 3, 4, 8, 20, AdaptiveBlockSize(0.05, sizes=(2, 4),
                                       estimate="confidence")),
    (5, 5, 6, 9, 19, AdaptiveBlockSize(0.3)),
    (7, 8, 8, 5, 25, AdaptiveBlockSize(0.1, sizes=(1, 3, 8))),
    (9, 2, 8, 6, 18, AdaptiveBlockSize(call_costs=((1, 1.0), (3, 1.2),
                                                   (8, 1.5)), forget=0.8)),
]


@pytest.mark.parametrize("arch,batch,k,p,n,rule", CASES)
@pytest.mark.parametrize("with_eos", [False, True])
def test_adaptive_exact_equals_greedy(arch, batch, k, p, n, rule, with_eos):
  # Model 0 keeps its random heads; the others get confident heads that are
  # often right, so the verified size varies from call to call.
  check_against_greedy(
      arch, batch, k, p, n, with_eos, 3, adaptive=rule,
      prepare=lambda seed, params: _heads_copy_head_one(params) if seed
      else params)


def test_adaptive_between_greedy_and_plain_blockwise():
  """Same tokens at every token cost; a huge cost makes every call a
  one-token call, a middle one mixes sizes (more calls than plain
  blockwise, fewer than greedy)."""
  cfg, params = random_model(2, param_seed=3)
  params = _heads_copy_head_one(params)
  prompts, lengths = ragged_prompts(3, 6, 6, cfg.vocab_size)
  plain = blockdec.blockwise_decode(params, cfg, prompts, lengths,
                                    max_new_tokens=40, block_size=8)
  calls = {}
  for cost in (0.03, 1e3):
    out = blockdec.blockwise_decode(
        params, cfg, prompts, lengths, max_new_tokens=40, block_size=8,
        adaptive=AdaptiveBlockSize(cost, sizes=(1, 2, 8),
                                   estimate="confidence"))
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    calls[cost] = np.asarray(out.num_calls)
  np.testing.assert_array_equal(calls[1e3], plain.lengths)
  assert np.asarray(plain.num_calls).sum() < calls[0.03].sum() < calls[1e3].sum()


def test_adaptive_errors():
  cfg, params = random_model(0)
  prompts, lengths = ragged_prompts(0, 2, 4, cfg.vocab_size)
  with pytest.raises(ValueError, match=r"sizes \[6\] exceed block_size=4"):
    blockdec.blockwise_decode(params, cfg, prompts, lengths, block_size=4,
                              adaptive=AdaptiveBlockSize(sizes=(2, 6)))
  with pytest.raises(TypeError, match="AdaptiveBlockSize"):
    blockdec.blockwise_decode(params, cfg, prompts, lengths, adaptive=0.3)
  with pytest.raises(ValueError, match="token_cost=-1"):
    AdaptiveBlockSize(token_cost=-1)
  with pytest.raises(ValueError, match="sizes=\\(0,\\)"):
    AdaptiveBlockSize(sizes=(0,))
  for bad in (0, 1.5):
    with pytest.raises(ValueError, match=f"forget={bad}"):
      AdaptiveBlockSize(forget=bad)
  with pytest.raises(ValueError, match="estimate='oracle'"):
    AdaptiveBlockSize(estimate="oracle")
