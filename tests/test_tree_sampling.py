"""Sampled token trees are lossless.

Two ways a tree is verified under sampling (`verify.SpeculativeSampling`):
drafts with q (EAGLE's tree of independent draws) go through multi-candidate
rejection at the first depth; deterministic drafts (Refined, lookahead) are
matched against the target's own draws. Each is checked three ways (the
EAGLE tree's whole decodes are in tests/test_eagle.py):

* the verifier alone, on fixed p and q with many keys: the next token's
  distribution (one call, every row at the same node) is the target's p;
* whole decodes against the enumerated distribution of continuations
  (tests/test_sampling.py's chi-square test), with a biased verifier
  rejected so the test has power;
* deterministic drafts: the output equals ancestral sampling with the same
  key, token for token.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import blockdec
from blockdec.decoding.verify import VerifyKeys
from tests.helpers import ragged_prompts, random_model
from tests.test_sampling import (ALPHA, _MatchTopTwo, _ResampleFromTarget,
                                 _model, sampled_p_values)


# One call's tree over the vocabulary {0, 1, 2, 3}: C = 3 chains of D = 2
# drafts. The target's p at the root, and after a first token x (P1[x]).
P_ROOT = np.array([0.4, 0.3, 0.2, 0.1])
P1 = np.array([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1],
               [0.25, 0.25, 0.4, 0.1], [0.1, 0.1, 0.1, 0.7]])
Q_FIRST = np.array([0.1, 0.2, 0.3, 0.4])   # The drafter's q, far from p.
Q_SECOND = np.array([0.4, 0.1, 0.4, 0.1])
FIXED = np.array([[1, 0], [3, 1], [1, 3]])  # Chains 0 and 2 share token 1.


def _verify_tree(verifier, rows, deterministic, seed=0):
  """Verifies `rows` independent trees -> (drafts [B, C, 2], Verdict).

  Drafts with q are drawn per row as the contract asks (first tokens i.i.d.
  from Q_FIRST, second tokens from Q_SECOND); deterministic drafts are
  FIXED in every row."""
  rng = np.random.default_rng(seed)
  if deterministic:
    drafts = np.broadcast_to(FIXED, (rows,) + FIXED.shape)
    q = None
  else:
    drafts = np.stack([rng.choice(4, (rows, 3), p=Q_FIRST),
                       rng.choice(4, (rows, 3), p=Q_SECOND)], axis=-1)
    q = np.broadcast_to(np.stack([Q_FIRST, Q_SECOND]), (rows, 3, 2, 4))
    q = jnp.asarray(q, jnp.float32)
  p = np.empty((rows, 3, 3, 4))
  p[:, :, 0], p[:, :, 1], p[:, :, 2] = P_ROOT, P1[drafts[:, :, 0]], 0.25
  keys = jax.random.split(jax.random.key(seed), (rows, 5))
  verdict = verifier.verify(jnp.asarray(drafts, jnp.int32),
                            jnp.log(jnp.asarray(p, jnp.float32)), q,
                            blockdec.Sampling(),
                            VerifyKeys(accept=keys[:, :2], next=keys[:, 2:]))
  return drafts, jax.tree_util.tree_map(np.asarray, verdict)


def _generated(drafts, verdict):
  """The first generated token after the root of every row, and the second
  where the first was a kept draft (-1 elsewhere)."""
  kept = drafts[np.arange(len(drafts)), verdict.chain]  # [B, 2]
  a = verdict.accepted
  first = np.where(a > 0, kept[:, 0], verdict.next_token)
  second = np.where(a > 1, kept[:, 1], np.where(a == 1, verdict.next_token,
                                                -1))
  return first, second


def _first_and_second_p_values(drafts, verdict):
  """Chi-square p-values: the first token against P_ROOT; the second, in
  rows that kept a first draft x, against P1[x] (all x pooled)."""
  first, second = _generated(drafts, verdict)
  p_first = stats.chisquare(np.bincount(first, minlength=4),
                            P_ROOT * len(first)).pvalue
  chi2, dof = 0.0, 0
  for x in range(4):
    rows = (second >= 0) & (first == x)
    if rows.sum() < 100:
      continue
    counts = np.bincount(second[rows], minlength=4)
    chi2 += stats.chisquare(counts, P1[x] * rows.sum()).statistic
    dof += 3
  return p_first, float(stats.chi2.sf(chi2, dof)) if dof else 1.0, dof


@pytest.mark.parametrize("deterministic", [False, True],
                         ids=["drafts-with-q", "deterministic"])
def test_tree_verifier_keeps_the_target_distribution(deterministic):
  drafts, verdict = _verify_tree(blockdec.SpeculativeSampling(), 40_000,
                                 deterministic)
  p_first, p_second, dof = _first_and_second_p_values(drafts, verdict)
  assert p_first > ALPHA and p_second > ALPHA, (p_first, p_second)
  assert dof >= 6  # At least two first tokens had enough kept rows.
  # Chains other than 0 are kept, and deeper drafts both pass and fail.
  kept = verdict.chain[verdict.accepted > 0]
  assert np.all(np.isin([0, 1], kept)), np.bincount(kept)
  assert np.all(np.isin([0, 1, 2], verdict.accepted))
  if not deterministic:  # Candidate 2 is reached too.
    assert np.any(kept == 2), np.bincount(kept)


@pytest.mark.parametrize("biased", [_ResampleFromTarget(), _MatchTopTwo()],
                         ids=["resample-from-target", "match-top-two"])
def test_tree_verifier_test_rejects_a_biased_verifier(biased):
  deterministic = isinstance(biased, _MatchTopTwo)
  drafts, verdict = _verify_tree(biased, 40_000, deterministic, seed=1)
  assert min(_first_and_second_p_values(drafts, verdict)[:2]) < 1e-6


def test_refined_tree_sampling_matches_enumerated_distribution():
  cfg, params = _model(seed=5)
  sampling = blockdec.Sampling(temperature=0.8)
  method = blockdec.Refined(block_size=3, num_drafts=3, lattice_width=3)
  p_values, out = sampled_p_values(cfg, params, 3, sampling, method, eos_id=1)
  assert min(p_values) > ALPHA, p_values
  assert np.asarray(out.accepted_hist)[:, 1:].sum() > 0
  biased = dataclasses.replace(method, acceptance=_MatchTopTwo())
  p_values, _ = sampled_p_values(cfg, params, 3, sampling, biased, eos_id=1)
  assert min(p_values) < 1e-6, p_values


@pytest.mark.parametrize("method", [
    blockdec.Refined(block_size=4, num_drafts=3, lattice_width=3),
    blockdec.Lookahead(window=3, ngram=3, guesses=3),
    blockdec.PromptLookup(ngram=2, block_size=4),
], ids=["refined-tree", "lookahead-tree", "prompt-lookup"])
def test_deterministic_drafts_equal_ancestral_sampling(method):
  """Deterministic drafts are matched against the target's own draws, keyed
  by the generated index: the output is ancestral sampling's token for
  token (ragged rows, EOS, compaction)."""
  cfg, params = random_model(6, num_prediction_heads=4, max_seq_len=96)
  prompts, lengths = ragged_prompts(2, 6, 12, cfg.vocab_size)
  sampling = blockdec.Sampling(temperature=0.9, top_p=0.95)
  run = lambda m: blockdec.decode(params, cfg, prompts, lengths, 40, method=m,
                                  sampling=sampling, key=jax.random.key(5),
                                  eos_id=3)
  ancestral, out = run(blockdec.Autoregressive()), run(method)
  np.testing.assert_array_equal(out.lengths, ancestral.lengths)
  np.testing.assert_array_equal(out.tokens, ancestral.tokens)
  assert float(out.block_efficiency) > 1.0  # Some drafts were accepted.
