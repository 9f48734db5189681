"""Draft models and prompt lookup: exact under greedy, lossless with sampling.

Exactness: seeded sweeps over random architectures, ragged batches, block
sizes and EOS, every output compared token for token with the plain greedy
loop (rows compact as they finish, the default). The draft models are a
random model of another shape (rarely right), a noisy copy of the target
(often right) and the target itself (always right: ceil(n / k) calls).
Prompt lookup is checked against a brute-force Python lookup, and sweeps on
random models, whose greedy text loops, so its drafts do get accepted.
Lossless sampling: the chi-square test of tests/test_sampling.py against
the enumerated distribution, with a biased verifier rejected.
"""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import blockdec
from blockdec.decoding.drafters import lookahead, prompt_lookup
from tests.helpers import mid_way_eos, ragged_prompts, random_model
from tests.test_exactness import _check_pair
from tests.test_sampling import (_ResampleFromTarget, assert_lossless, _model,
                                 sampled_p_values)

CASES = [  # (arch_seed, batch, block_size, max_prompt, max_new_tokens, eos)
    (0, 1, 2, 5, 14, False), (2, 3, 4, 6, 20, True), (5, 5, 6, 9, 19, True),
    (7, 8, 3, 5, 25, False),
]
NUM_MODELS = 2  # Same architecture (one compile), different weights.


def _noisy_copy(params, seed, scale=0.3):
  """The target's weights times (1 + scale * noise): agrees often, not always."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [
      x * (1 + scale * jax.random.normal(k, x.shape))
      for x, k in zip(leaves, keys)])


def _methods(arch, k):
  """name -> make(cfg, params, seed) of every drafter method swept."""
  def other_shape(cfg, params, seed):
    dcfg, dparams = random_model(arch + 50, param_seed=seed, n_layers=1,
                                 vocab_size=cfg.vocab_size,
                                 num_prediction_heads=1)
    return blockdec.DraftModel(dcfg, dparams, block_size=k)

  return {
      "draft-other-shape": other_shape,
      "draft-noisy-copy": lambda cfg, params, seed: blockdec.DraftModel(
          cfg, _noisy_copy(params, seed), block_size=k),
      "prompt-lookup": lambda cfg, params, seed: blockdec.PromptLookup(
          ngram=2, block_size=k),
      "lookahead": lambda cfg, params, seed: blockdec.Lookahead(
          window=3, ngram=max(k, 2), guesses=3),
  }


def _sweep(arch, batch, k, p, n, with_eos, methods, compact=()):
  """Every method of `methods` on NUM_MODELS random models == the greedy
  loop (the methods named in `compact` with row compaction); returns
  {name: accepted histogram summed over the models}."""
  eos_id, totals = None, {name: 0 for name in methods}
  for seed in range(NUM_MODELS):
    cfg, params = random_model(arch, param_seed=100 * arch + seed)
    prompts, lengths = ragged_prompts(100 * arch + seed, batch, p,
                                      cfg.vocab_size)
    if with_eos and eos_id is None:
      eos_id = mid_way_eos(cfg, params, prompts, lengths, n)
    greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                    max_new_tokens=n, eos_id=eos_id)
    for name, make in methods.items():
      out = blockdec.decode(params, cfg, prompts, lengths, n,
                            method=make(cfg, params, seed), eos_id=eos_id,
                            compact_rows=name in compact)
      width = out.accepted_hist.shape[1]
      _check_pair(cfg, params, prompts, lengths, greedy, out, width, n,
                  eos_id, eos_expected_in_row=(batch // 2 if seed == 0
                                               and with_eos else None))
      totals[name] = totals[name] + np.asarray(out.accepted_hist).sum(0)
  return totals


@pytest.mark.parametrize("arch,batch,k,p,n,with_eos", CASES)
def test_drafters_exact_equal_greedy(arch, batch, k, p, n, with_eos):
  # Compaction (one compiled body per batch size) only where rows straggle.
  hists = _sweep(arch, batch, k, p, n, with_eos, _methods(arch, k),
                 compact=("draft-noisy-copy", "lookahead") if batch == 5
                 else ())
  # Drafts were accepted (random models' greedy text loops, so lookups and
  # pooled n-grams pay; the noisy copy agrees often) ...
  for name in ("draft-noisy-copy", "prompt-lookup", "lookahead"):
    assert hists[name][1:].sum() > 0, (name, hists[name])
  # ... and rejected.
  if k > 2:
    assert hists["draft-noisy-copy"][:-1].sum() > 0, hists


def test_draft_model_equal_to_target_accepts_every_draft():
  cfg, params = random_model(3)
  prompts, lengths = ragged_prompts(3, 4, 6, cfg.vocab_size)
  k, n = 5, 20
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=n)
  out = blockdec.decode(params, cfg, prompts, lengths, n,
                        method=blockdec.DraftModel(cfg, params, block_size=k),
                        compact_rows=False)
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  np.testing.assert_array_equal(out.num_calls, np.full(4, -(-n // k)))


@pytest.mark.parametrize("batch,speculative,n", [
    (1, False, 11), (3, False, 11), (3, True, 11), (3, True, 3)])
def test_no_drafting_round_after_the_last_call(monkeypatch, batch,
                                               speculative, n):
  """The drafter's update (a draft model's k draft steps) runs after every
  call but the last: once every row is done, its drafts would be thrown
  away. Output unchanged. With a speculative prefill the draft is the
  target itself, so the prefill commits k tokens (a call); with n <= k
  every row is done there and no update runs at all."""
  from blockdec.decoding.drafters import draft_model
  cfg, params = random_model(4)
  dcfg, dparams = (cfg, params) if speculative else _draft_for(cfg, seed=5)
  prompts, lengths = ragged_prompts(4, batch, 5, cfg.vocab_size)
  # n: shapes no other test compiles, so the patched update is traced.
  updates = []
  update = draft_model.DraftModelDrafter.update

  def counting_update(self, carry, view):
    jax.debug.callback(lambda: updates.append(1))
    return update(self, carry, view)

  monkeypatch.setattr(draft_model.DraftModelDrafter, "update",
                      counting_update)
  jax.clear_caches()
  out = blockdec.decode(params, cfg, prompts, lengths, n,
                        method=blockdec.DraftModel(
                            dcfg, dparams, block_size=3,
                            speculative_prefill=speculative),
                        compact_rows=False)
  jax.block_until_ready(out.tokens)
  jax.effects_barrier()
  calls = int(np.max(out.num_calls))
  assert calls >= 1 and len(updates) == calls - 1, (calls, len(updates))
  assert n > 3 or calls == 1
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=n)
  np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_adaptive_draft_length_stays_exact():
  k = 4
  _sweep(4, 3, k, 6, 24, True, {
      "prompt-lookup": lambda cfg, params, seed: blockdec.PromptLookup(
          ngram=2, block_size=k, adaptive=blockdec.AdaptiveBlockSize()),
      "prompt-lookup-min-match": lambda cfg, params, seed: (
          blockdec.PromptLookup(ngram=3, block_size=k, min_match=2,
                                adaptive=blockdec.AdaptiveBlockSize())),
      "draft": lambda cfg, params, seed: blockdec.DraftModel(
          cfg, _noisy_copy(params, seed), block_size=k,
          adaptive=blockdec.AdaptiveBlockSize(token_cost=0.2)),
      "draft-confidence": lambda cfg, params, seed: blockdec.DraftModel(
          cfg, _noisy_copy(params, seed), block_size=k,
          adaptive=blockdec.AdaptiveBlockSize(estimate="confidence",
                                              token_cost=0.2)),
      "draft-stop-below": lambda cfg, params, seed: blockdec.DraftModel(
          cfg, _noisy_copy(params, seed), block_size=k, stop_below=0.5,
          adaptive=blockdec.AdaptiveBlockSize(token_cost=0.2)),
      "draft-stop-below-no-rule": lambda cfg, params, seed: (
          blockdec.DraftModel(cfg, _noisy_copy(params, seed), block_size=k,
                              stop_below=0.5)),
      "draft-plain-prefill": lambda cfg, params, seed: blockdec.DraftModel(
          cfg, _noisy_copy(params, seed), block_size=k,
          speculative_prefill=False),
  }, compact=("prompt-lookup", "draft-stop-below"))


def test_prompt_lookup_min_match_proposes_only_long_matches():
  # Row 0 ends in "... 5 6 | 7" after "5 6 7 8" earlier: a 3-token match.
  # Row 1 ends in "... 9 | 7": only the 1-token match "7".
  prompts = jnp.asarray([[5, 6, 7, 8, 1, 5, 6], [2, 7, 8, 3, 4, 1, 9]],
                        jnp.int32)
  lengths = jnp.asarray([7, 7], jnp.int32)
  # The fields of `core.View` the drafter reads.
  view = types.SimpleNamespace(prompts=prompts, prompt_lengths=lengths,
                               generated=jnp.zeros((2, 4), jnp.int32),
                               lengths=jnp.zeros(2, jnp.int32),
                               next_token=jnp.asarray([7, 7], jnp.int32))
  for min_match, expected in ((1, [3, 3]), (2, [3, 0]), (3, [3, 0])):
    drafter = prompt_lookup.PromptLookupDrafter(3, 4, min_match)
    carry = drafter.init(view)
    draft = drafter.propose(carry, view)
    assert np.asarray(draft.length).tolist() == expected, min_match
    # The drafts are the continuations either way (fed without adaptive).
    assert np.asarray(draft.tokens)[:, 0].tolist() == [[8, 1, 5], [8, 3, 4]]


def _reference_lookup(text, ngram, num_drafts):
  """Brute force: the longest (<= ngram) suffix of `text` seen earlier, the
  latest such occurrence; its continuation, continued periodically."""
  end = len(text) - 1
  for n in range(min(ngram, len(text)), 0, -1):
    for e in range(end - 1, n - 2, -1):
      if text[e - n + 1:e + 1] == text[end - n + 1:]:
        period = end - e
        return [text[e + 1 + j % period] for j in range(num_drafts)], n
  return [text[-1]] * num_drafts, 0


_lookup = jax.jit(prompt_lookup.lookup, static_argnums=(2, 3))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), min_size=2, max_size=14),
                min_size=4, max_size=4),
       st.integers(1, 3), st.sampled_from([1, 3, 5]))
def test_lookup_matches_brute_force(texts, ngram, num_drafts):
  width = 14  # Fixed shapes: one compile per (ngram, num_drafts).
  # Split each text into a prompt, generated tokens and the next token.
  prompts = np.zeros((len(texts), width), np.int32)
  generated = np.full((len(texts), width), 7, np.int32)
  prompt_lengths, lengths, next_token = [], [], []
  for b, text in enumerate(texts):
    cut = max(1, len(text) // 2)
    prompts[b, :cut] = text[:cut]
    generated[b, :len(text) - 1 - cut] = text[cut:-1]
    prompt_lengths.append(cut)
    lengths.append(len(text) - 1 - cut)
    next_token.append(text[-1])
  seq, end = prompt_lookup.context_tokens(
      prompts, np.array(prompt_lengths), generated, np.array(lengths),
      np.array(next_token))
  drafts, matched = _lookup(seq, end, ngram, num_drafts)
  for b, text in enumerate(texts):
    want, n = _reference_lookup(text, ngram, num_drafts)
    assert int(matched[b]) == n, (text, ngram)
    assert np.asarray(drafts[b]).tolist() == want, (text, ngram)


def test_lookup_worked_example():
  # The module docstring's example: "a b c d a b" then "c", ngram = 2.
  seq = np.array([[0, 1, 2, 3, 0, 1, 2]], np.int32)
  drafts, matched = prompt_lookup.lookup(seq, np.array([6]), 2, 6)
  assert int(matched[0]) == 2
  assert np.asarray(drafts[0]).tolist() == [3, 0, 1, 2, 3, 0]


def _draft_for(cfg, seed=11, scale=0.7):
  """A draft model of another shape and the target's vocabulary."""
  dcfg, dparams = random_model(2, param_seed=seed, n_layers=1,
                               vocab_size=cfg.vocab_size,
                               num_prediction_heads=1, max_seq_len=16)
  return dcfg, jax.tree_util.tree_map(lambda x: x * scale, dparams)


@pytest.mark.parametrize("sampling,n,k,eos_id,speculative", [
    (blockdec.Sampling(temperature=1.0), 3, 4, None, True),
    (blockdec.Sampling(temperature=0.7, top_k=4, top_p=0.9), 4, 3, 2, True),
    (blockdec.Sampling(temperature=1.0), 4, 3, None, False),
])
def test_draft_model_sampling_matches_enumerated_distribution(
    sampling, n, k, eos_id, speculative):
  # n = 3 < k = 4: every draw but a rejection's is decided in the prefill.
  cfg, params = _model()
  dcfg, dparams = _draft_for(cfg)
  assert_lossless(cfg, params, n, sampling,
                  blockdec.DraftModel(dcfg, dparams, block_size=k,
                                      speculative_prefill=speculative),
                  eos_id)


def test_speculative_prefill_verifies_the_first_drafts(monkeypatch):
  """The prompts' call verifies k drafts: with the target as its own draft
  every row commits k tokens there (a call); with first drafts that are
  always wrong it is a plain prefill (no call), and the rest of the decode
  is the one without a speculative prefill, call for call. Greedy tokens
  throughout; the plain prefill path is swept against greedy too."""
  from blockdec.decoding.drafters import draft_model
  cfg, params = random_model(3)
  prompts, lengths = ragged_prompts(5, 3, 6, cfg.vocab_size)
  k, n = 4, 13
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=n)

  def decode(dparams, speculative):
    return blockdec.decode(params, cfg, prompts, lengths, n,
                           method=blockdec.DraftModel(
                               cfg, dparams, block_size=k,
                               speculative_prefill=speculative),
                           compact_rows=False)

  own = decode(params, True)
  np.testing.assert_array_equal(own.tokens, greedy.tokens)
  np.testing.assert_array_equal(own.accepted_hist[:, -1], -(-n // k) - 1)
  np.testing.assert_array_equal(own.num_calls, -(-n // k))
  noisy = _noisy_copy(params, 1)
  plain = decode(noisy, False)
  np.testing.assert_array_equal(plain.tokens, greedy.tokens)

  prefill_draft = draft_model.DraftModelDrafter.prefill_draft

  def wrong_first_drafts(self, view):
    carry, draft = prefill_draft(self, view)
    first = jnp.asarray(greedy.tokens)[:, :1]  # The target's first token.
    tokens = draft.tokens.at[:, 0, :1].set((first + 1) % cfg.vocab_size)
    return carry, draft.replace(tokens=tokens)

  monkeypatch.setattr(draft_model.DraftModelDrafter, "prefill_draft",
                      wrong_first_drafts)
  jax.clear_caches()
  wrong = decode(noisy, True)
  np.testing.assert_array_equal(wrong.tokens, greedy.tokens)
  np.testing.assert_array_equal(wrong.num_calls, plain.num_calls)
  np.testing.assert_array_equal(wrong.accepted_hist, plain.accepted_hist)


def test_draft_model_confidence_rule_sampling_is_lossless():
  # The adaptive rule reading the draft's own probabilities picks how many
  # drafts each call verifies: a choice made before the target is consulted,
  # so the output stays distributed as the target's samples.
  cfg, params = _model()
  dcfg, dparams = _draft_for(cfg)
  sampling = blockdec.Sampling(temperature=1.0)
  method = blockdec.DraftModel(dcfg, dparams, block_size=4,
                               adaptive=blockdec.AdaptiveBlockSize(
                                   estimate="confidence", token_cost=0.1))
  assert_lossless(cfg, params, 4, sampling, method)
  # The rule verified fewer than all 3 drafts in some calls: with the same
  # key, the rows' call counts differ from verifying every draft.
  _, ruled = sampled_p_values(cfg, params, 4, sampling, method)
  _, plain = sampled_p_values(cfg, params, 4, sampling, dataclasses.replace(
      method, adaptive=None))
  assert not np.array_equal(ruled.num_calls, plain.num_calls)


def _draft_steps(monkeypatch, decode):
  """(draft-model steps, one per drafted token, that `decode()` takes; its
  output; its rounds of drafting: init and every update but the last).
  Caches are cleared so the counting step is traced."""
  from blockdec.decoding.drafters import draft_model
  steps = []
  choose = draft_model.DraftModelDrafter._choose

  def counting_choose(self, logits, view, depth):
    jax.debug.callback(lambda: steps.append(1))
    return choose(self, logits, view, depth)

  monkeypatch.setattr(draft_model.DraftModelDrafter, "_choose",
                      counting_choose)
  jax.clear_caches()
  out = decode()
  jax.block_until_ready(out.tokens)
  jax.effects_barrier()
  monkeypatch.undo()
  return len(steps), out, int(np.max(out.num_calls))


@pytest.mark.parametrize("adaptive", [None, blockdec.AdaptiveBlockSize(
    estimate="confidence", token_cost=0.1)])
def test_draft_model_early_exit_sampling_is_lossless(monkeypatch, adaptive):
  # A row's draft ends at its first token below stop_below; the slots no
  # draft step reached hold token 0 with q = one-hot(0) (verified without
  # the rule), a deterministic draft the verifier handles losslessly.
  cfg, params = _model()
  dcfg, dparams = _draft_for(cfg)
  sampling = blockdec.Sampling(temperature=1.0)
  k = 4
  method = blockdec.DraftModel(dcfg, dparams, block_size=k, stop_below=0.4,
                               adaptive=adaptive)
  assert_lossless(cfg, params, 4, sampling, method)
  # Such slots exist here: some drafting rounds end before k - 1 steps.
  prompts, lengths = ragged_prompts(1, 1, 3, cfg.vocab_size)
  steps, _, rounds = _draft_steps(monkeypatch, lambda: blockdec.decode(
      params, cfg, prompts, lengths, 9, method=method, sampling=sampling,
      key=jax.random.key(3), compact_rows=False))
  assert rounds <= steps < rounds * (k - 1), (rounds, steps)


def test_draft_model_early_exit_drafts_fewer_steps(monkeypatch):
  """With stop_below the draft steps end once every row's draft has hit a
  token below it: fewer draft-model calls than k - 1 per round, same
  output as greedy. (Without the speculative prefill, whose first round
  drafts k tokens.)"""
  cfg, params = random_model(4)
  dcfg, dparams = _draft_for(cfg, seed=5, scale=0.3)  # A flat, unsure draft.
  prompts, lengths = ragged_prompts(4, 2, 5, cfg.vocab_size)
  n, k = 10, 6
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=n)
  for stop in (None, 0.9):
    steps, out, rounds = _draft_steps(monkeypatch, lambda: blockdec.decode(
        params, cfg, prompts, lengths, n, compact_rows=False,
        method=blockdec.DraftModel(dcfg, dparams, block_size=k,
                                   stop_below=stop,
                                   speculative_prefill=False)))
    if stop is None:
      assert steps == rounds * (k - 1)
    else:
      assert rounds <= steps < rounds * (k - 1), (rounds, steps)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_prompt_lookup_sampling_matches_enumerated_distribution():
  cfg, params = _model(seed=4)
  assert_lossless(cfg, params, 4, blockdec.Sampling(temperature=0.8),
                  blockdec.PromptLookup(ngram=1, block_size=3), eos_id=3)


def test_biased_verifier_is_caught_with_a_draft_model():
  cfg, params = _model()
  dcfg, dparams = _draft_for(cfg)
  p_values, _ = sampled_p_values(
      cfg, params, 3, blockdec.Sampling(temperature=1.0),
      blockdec.DraftModel(dcfg, dparams, block_size=4,
                          acceptance=_ResampleFromTarget()))
  assert min(p_values) < 1e-6, p_values


@pytest.mark.parametrize("speculative", [True, False])
def test_draft_model_without_drafts_is_greedy(speculative):
  """block_size=1 drafts nothing after the root, with or without the
  speculative prefill: every call commits the one token greedy would."""
  cfg, params = random_model(6)
  prompts, lengths = ragged_prompts(6, 3, 5, cfg.vocab_size)
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=7)
  out = blockdec.decode(params, cfg, prompts, lengths, 7,
                        method=blockdec.DraftModel(
                            cfg, params, block_size=1,
                            speculative_prefill=speculative))
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  np.testing.assert_array_equal(out.num_calls, out.lengths)


def test_speculative_prefill_needs_a_chain_without_prompt_features(
    monkeypatch):
  """A drafter that drafts at the prefill cannot also read the trunk's
  hidden states at the prompt (the prefill computes them at the verified
  nodes only): a clear error, not a wrong draft."""
  from blockdec.decoding.drafters import draft_model
  monkeypatch.setattr(draft_model.DraftModelDrafter, "prompt_features",
                      property(lambda self: True))
  jax.clear_caches()
  cfg, params = random_model(3)
  prompts, lengths = ragged_prompts(3, 2, 5, cfg.vocab_size)
  with pytest.raises(ValueError, match="speculative prefill"):
    blockdec.decode(params, cfg, prompts, lengths, 6,
                    method=blockdec.DraftModel(cfg, params, block_size=3))


def test_drafter_errors():
  cfg, params = random_model(1)
  prompts, lengths = ragged_prompts(1, 2, 4, cfg.vocab_size)
  for bad in (0.0, 1.0, -0.5, True, "0.5"):
    with pytest.raises(ValueError, match="stop_below.*strictly between 0 and 1"):
      blockdec.DraftModel(cfg, params, stop_below=bad)
  dcfg, dparams = random_model(2, vocab_size=cfg.vocab_size + 1,
                               num_prediction_heads=1)
  with pytest.raises(ValueError, match="vocab_size"):
    blockdec.decode(params, cfg, prompts, lengths, 8,
                    method=blockdec.DraftModel(dcfg, dparams))
  small = dcfg.replace(vocab_size=cfg.vocab_size)
  with pytest.raises(ValueError, match=r"params\['embed'\].*has shape"):
    blockdec.decode(params, cfg, prompts, lengths, 8,
                    method=blockdec.DraftModel(small, dparams))
  with pytest.raises(ValueError, match="draft_params=None"):
    blockdec.decode(params, cfg, prompts, lengths, 8,
                    method=blockdec.DraftModel(small))
  short = small.replace(max_seq_len=8)
  with pytest.raises(ValueError, match="draft model's max_seq_len=8"):
    blockdec.decode(params, cfg, prompts, lengths, 8, method=blockdec.DraftModel(
        short, blockdec.init_params(short, jax.random.key(0))))
  with pytest.raises(TypeError, match="draft_cfg"):
    blockdec.DraftModel(params)
  for bad in (1, "yes", None):
    with pytest.raises(TypeError, match=r"speculative_prefill=.*True or False"):
      blockdec.DraftModel(small, speculative_prefill=bad)
  for bad, error in ((0, ValueError), (-1, ValueError), (2.5, TypeError),
                     (True, TypeError)):
    with pytest.raises(error, match="DraftModel block_size"):
      blockdec.DraftModel(small, block_size=bad)
    with pytest.raises(error, match="PromptLookup ngram"):
      blockdec.PromptLookup(ngram=bad)
    with pytest.raises(error, match="PromptLookup min_match"):
      blockdec.PromptLookup(min_match=bad)
  with pytest.raises(ValueError, match=r"min_match=4 .*\[1, 3\] \(at most ngram"):
    blockdec.PromptLookup(ngram=3, min_match=4)
  # NumPy integers are ints in every spec (equal, same hash: same compile).
  assert blockdec.PromptLookup(block_size=np.int64(3)).block_size == 3
  assert blockdec.Blockwise(np.int32(2)) == blockdec.Blockwise(2)
  assert hash(blockdec.Refined(3, num_drafts=np.int64(2))) == hash(
      blockdec.Refined(3, num_drafts=2))
  with pytest.raises(ValueError, match="estimate='history'"):
    blockdec.decode(params, cfg, prompts, lengths, 8,
                    method=blockdec.PromptLookup(
                        adaptive=blockdec.AdaptiveBlockSize(
                            estimate="confidence")))


def test_lookahead_window_is_a_tree_of_columns():
  # W = 4, N = 3 after a tree of 3 nodes: the module docstring's picture.
  nodes = lookahead.window_nodes(3, 4, 3)
  a = [3, 4, 5, 6]  # level 0 (level 1 is nodes 7..10)
  assert nodes.parents == (0, a[0], a[1], a[2], a[0], a[1], a[2], a[3])
  assert nodes.depths == (1, 2, 3, 4, 2, 3, 4, 5)


def test_pool_keeps_distinct_ngrams_and_returns_the_most_recent():
  pool = np.full((1, 4, 3), -1, np.int32)
  grams = np.array([[[1, 2, 3], [1, 2, 3], [1, 5, 6], [2, 2, 2]]], np.int32)
  pool, nxt = lookahead.add_to_pool(pool, np.zeros(1, np.int32), grams)
  assert np.asarray(pool)[0].tolist() == [[1, 2, 3], [1, 5, 6], [2, 2, 2],
                                          [-1, -1, -1]]
  assert int(nxt[0]) == 3
  # Already pooled: nothing new; then two new ones wrap around the ring.
  pool, nxt = lookahead.add_to_pool(pool, nxt, np.array(
      [[[1, 2, 3], [1, 7, 7], [1, 8, 8], [1, 5, 6]]], np.int32))
  assert np.asarray(pool)[0].tolist() == [[1, 8, 8], [1, 5, 6], [2, 2, 2],
                                          [1, 7, 7]]
  grams, found = lookahead.pool_candidates(pool, nxt, np.array([1]), 3)
  assert np.asarray(found).tolist() == [[True, True, True]]
  assert np.asarray(grams)[0].tolist() == [[8, 8], [7, 7], [5, 6]]
  grams, found = lookahead.pool_candidates(pool, nxt, np.array([2]), 2)
  assert np.asarray(found).tolist() == [[True, False]]
  assert np.asarray(grams)[0].tolist() == [[2, 2], [2, 2]]


def test_cli_prompt_lookup_verifies_only_after_long_matches():
  from absl import flags
  from blockdec import cli
  cfg, _ = random_model(0)
  for extra, want in (([], (11, 3, True)), (["--block_size=4"], (4, 3, True)),
                      (["--block_size=1"], (1, 1, False))):
    try:
      flags.FLAGS(["blockdec", "decode", "--method=prompt_lookup"] + extra)
      spec = cli._method(cfg)  # pylint: disable=protected-access
    finally:
      flags.FLAGS.unparse_flags()
    assert (spec.block_size, spec.min_match,
            spec.adaptive is not None) == want, extra


def test_lookahead_errors():
  cfg, params = random_model(1)
  prompts, lengths = ragged_prompts(1, 2, 4, cfg.vocab_size)
  with pytest.raises(ValueError, match="Lookahead ngram=1 must be an integer >= 2"):
    blockdec.Lookahead(ngram=1)
  with pytest.raises(ValueError, match="window"):
    blockdec.Lookahead(window=0)
  learned = cfg.replace(position="learned", max_seq_len=16)
  with pytest.raises(ValueError, match="max_seq_len=16"):
    blockdec.decode(blockdec.init_params(learned, jax.random.key(0)), learned,
                    prompts, lengths, 8, method=blockdec.Lookahead(window=8))


@pytest.mark.parametrize("method,extra", [
    ("prompt_lookup", []), ("lookahead", []),
    ("draft_model", ["--draft_checkpoint={ckpt}"]),
    ("draft_model", ["--draft_checkpoint={ckpt}", "--temperature=0.7"]),
])
def test_cli_decodes_with_every_method(tmp_path, capsys, method, extra):
  from absl import flags
  from blockdec import cli
  from blockdec.training.tokenizers import ByteTokenizer
  cfg, params = random_model(0, vocab_size=256, num_prediction_heads=1)
  blockdec.save_checkpoint(tmp_path, cfg, params, tokenizer=ByteTokenizer())
  argv = ["blockdec", "decode", f"--checkpoint={tmp_path}", "--prompt=abcabc",
          "--max_new_tokens=6", f"--method={method}"]
  try:
    cli.main(flags.FLAGS(argv + [e.format(ckpt=tmp_path) for e in extra]))
  finally:
    flags.FLAGS.unparse_flags()
  out = capsys.readouterr().out
  assert out.startswith("abcabc")
  if extra[1:]:
    assert "speculative sampling (draft_model)" in out
  else:
    assert "identical to greedy: True" in out
