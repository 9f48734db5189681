"""Block diffusion: masks, the adaptation, and decoding through the core.

* The training mask against a brute-force reference, and training and
  decoding seeing the same thing: a noisy block's logits in the training
  forward equal a decoding call's on the committed prefix's cache, which
  equal a full forward under a dense reference pattern (cache reuse equals
  recomputing without it).
* The sub-block cache (`sub_block_size`) equals recomputing the frozen
  sub-blocks in every denoising step.
* Self-speculative decoding (`acceptance=Exact()`) equals greedy decoding
  token for token over random models, ragged batches, block sizes,
  thresholds and EOS; with sampling it is lossless (chi-square against the
  enumerated distribution).
* Block size 1 is autoregressive decoding; thresholds 1.0 and 0.0 take b
  and 1 denoising calls per block.
* Fused drafting (`next_block_guesses`): the call's mask (each guessed
  block sees the chain up to its accepted length and itself both ways),
  the same drafts as unfused decoding at fewer calls, exact and lossless.
* The adaptation keeps the base's weights, adds the [MASK] row, trains and
  resumes exactly; bad settings fail with clear errors.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blockdec
from blockdec.decoding.drafters.block_diffusion import BlockDiffusionDrafter
from blockdec.kernels import masks
from blockdec.models import transformer
from blockdec.training import diffusion, pipeline, train
from tests.helpers import (assert_same_or_near_tie, experiment_script,
                           mid_way_eos, ragged_prompts, random_model)
from tests.test_sampling import ALPHA, _MatchTopTwo, sampled_p_values
from tests.test_training import tiny, train_killed_and_resumed
from tests.test_training_data import write_corpus

_apply = jax.jit(transformer.apply, static_argnames=("cfg", "num_heads",
                                                     "mask"))


def _diffusion_model(seed=0, param_seed=None, **overrides):
  """A random model whose last token is its [MASK]."""
  cfg, params = random_model(seed, param_seed=param_seed,
                             num_prediction_heads=1, **overrides)
  return cfg.replace(mask_token_id=cfg.vocab_size - 1), params


# ---------------------------------------------------------------- the masks


@pytest.mark.parametrize("length,block,streams", [(4, 2, 1), (7, 3, 2),
                                                  (5, 8, 2), (6, 1, 1)])
def test_training_mask_matches_brute_force(length, block, streams):
  pattern = masks.DiffusionTrainingMask(length, block, streams).pattern()
  n = (1 + streams) * length
  want = np.zeros((n, n), bool)
  for i in range(n):
    si, pi = divmod(i, length)
    for j in range(n):
      sj, pj = divmod(j, length)
      if si == 0:
        want[i, j] = sj == 0 and pj <= pi
      elif sj == 0:
        want[i, j] = pj < (pi // block) * block
      else:
        want[i, j] = sj == si and pj // block == pi // block
  np.testing.assert_array_equal(pattern, want)


def test_training_and_decoding_see_the_same_block():
  """Noisy block i of the training forward == a decoding call after the
  prefix x_0..x_{ib-1} was committed == a dense no-cache forward."""
  cfg, params = _diffusion_model(3, n_layers=2)
  length, b = 10, 4
  rng = np.random.RandomState(0)
  x = rng.randint(0, cfg.vocab_size - 1, size=length).astype(np.int32)
  noisy = x.copy()
  noisy[[5, 6, 9]] = cfg.mask_token_id  # Block 1 = p 4..7, block 2 = 8, 9.
  fed = np.concatenate([x, noisy])[None]
  positions = np.tile(np.arange(length, dtype=np.int32), 2)[None]
  train_logits, _ = _apply(
      params, cfg, jnp.asarray(fed), jnp.asarray(positions), num_heads=1,
      mask=masks.DiffusionTrainingMask(length, b, 1))
  train_logits = np.asarray(train_logits)[0, length:, 0]
  for start in (0, 4, 8):
    end = min(start + b, length)
    block = noisy[start:end]
    cache = transformer.make_cache(cfg, 1, 32)
    if start:
      _, cache = _apply(
          params, cfg, jnp.asarray(x[None, :start]),
          jnp.arange(start, dtype=jnp.int32)[None], cache, num_heads=1)
    decode_logits, _ = _apply(
        params, cfg, jnp.asarray(block[None]),
        jnp.arange(start, end, dtype=jnp.int32)[None], cache, num_heads=1,
        mask=masks.BlockBidirectionalMask(end - start))
    dense = np.tri(end, dtype=bool)
    dense[start:, start:] = True
    full_logits, _ = _apply(
        params, cfg, jnp.asarray(np.concatenate([x[:start], block])[None]),
        jnp.arange(end, dtype=jnp.int32)[None], num_heads=1,
        mask=masks.PatternMask(dense))
    np.testing.assert_allclose(np.asarray(decode_logits)[0, :, 0],
                               train_logits[start:end], atol=2e-5)
    np.testing.assert_allclose(np.asarray(full_logits)[0, start:, 0],
                               train_logits[start:end], atol=2e-5)


def test_no_cache_masks_are_checked():
  cfg, params = _diffusion_model(0)
  tokens = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="block_len == T = 4"):
    transformer.apply(params, cfg, tokens, tokens, num_heads=1,
                      mask=masks.BlockBidirectionalMask(3))


# ------------------------------------------------------------ denoising step


def test_denoise_step_decides_confident_positions_and_at_least_one():
  drafter = BlockDiffusionDrafter(4, threshold=0.6, mask_id=0)
  # Probabilities over tokens 1..4 (token 0 is [MASK]): the top token's
  # probability p at each position, the rest shared evenly.
  top = np.array([[0.4, 0.9, 0.5, 0.7],     # 2 confident: positions 1, 3.
                  [0.45, 0.5, 0.55, 0.4]])  # none: the best, position 2.
  probs = np.repeat(((1 - top) / 3)[..., None], 5, axis=-1)
  probs[0, :, 1], probs[1, :, 2] = top[0], top[1]
  logits = np.log(probs)
  logits[..., 0] = 10.0  # [MASK] is never predicted, nor counted.
  tokens = jnp.zeros((2, 4), jnp.int32)
  decided = jnp.zeros((2, 4), bool)
  tokens, decided, conf = drafter.denoise_step(jnp.asarray(logits), tokens,
                                               decided)
  np.testing.assert_array_equal(decided, [[0, 1, 0, 1], [0, 0, 1, 0]])
  np.testing.assert_array_equal(tokens, [[0, 1, 0, 1], [0, 0, 2, 0]])
  np.testing.assert_allclose(conf, top, rtol=1e-5)
  # Decided positions stay as they are.
  tokens2, decided2, _ = drafter.denoise_step(
      jnp.asarray(logits[:, :, ::-1].copy()), tokens, decided)
  np.testing.assert_array_equal(np.asarray(tokens2)[decided], tokens[decided])
  assert np.asarray(decided2).sum() > np.asarray(decided).sum()


def test_left_to_right_order_decides_a_prefix():
  """order="left_to_right": the sure positions right after the decided
  prefix, and at least the first undecided one; a sure position behind an
  unsure one waits."""
  drafter = BlockDiffusionDrafter(5, threshold=0.6, mask_id=0,
                                  order="left_to_right")
  top = np.array([[0.9, 0.8, 0.4, 0.95, 0.9],   # 0, 1 sure; 3, 4 wait.
                  [0.4, 0.45, 0.9, 0.9, 0.9]])  # only the first, unsure.
  probs = np.repeat(((1 - top) / 3)[..., None], 5, axis=-1)
  probs[..., 2] = top
  logits = np.log(probs)
  logits[..., 0] = 10.0  # [MASK] is never predicted.
  tokens, decided = jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 5), bool)
  tokens, decided, _ = drafter.denoise_step(jnp.asarray(logits), tokens,
                                            decided)
  np.testing.assert_array_equal(decided, [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(tokens, [[2, 2, 0, 0, 0], [2, 0, 0, 0, 0]])
  # Next step: the prefix grows from where it stopped.
  tokens, decided, _ = drafter.denoise_step(jnp.asarray(logits), tokens,
                                            decided)
  np.testing.assert_array_equal(decided, [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
  # The confidence order decides the sure positions wherever they are.
  by_confidence = BlockDiffusionDrafter(5, threshold=0.6, mask_id=0)
  _, decided, _ = by_confidence.denoise_step(
      jnp.asarray(logits), jnp.zeros((2, 5), jnp.int32),
      jnp.zeros((2, 5), bool))
  np.testing.assert_array_equal(decided, [[1, 1, 0, 1, 1], [0, 0, 1, 1, 1]])


def test_left_to_right_decoding_fills_blocks_in_order():
  cfg, params = _diffusion_model(2, param_seed=7)
  prompts, lengths = ragged_prompts(3, 2, 5, cfg.vocab_size - 1)
  n, b = 15, 4
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=n)
  for threshold in (0.0, 0.5, 1.0):
    outs = {order: blockdec.decode(
        params, cfg, prompts, lengths, n,
        method=blockdec.BlockDiffusion(b, threshold, order=order))
            for order in ("confidence", "left_to_right")}
    for out in outs.values():
      np.testing.assert_array_equal(out.lengths, [n] * 2)
      assert np.all(np.asarray(out.tokens) != cfg.mask_token_id)
    if threshold == 0.0:  # Every position in one call: the same blocks.
      np.testing.assert_array_equal(outs["confidence"].tokens,
                                    outs["left_to_right"].tokens)
    if threshold == 1.0:  # One position per call either way.
      np.testing.assert_array_equal(outs["confidence"].num_calls,
                                    outs["left_to_right"].num_calls)
    # Self-speculative with either order is still the greedy output.
    exact = blockdec.decode(params, cfg, prompts, lengths, n,
                            method=blockdec.BlockDiffusion(
                                b, threshold, acceptance=blockdec.Exact(),
                                order="left_to_right"))
    assert_same_or_near_tie(cfg, params, prompts, lengths, greedy, exact)
  with pytest.raises(ValueError, match="order='sideways'; allowed"):
    blockdec.BlockDiffusion(4, 0.5, order="sideways")


def test_stop_token_ends_the_block_after_it():
  drafter = BlockDiffusionDrafter(5, threshold=0.5, mask_id=9, stop_token=7)
  logits = np.zeros((1, 5, 10), np.float32)
  logits[0, :, 3] = 5.0
  logits[0, 1, 7] = 9.0  # Position 1 is the stop token.
  tokens, decided, _ = drafter.denoise_step(
      jnp.asarray(logits), jnp.full((1, 5), 9, jnp.int32),
      jnp.zeros((1, 5), bool))
  np.testing.assert_array_equal(tokens, [[3, 7, 9, 9, 9]])
  assert np.all(decided)
  # Not before the positions ahead of the stop token are decided.
  logits[0, 0] = 0.0
  tokens, decided, _ = drafter.denoise_step(
      jnp.asarray(logits), jnp.full((1, 5), 9, jnp.int32),
      jnp.zeros((1, 5), bool))
  assert not decided[0, 0] and int(tokens[0, 1]) == 7
  assert np.asarray(tokens)[0, 2:].tolist() == [3, 3, 3]


# --------------------------------------------------------------- decoding

CASES = [  # (arch, batch, block_size, max_prompt, max_new_tokens, eos)
    (0, 1, 3, 5, 14, False), (2, 3, 4, 6, 20, True), (5, 4, 6, 7, 17, True),
]


@pytest.mark.parametrize("arch,batch,b,p,n,with_eos", CASES)
def test_self_speculative_equals_greedy(arch, batch, b, p, n, with_eos):
  accepted = 0
  for model in range(2):
    cfg, params = _diffusion_model(arch, param_seed=100 * arch + model)
    prompts, lengths = ragged_prompts(arch + model, batch, p,
                                      cfg.vocab_size - 1)
    eos_id = (mid_way_eos(cfg, params, prompts, lengths, n) if with_eos
              else None)
    greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                    max_new_tokens=n, eos_id=eos_id)
    # Model 1 drafts fused (the verification call denoises the next block)
    # with the sub-block cache.
    guesses = 0 if model == 0 else 1 + arch % 2
    sub_block = None if model == 0 else b // 2
    for threshold in ((0.3, 1.0) if model == 0 else (0.3,)):
      out = blockdec.decode(
          params, cfg, prompts, lengths, n, eos_id=eos_id,
          method=blockdec.BlockDiffusion(b, threshold,
                                         acceptance=blockdec.Exact(),
                                         next_block_guesses=guesses,
                                         sub_block_size=sub_block))
      assert_same_or_near_tie(cfg, params, prompts, lengths, greedy, out)
      np.testing.assert_array_equal(out.lengths, greedy.lengths)
      hist, calls = np.asarray(out.accepted_hist), np.asarray(out.num_calls)
      lens = np.asarray(out.lengths)
      assert hist.shape[1] == b + 1
      np.testing.assert_array_equal((hist * np.arange(1, b + 2)).sum(-1),
                                    lens)
      # Every verification call follows 1..b denoising calls (0..b fused).
      verifications = hist.sum(-1)
      assert np.all((1 if guesses else 2) * verifications <= calls)
      assert np.all(calls <= (b + 1) * verifications)
      if threshold == 1.0:  # One position per denoising call: b calls.
        np.testing.assert_array_equal(calls, (b + 1) * verifications)
      accepted += hist[:, 1:].sum()
  assert accepted > 0  # Diffusion drafts were accepted somewhere.


@dataclasses.dataclass(frozen=True)
class _Recomputed(blockdec.BlockDiffusion):
  """BlockDiffusion whose denoising steps recompute the frozen sub-blocks."""

  def drafter(self, cfg, block_size, arrays, **kw):
    drafter = super().drafter(cfg, block_size, arrays, **kw)
    drafter.reuse_cache = False
    return drafter


@pytest.mark.parametrize("arch,b,s,threshold,order,eos,differs", [
    (2, 6, 2, 0.15, "left_to_right", False, True),
    (1, 5, 2, 0.2, "confidence", True, False),
    (2, 4, 1, 0.2, "left_to_right", False, True)])
def test_sub_block_cache_equals_recomputing(arch, b, s, threshold, order,
                                            eos, differs):
  # Three layers and a small vocabulary: the frozen slots' keys and values
  # (from layer 2 on) reach the other slots' logits, and confidences reach
  # the thresholds. The cache is read at widths b - s, b - 2s, ..
  cfg, params = _diffusion_model(arch, param_seed=7 + arch, n_layers=3,
                                 vocab_size=12)
  prompts, lengths = ragged_prompts(arch, 3, 5, cfg.vocab_size - 1)
  n = 20
  eos_id = mid_way_eos(cfg, params, prompts, lengths, n) if eos else None
  run = lambda method: blockdec.decode(params, cfg, prompts, lengths, n,
                                       eos_id=eos_id, method=method)
  cached = run(blockdec.BlockDiffusion(b, threshold, order=order,
                                       sub_block_size=s))
  recomputed = run(_Recomputed(b, threshold, order=order, sub_block_size=s))
  np.testing.assert_array_equal(cached.tokens, recomputed.tokens)
  np.testing.assert_array_equal(cached.lengths, recomputed.lengths)
  np.testing.assert_array_equal(cached.num_calls, recomputed.num_calls)
  if differs:  # The causal frozen slots change the drafts: not a no-op.
    plain = run(blockdec.BlockDiffusion(b, threshold, order=order))
    assert np.any(np.asarray(plain.tokens) != np.asarray(cached.tokens))


def test_block_size_one_is_autoregressive_and_thresholds_count_calls():
  cfg, params = random_model(2, num_prediction_heads=1)
  prompts, lengths = ragged_prompts(1, 3, 5, cfg.vocab_size)
  n = 18
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=n)
  # A drafter never proposes [MASK]; make it a token greedy never emits.
  unused = set(range(cfg.vocab_size)) - set(np.asarray(greedy.tokens).flat)
  cfg = cfg.replace(mask_token_id=max(unused))
  # b = 1: the block is one position predicted from the root: greedy.
  one = blockdec.decode(params, cfg, prompts, lengths, n,
                        method=blockdec.BlockDiffusion(1, 0.5))
  assert_same_or_near_tie(cfg, params, prompts, lengths, greedy, one)
  np.testing.assert_array_equal(one.num_calls, [n] * 3)  # 2 calls, 2 tokens.
  # Unverified blocks commit b + 1 tokens per round (the budget cuts the
  # last): threshold 1.0 takes b denoising calls, 0.0 one.
  b, rounds = 4, -(-n // 5)
  for threshold, per_round in ((1.0, b + 1), (0.0, 2)):
    out = blockdec.decode(params, cfg, prompts, lengths, n,
                          method=blockdec.BlockDiffusion(b, threshold))
    np.testing.assert_array_equal(out.lengths, [n] * 3)
    np.testing.assert_array_equal(out.num_calls, [rounds * per_round] * 3)
    assert np.all(np.asarray(out.tokens) != cfg.mask_token_id)
    # The first token comes from the prefill, the next from the first block.
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0],
                                  np.asarray(greedy.tokens)[:, 0])


def test_fused_drafting_mask_sees_the_accepted_chain_and_the_block():
  # b = 2, one guess: chain nodes 0 (root), 1, 2; the block guessed after
  # a = 0 accepted drafts is nodes 3, 4 at depths 1, 2 (under the root);
  # after a = 1, nodes 5, 6 at depths 2, 3 (under node 1).
  drafter = BlockDiffusionDrafter(2, 0.0, mask_id=9, guesses=(1, 1))
  extra = drafter.extra
  assert extra.parents == (0, 3, 1, 5) and extra.depths == (1, 2, 2, 3)
  sees = drafter.extra.mask(drafter.tree.parents).pattern()
  expected = np.zeros((7, 7), bool)
  for node, seen in {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 3, 4],
                     4: [0, 3, 4], 5: [0, 1, 5, 6], 6: [0, 1, 5, 6]}.items():
    expected[node, seen] = True
  np.testing.assert_array_equal(sees, expected)
  assert blockdec.BlockDiffusion(
      2, acceptance=blockdec.Exact(), next_block_guesses=1).cache_slots(3) == 7
  # Guesses per accepted length: (0, 2) guesses twice after one accepted
  # draft only (two groups under node 1, each seeing only itself).
  drafter = BlockDiffusionDrafter(2, 0.0, mask_id=9, guesses=(0, 2))
  assert drafter.extra.parents == (1, 3, 1, 5)
  assert drafter.extra.depths == (2, 3, 2, 3)
  sees = drafter.extra.mask(drafter.tree.parents).pattern()
  np.testing.assert_array_equal(np.flatnonzero(sees[4]), [0, 1, 3, 4])
  np.testing.assert_array_equal(np.flatnonzero(sees[5]), [0, 1, 5, 6])
  assert blockdec.BlockDiffusion(
      2, acceptance=blockdec.Exact(),
      next_block_guesses=(0, 2)).cache_slots(3) == 7


def test_fused_drafting_drafts_the_same_blocks_in_fewer_calls():
  # A small vocabulary, so the denoiser's runner-ups often are the model's
  # correction. At threshold 0 every block takes one denoising call
  # unfused; fused, a row whose next token was guessed takes none, and its
  # drafts are the ones the denoising call would have made (the same
  # acceptance histogram).
  cfg, params = _diffusion_model(1, param_seed=3, vocab_size=10)
  prompts, lengths = ragged_prompts(4, 4, 6, cfg.vocab_size - 1)
  n = 24
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=n)
  outs = [blockdec.decode(params, cfg, prompts, lengths, n,
                          method=blockdec.BlockDiffusion(
                              3, 0.0, acceptance=blockdec.Exact(),
                              next_block_guesses=r))
          for r in (0, 2, (2, 1))]
  for out in outs:
    assert_same_or_near_tie(cfg, params, prompts, lengths, greedy, out)
  plain, fused, weighted = outs
  verifications = np.asarray(plain.accepted_hist).sum(-1)
  np.testing.assert_array_equal(plain.num_calls, 2 * verifications)
  for out in (fused, weighted):
    np.testing.assert_array_equal(out.accepted_hist, plain.accepted_hist)
    saved = 2 * verifications - np.asarray(out.num_calls)
    assert np.all(saved >= 0) and saved.sum() > 0, saved
    # The first block has no guess; every later one at most one call saved.
    assert np.all(saved <= verifications - 1)
  # Guessing after 0 and 1 accepted drafts only, with fewer runner-ups
  # there, hits a subset of what r = 2 everywhere hits.
  assert np.all(np.asarray(weighted.num_calls)
                >= np.asarray(fused.num_calls))


@pytest.mark.parametrize("acceptance", [blockdec.Typical(0.3, 0.5),
                                        blockdec.TopK(2)])
def test_fused_drafting_under_a_lossy_verifier_changes_only_the_calls(
    acceptance):
  # Fusing only moves the next block's first denoising step into the
  # verification call, so under a lossy verifier too the blocks, the
  # verdicts and the output are the unfused run's, in fewer calls.
  cfg, params = _diffusion_model(1, param_seed=3, vocab_size=10)
  prompts, lengths = ragged_prompts(4, 4, 6, cfg.vocab_size - 1)
  plain, fused = [blockdec.decode(params, cfg, prompts, lengths, 24,
                                  method=blockdec.BlockDiffusion(
                                      3, 0.0, acceptance=acceptance,
                                      next_block_guesses=r))
                  for r in (0, (0, 2, 1))]
  np.testing.assert_array_equal(fused.tokens, plain.tokens)
  np.testing.assert_array_equal(fused.accepted_hist, plain.accepted_hist)
  assert np.all(np.asarray(fused.num_calls) <= np.asarray(plain.num_calls))
  assert np.asarray(fused.num_calls).sum() < np.asarray(plain.num_calls).sum()
  # The verifier is lossy here: it accepts drafts greedy would not.
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=24)
  assert not np.array_equal(np.asarray(plain.tokens), np.asarray(greedy.tokens))


@pytest.mark.parametrize("guesses", [0, 1])
def test_self_speculative_sampling_matches_enumerated_distribution(guesses):
  cfg, params = random_model(1, param_seed=0, vocab_size=6,
                             num_prediction_heads=1, max_seq_len=16)
  cfg = cfg.replace(mask_token_id=5)
  params = jax.tree_util.tree_map(lambda x: x * 0.5, params)
  sampling = blockdec.Sampling(temperature=0.9)
  p_values, out = sampled_p_values(
      cfg, params, 3, sampling,
      blockdec.BlockDiffusion(2, 0.5, acceptance=blockdec.Exact(),
                              next_block_guesses=guesses), eos_id=2)
  assert min(p_values) > ALPHA, p_values
  hist = np.asarray(out.accepted_hist).sum(0)
  assert hist[0] > 0 and hist[1:].sum() > 0, hist
  biased, _ = sampled_p_values(
      cfg, params, 3, sampling,
      blockdec.BlockDiffusion(2, 0.5, acceptance=_MatchTopTwo(),
                              next_block_guesses=guesses))
  assert min(biased) < 1e-6, biased


def test_block_diffusion_errors():
  cfg, params = random_model(0, num_prediction_heads=1)
  prompts, lengths = ragged_prompts(0, 2, 4, cfg.vocab_size)
  with pytest.raises(ValueError, match="mask_token_id is None"):
    blockdec.decode(params, cfg, prompts, lengths, 4,
                    method=blockdec.BlockDiffusion(4))
  dcfg = cfg.replace(mask_token_id=cfg.vocab_size - 1)
  with pytest.raises(ValueError, match="is the model's \\[MASK\\]"):
    blockdec.decode(params, dcfg, prompts, lengths, 4,
                    method=blockdec.BlockDiffusion(
                        4, stop_token=cfg.vocab_size - 1))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    blockdec.decode(params, dcfg, prompts, lengths, 4,
                    method=blockdec.BlockDiffusion(4, stop_token=10_000))
  with pytest.raises(ValueError, match="threshold=1.5"):
    blockdec.BlockDiffusion(4, 1.5)
  with pytest.raises(ValueError, match="block_size"):
    blockdec.BlockDiffusion(0)
  with pytest.raises(ValueError, match="cannot be used with sampling"):
    blockdec.decode(params, dcfg, prompts, lengths, 4,
                    method=blockdec.BlockDiffusion(4),
                    sampling=blockdec.Sampling(0.7), key=jax.random.key(0))
  with pytest.raises(ValueError, match="next_block_guesses=1 needs a "
                     "verifier that can reject"):
    blockdec.BlockDiffusion(4, next_block_guesses=1)
  with pytest.raises(ValueError, match="next_block_guesses"):
    blockdec.BlockDiffusion(4, acceptance=blockdec.Exact(),
                            next_block_guesses=-1)
  with pytest.raises(ValueError, match=r"next_block_guesses\[1\]"):
    blockdec.BlockDiffusion(4, acceptance=blockdec.Exact(),
                            next_block_guesses=(1, -1))
  with pytest.raises(ValueError, match="has 5 entries; at most "
                     "block_size=4"):
    blockdec.BlockDiffusion(4, acceptance=blockdec.Exact(),
                            next_block_guesses=(1, 1, 1, 1, 1))
  with pytest.raises(ValueError, match="runner-ups exist"):
    blockdec.decode(params, dcfg, prompts, lengths, 4,
                    method=blockdec.BlockDiffusion(
                        4, acceptance=blockdec.Exact(),
                        next_block_guesses=dcfg.vocab_size))
  short, short_params = _diffusion_model(0, position="learned",
                                         max_seq_len=14)
  with pytest.raises(ValueError, match="max_seq_len=14"):
    blockdec.decode(short_params, short, prompts, lengths, 4,
                    method=blockdec.BlockDiffusion(
                        4, acceptance=blockdec.Exact(), next_block_guesses=1))
  with pytest.raises(ValueError, match="mask_token_id=99"):
    blockdec.ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2,
                         mask_token_id=99)
  for bad in (0, 5):
    with pytest.raises(ValueError, match=f"sub_block_size={bad} must be "
                       "None or an integer in \\[1, 4\\]"):
      blockdec.BlockDiffusion(4, sub_block_size=bad)


# --------------------------------------------------------------- training


def test_noisy_streams_are_complementary_and_shifted():
  tokens = jnp.asarray(np.arange(1, 3 * 11 + 1).reshape(3, 11), jnp.int32)
  inputs, masked = diffusion.noisy_streams(tokens, jax.random.key(0), 4, 0)
  inputs, masked = np.asarray(inputs), np.asarray(masked)
  assert inputs.shape == masked.shape == (3, 2, 10)
  np.testing.assert_array_equal(masked[:, 0], ~masked[:, 1])
  clean = np.asarray(tokens)[:, None, :10]
  first = (np.arange(10) % 4) == 0
  np.testing.assert_array_equal(inputs[:, :, first], np.broadcast_to(
      clean, inputs.shape)[:, :, first])  # A block starts from a clean root.
  for p in np.nonzero(~first)[0]:
    # Input p is masked iff its token (position p - 1's target) is.
    np.testing.assert_array_equal(inputs[:, :, p] == 0, masked[:, :, p - 1])
    np.testing.assert_array_equal(
        np.where(masked[:, :, p - 1], 0, clean[:, :, p]), inputs[:, :, p])


def test_adapt_model_keeps_the_base():
  for tie in (True, False):
    cfg, params = random_model(0, num_prediction_heads=3, tie_embeddings=tie)
    acfg, aparams = diffusion.adapt_model(cfg, params, seed=1)
    assert (acfg.vocab_size, acfg.mask_token_id) == (cfg.vocab_size + 1,
                                                     cfg.vocab_size)
    assert acfg.num_prediction_heads == 1 and "proposal_heads" not in aparams
    blockdec.check_params(aparams, acfg)
    emb = np.asarray(aparams["embed"]["embedding"])
    np.testing.assert_array_equal(emb[:-1], params["embed"]["embedding"])
    # The AR logits over the base vocabulary are the base's.
    tokens = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
    np.testing.assert_allclose(
        np.asarray(blockdec.forward_logits(aparams, acfg, tokens))[..., :-1],
        np.asarray(blockdec.forward_logits(params, cfg, tokens)), atol=1e-5)
    with pytest.raises(ValueError, match="already has mask_token_id"):
      diffusion.adapt_model(acfg, aparams, seed=1)


def test_block_diffusion_config_trains_resumes_and_decodes(tmp_path):
  corpus = write_corpus(tmp_path / "corpus", n=20)
  base_summary = train.train(tiny("base_lm", corpus, steps=2), tmp_path / "base")
  assert np.isfinite(base_summary["valid"]["loss"])
  init = blockdec.load_checkpoint(tmp_path / "base")
  config = tiny("block_diffusion", corpus, steps=4, checkpoint_every=2,
                log_every=1)
  summary, (acfg, aparams, tokenizer) = train_killed_and_resumed(
      config, tmp_path, init)
  assert acfg.mask_token_id == init[0].vocab_size == 256
  assert summary["regime"] == "block_diffusion"
  rows = train.read_metrics(tmp_path / "a" / "metrics.jsonl")
  train_rows = [r for r in rows if r["split"] == "train"]
  assert len(train_rows) == 4
  assert all(np.isfinite(r["diffusion_loss"]) and r["diffusion_loss"] > 0
             for r in train_rows)
  prompt = np.asarray([tokenizer.encode("def alpha")], np.int32)
  out = blockdec.decode(aparams, acfg, prompt, [prompt.shape[1]], 8,
                        method=blockdec.BlockDiffusion(4, 0.5))
  assert int(out.lengths[0]) == 8
  # A config without the diffusion block fails at once.
  bad = tiny("block_diffusion", corpus)
  bad.diffusion = None
  with pytest.raises(ValueError, match="config.diffusion.block_size"):
    train.Trainer(bad, tmp_path / "c", init=init)
  with pytest.raises(ValueError, match="block_diffusion preset 'huge'"):
    pipeline.load_config("configs/block_diffusion.py", "huge")


def test_block_diffusion_distill_learns_the_base_greedy_text(tmp_path):
  """configs/block_diffusion.py:tiny_distill adapts the base on its own
  greedy continuations: every training row's targets are the base's greedy
  output after the row's corpus prefix."""
  corpus = write_corpus(tmp_path / "corpus", n=20)
  train.train(tiny("base_lm", corpus, steps=2), tmp_path / "base")
  init = blockdec.load_checkpoint(tmp_path / "base")
  bcfg, bparams, _ = init
  config = pipeline.load_config("configs/block_diffusion.py", "tiny_distill")
  config.data.corpus = str(corpus)
  config.data.valid_fraction, config.data.test_fraction = 0.2, 0.1
  config.progress = False
  assert config.regime == "block_diffusion_distill"
  trainer = train.Trainer(config, tmp_path / "a", init=init)
  rows = trainer.batches.first  # The distilled rows (diffusion loss).
  d = config.distill
  assert rows.tokens.shape == (d.num_sequences, d.prefix_len + d.new_tokens)
  prefix = rows.tokens[:, :d.prefix_len]
  greedy = blockdec.greedy_decode(bparams, bcfg, prefix,
                                  np.full(len(prefix), d.prefix_len),
                                  max_new_tokens=d.new_tokens)
  np.testing.assert_array_equal(rows.tokens[:, d.prefix_len:], greedy.tokens)
  np.testing.assert_array_equal(rows.mask[:, :d.prefix_len], 0)  # Context.
  np.testing.assert_array_equal(rows.mask[:, d.prefix_len:], 1)  # Targets.
  # Each step also holds corpus rows, on which the AR loss alone is taken:
  # distilled tokens move the diffusion loss, never the AR one.
  batch = trainer.batches.batch(0)
  assert batch["corpus_tokens"].shape == (config.batch_size,
                                          config.data.seq_len + 1)
  acfg0, aparams0 = diffusion.adapt_model(bcfg, bparams, seed=0)
  key = jax.random.key(0)
  ar, diff = diffusion.losses(aparams0, acfg0, batch, key, 4)
  shuffled = dict(batch, tokens=np.roll(batch["tokens"], 3, axis=1))
  ar2, diff2 = diffusion.losses(aparams0, acfg0, shuffled, key, 4)
  assert float(ar2) == float(ar) and float(diff2) != float(diff)
  corpus_only = {"tokens": batch["corpus_tokens"],
                 "mask": batch["corpus_mask"]}
  np.testing.assert_allclose(
      ar, diffusion.losses(aparams0, acfg0, corpus_only, key, 4)[0],
      rtol=1e-5)
  summary = train.train(config, tmp_path / "a", init=init)
  assert summary["regime"] == "block_diffusion_distill"
  assert np.isfinite(summary["valid"]["loss"])
  train_rows = [r for r in train.read_metrics(tmp_path / "a" / "metrics.jsonl")
                if r["split"] == "train"]
  assert train_rows and all(r["diffusion_loss"] > 0 for r in train_rows)
  acfg, aparams, _ = blockdec.load_checkpoint(tmp_path / "a")
  assert acfg.mask_token_id == bcfg.vocab_size
  out = blockdec.decode(aparams, acfg, prefix[:2], [d.prefix_len] * 2, 8,
                        method=blockdec.BlockDiffusion(4, 0.5))
  np.testing.assert_array_equal(out.lengths, 8)
  with pytest.raises(ValueError, match="'huge_distill' unknown"):
    pipeline.load_config("configs/block_diffusion.py", "huge_distill")


@pytest.mark.parametrize("extra,identical", [
    (["--self_speculative", "--next_block_guesses=1"], True),
    (["--threshold=0.0"], None),
    (["--threshold=0.9", "--diffusion_order=left_to_right"], None),
    (["--self_speculative", "--sub_block_size=1"], True)])
def test_cli_decodes_with_block_diffusion(tmp_path, capsys, extra, identical):
  from absl import flags
  from blockdec import cli
  from blockdec.training.tokenizers import ByteTokenizer
  cfg, params = random_model(0, vocab_size=257, num_prediction_heads=1)
  cfg = cfg.replace(mask_token_id=256)
  blockdec.save_checkpoint(tmp_path, cfg, params, tokenizer=ByteTokenizer())
  argv = ["blockdec", "decode", f"--checkpoint={tmp_path}", "--prompt=abcabc",
          "--max_new_tokens=6", "--method=block_diffusion", "--block_size=3"]
  try:
    cli.main(flags.FLAGS(argv + extra))
  finally:
    flags.FLAGS.unparse_flags()
  out = capsys.readouterr().out
  assert out.startswith("abcabc") and "block efficiency" in out
  if identical:
    assert "identical to greedy: True" in out


def _benchmark_script():
  return experiment_script("block_diffusion_benchmark",
                                   "block_diffusion")


def test_benchmark_report_checks_the_targets(tmp_path):
  """experiments/block_diffusion.py's verdicts: the fastest setting within
  10% of each greedy reference's NLL, the held-out gap, and the exact
  self-speculative rate, from a result of made-up rows."""
  script = _benchmark_script()

  def row(method, tpc, nll, b=None, th=None, r=None, acceptance=None):
    return {"method": method, "model": "adapted", "block_size": b,
            "threshold": th, "guesses": r, "acceptance": acceptance,
            "tokens_per_call": tpc, "tokens_per_s": 100.0 * tpc,
            "speedup": tpc / 2, "nll_nondegenerate": nll,
            "nondegenerate_rows": 5, "nll_all": nll, "degenerate_share": 0.5,
            "agreement_with_ar": 0.5, "agreement_with_base": 0.5}
  rows = [row("ar-greedy", 1.0, 0.50), row("ar-greedy-adapted", 1.0, 0.60),
          row("block-diffusion", 2.6, 0.54, 8, 0.9),   # within both bounds
          row("block-diffusion", 3.5, 0.65, 8, 0.5),   # the adapted's only
          row("block-diffusion", 6.0, None, 16, 0.1),  # all rows degenerate
          row("self-speculative", 3.2, 0.60, 8, 0.5, 0, "exact"),
          row("self-speculative-typical", 4.0, 0.70, 8, 0.0, (0, 3, 2, 1),
              "typical(0.7, 0.9)")]
  result = {"machine": "test", "command": "python experiments/x.py",
            "prompts": 8, "batch": 8, "new_tokens": 16, "repeats": 1,
            "heldout_nats_per_byte": {"base": 1.46, "adapted": 1.43},
            "adapted_steps": 800,
            "adapted_config": "configs/block_diffusion.py:demo_distill",
            "targets": script.TARGETS, "rows": rows}
  md = script.markdown(result)
  assert ("of the base's greedy output (0.500): best 2.60 (b=8, threshold "
          "0.9, NLL 0.540); of the adapted model's own greedy output (0.600):"
          " best 3.50 (b=8, threshold 0.5, NLL 0.650)") in md
  assert "typical acceptance (lossy, fused): of the base's greedy output: " \
         "no setting within the bound" in md
  assert "gap -0.030" in md and "configs/block_diffusion.py:demo_distill" in md
  assert "Self-speculative (exact) >= 2.0 tokens per call: best 3.20" in md
  script.plot(result, tmp_path / "plot.png")
  assert (tmp_path / "plot.png").stat().st_size > 0
