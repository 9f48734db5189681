"""Lossless sampling: speculative sampling draws exactly the target's samples.

On tiny vocabularies the distribution of every continuation of a few tokens
is enumerated from `forward_logits` (the filtered conditionals multiplied
along each path, a path ending at EOS), and thousands of rows decoded with
speculative sampling are compared with it by a chi-square test, at several
temperatures, with top-k, top-p and EOS, over ragged prompts in one batch.
The same test rejects a deliberately biased verifier, so it has power. All
keys are fixed: the tests are deterministic.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import blockdec
from blockdec.decoding import sampling as sampling_lib
from blockdec.decoding.verify import _pick, greedy_verdict
from tests.helpers import random_model

ALPHA = 1e-3  # A lossless verifier passes; the biased one gives p ~ 1e-30.
PROMPTS = [[1], [2, 3, 0], [4, 1]]  # Ragged: lengths 1, 3, 2.
ROWS_PER_PROMPT = 2500


def _model(vocab=6, seed=0, scale=0.5):
  cfg, params = random_model(1, param_seed=seed, vocab_size=vocab,
                             num_prediction_heads=4, max_seq_len=16)
  # Broad but uneven distributions: every continuation is seen, and the
  # heads' q differs from the target's p (so the residual path is used).
  return cfg, jax.tree_util.tree_map(lambda x: x * scale, params)


def enumerate_continuations(params, cfg, prompt, n, sampling, eos_id=None):
  """{continuation tuple: probability} of every output of up to n tokens."""
  out, frontier = {}, {(): 1.0}
  for _ in range(n):
    if not frontier:  # Every path has ended at EOS.
      break
    prefixes = list(frontier)
    seqs = np.array([list(prompt) + list(p) for p in prefixes], np.int32)
    logits = blockdec.forward_logits(params, cfg, seqs)[:, -1]
    probs = np.asarray(sampling.probs(logits), np.float64)
    nxt = {}
    for prefix, row in zip(prefixes, probs):
      for tok in np.nonzero(row > 0)[0]:
        seq, pr = prefix + (int(tok),), frontier[prefix] * row[tok]
        (out if tok == eos_id else nxt)[seq] = pr
    frontier = nxt
  out.update(frontier)
  assert abs(sum(out.values()) - 1) < 1e-6
  return out


def chi_square_p(counts: dict, expected: dict, total: int) -> float:
  """p-value of observed `counts` against `expected` probabilities; bins
  with expected count < 5 are pooled, and a count outside the support
  fails outright (returns 0)."""
  if set(counts) - set(expected):
    return 0.0
  obs, exp, pool_obs, pool_exp = [], [], 0, 0.0
  for seq, pr in expected.items():
    if pr * total >= 5:
      obs.append(counts.get(seq, 0))
      exp.append(pr * total)
    else:
      pool_obs += counts.get(seq, 0)
      pool_exp += pr * total
  if pool_exp > 0:
    obs.append(pool_obs)
    exp.append(pool_exp)
  if len(obs) < 2:  # One possible outcome, and every draw was it.
    return 1.0
  exp = np.array(exp) * total / np.sum(exp)
  return float(stats.chisquare(obs, exp).pvalue)


def _batch():
  width = max(map(len, PROMPTS))
  prompts = np.zeros((len(PROMPTS) * ROWS_PER_PROMPT, width), np.int32)
  lengths = np.zeros(len(prompts), np.int32)
  for i, p in enumerate(PROMPTS):
    rows = slice(i, None, len(PROMPTS))  # Interleaved: neighbours differ.
    prompts[rows, :len(p)] = p
    lengths[rows] = len(p)
  return prompts, lengths


def sampled_p_values(cfg, params, n, sampling, method, eos_id=None, seed=0,
                     compact_rows=False):
  """One decode of every prompt's rows; the chi-square p-value per prompt."""
  prompts, lengths = _batch()
  out = blockdec.decode(params, cfg, prompts, lengths, n, method=method,
                        sampling=sampling, key=jax.random.key(seed),
                        eos_id=eos_id, compact_rows=compact_rows)
  tokens, lens = np.asarray(out.tokens), np.asarray(out.lengths)
  p_values = []
  for i, prompt in enumerate(PROMPTS):
    rows = range(i, len(prompts), len(PROMPTS))
    counts = {}
    for r in rows:
      seq = tuple(int(t) for t in tokens[r, :lens[r]])
      counts[seq] = counts.get(seq, 0) + 1
    expected = enumerate_continuations(params, cfg, prompt, n, sampling,
                                       eos_id)
    p_values.append(chi_square_p(counts, expected, len(rows)))
  return p_values, out


def assert_lossless(cfg, params, n, sampling, method, eos_id=None):
  """The chi-square test passes, and drafts were both accepted and
  rejected (both paths of the verifier ran)."""
  p_values, out = sampled_p_values(cfg, params, n, sampling, method, eos_id)
  assert min(p_values) > ALPHA, p_values
  hist = np.asarray(out.accepted_hist).sum(0)
  assert hist[0] > 0 and hist[1:].sum() > 0, hist


CASES = [  # (sampling, n, block_size, eos_id)
    (blockdec.Sampling(temperature=1.0), 3, 4, None),
    (blockdec.Sampling(temperature=0.6), 3, 3, None),
    (blockdec.Sampling(temperature=1.5, top_k=3), 3, 4, None),
    (blockdec.Sampling(temperature=0.8, top_p=0.9), 3, 2, None),
    (blockdec.Sampling(temperature=1.0, top_k=4, top_p=0.9), 4, 4, 2),
]


@pytest.mark.parametrize("sampling,n,k,eos_id", CASES)
def test_speculative_sampling_matches_enumerated_distribution(sampling, n, k,
                                                              eos_id):
  cfg, params = _model()
  assert_lossless(cfg, params, n, sampling, blockdec.Blockwise(block_size=k),
                  eos_id)


def test_ancestral_sampling_matches_enumerated_distribution():
  cfg, params = _model(seed=3)
  sampling = blockdec.Sampling(temperature=0.9, top_p=0.95)
  p_values, _ = sampled_p_values(cfg, params, 3, sampling,
                                 blockdec.Autoregressive(), eos_id=1)
  assert min(p_values) > ALPHA, p_values


def test_deterministic_drafts_are_lossless():
  """Refined drafts are deterministic: verified as one-hot q."""
  cfg, params = _model(seed=5)
  sampling = blockdec.Sampling(temperature=0.7)
  p_values, out = sampled_p_values(
      cfg, params, 3, sampling,
      blockdec.Refined(block_size=4, lattice_width=2, beam_width=2))
  assert min(p_values) > ALPHA, p_values
  assert np.asarray(out.accepted_hist)[:, 1:].sum() > 0


class _ResampleFromTarget(blockdec.SpeculativeSampling):
  """A classic bug: after a rejection, draw from p instead of max(0, p - q)."""

  def residual(self, p, q):
    return p


class _AcceptTooOften(blockdec.SpeculativeSampling):
  """Another: accept with probability min(1, sqrt(p / q)) (too often)."""

  def acceptance_ratio(self, p_draft, q_draft):
    return jnp.sqrt(super().acceptance_ratio(p_draft, q_draft))


class _MatchTopTwo(blockdec.SpeculativeSampling):
  """A biased match for deterministic drafts (whose verification uses no
  residual): a draft survives when it is among the target's two likeliest
  tokens (Stern's top-2 rule, lossy)."""

  def _match_draws(self, drafts, logits, sampling, keys):
    top2 = jax.lax.top_k(logits, 2)[1][:, :, :-1]  # [B, C, D, 2]
    v = greedy_verdict(jnp.any(drafts[..., None] == top2, axis=-1), logits)
    log_p = sampling.log_probs(_pick(_pick(logits, v.chain), v.accepted))
    return v.replace(next_token=sampling_lib.sample(
        _pick(keys.next, v.accepted), log_p))


@pytest.mark.parametrize("biased", [_ResampleFromTarget(), _AcceptTooOften()])
def test_statistical_test_rejects_a_biased_verifier(biased):
  cfg, params = _model()
  sampling = blockdec.Sampling(temperature=1.0)
  p_values, _ = sampled_p_values(
      cfg, params, 3, sampling, blockdec.Blockwise(4, acceptance=biased))
  assert min(p_values) < 1e-6, p_values


def test_top_k_one_equals_greedy():
  cfg, params = random_model(2)
  prompts = np.array([[3, 4, 5, 0], [1, 0, 0, 0], [7, 8, 9, 10]], np.int32)
  lengths = np.array([3, 1, 4], np.int32)
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=16)
  one = blockdec.Sampling(temperature=0.7, top_k=1)
  for method in (blockdec.Autoregressive(), blockdec.Blockwise(4)):
    out = blockdec.decode(params, cfg, prompts, lengths, 16, method=method,
                          sampling=one, key=jax.random.key(7))
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_array_equal(out.lengths, greedy.lengths)


def test_same_key_same_output_and_rows_independent_of_neighbours():
  cfg, params = random_model(4)
  rng = np.random.RandomState(0)
  prompts = rng.randint(0, cfg.vocab_size, (6, 5)).astype(np.int32)
  lengths = np.array([5, 2, 4, 1, 3, 5], np.int32)
  sampling = blockdec.Sampling(temperature=1.2)
  run = functools.partial(blockdec.decode, params, cfg, max_new_tokens=24,
                          method=blockdec.Blockwise(4), sampling=sampling,
                          eos_id=3)
  a = run(prompts, lengths, key=jax.random.key(11))
  b = run(prompts, lengths, key=jax.random.key(11))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  c = run(prompts, lengths, key=jax.random.key(12))
  assert not np.array_equal(a.tokens, c.tokens)
  # Other rows' prompts change (and with them when rows finish and are
  # compacted): rows 0 and 3 keep their output.
  others = prompts.copy()
  others[[1, 2, 4, 5]] = rng.randint(0, cfg.vocab_size, (4, 5))
  d = run(others, lengths, key=jax.random.key(11))
  np.testing.assert_array_equal(np.asarray(d.tokens)[[0, 3]],
                                np.asarray(a.tokens)[[0, 3]])
  e = run(prompts, lengths, key=jax.random.key(11), compact_rows=False)
  np.testing.assert_array_equal(e.tokens, a.tokens)


@pytest.mark.torch
def test_sampling_filter_matches_hf_transformers():
  torch = pytest.importorskip("torch")
  generation = pytest.importorskip("transformers.generation.logits_process")
  rng = np.random.RandomState(0)
  logits = rng.randn(5, 11).astype(np.float32) * 2
  logits[0, 3] = logits[0, 5]  # A tie at the top-k boundary.
  for t, k, p in [(1.0, None, None), (0.7, 3, None), (1.3, None, 0.8),
                  (0.9, 4, 0.6), (1.0, 11, 0.999), (2.0, 1, None),
                  (1.0, 5, 0.05)]:
    ours = np.asarray(blockdec.Sampling(t, k, p).probs(jnp.asarray(logits)))
    x = torch.tensor(logits)
    processors = [generation.TemperatureLogitsWarper(t)]
    if k is not None:
      processors.append(generation.TopKLogitsWarper(k))
    if p is not None:
      processors.append(generation.TopPLogitsWarper(p))
    for proc in processors:
      x = proc(None, x)
    theirs = torch.softmax(x, dim=-1).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-6, err_msg=f"{t, k, p}")


def test_filter_worked_example():
  probs = blockdec.Sampling(top_p=0.8).probs(jnp.log(jnp.asarray(
      [0.61, 0.22, 0.085, 0.085])))
  np.testing.assert_allclose(probs, [0.61 / 0.83, 0.22 / 0.83, 0, 0],
                             atol=1e-6)


def test_verifier_worked_example():
  """The module docstring's example in blockdec/decoding/verify.py, with the
  uniforms fixed: b accepted (0.41 < 0.83), c rejected (0.52 > 0.125)."""
  p = jnp.log(jnp.asarray([[[[.3, .5, .2], [.6, .3, .1], [1 / 3] * 3]]]))
  q = jnp.asarray([[[[.2, .6, .2], [.1, .1, .8]]]])
  drafts = jnp.asarray([[[1, 2]]])
  sampling = blockdec.Sampling()
  # Find keys whose uniforms are the example's up to the decision.
  u = lambda k: float(sampling_lib.uniform(k[None])[0])
  keys = [jax.random.key(i) for i in range(200)]
  first = next(k for k in keys if 0.3 < u(k) < 0.8)
  second = next(k for k in keys if 0.125 < u(k) < 0.9)
  accept = jnp.stack([first, second])[None]
  counts = np.zeros(3)
  for i in range(300):
    nxt = jax.random.split(jax.random.key(1000 + i), 3)[None]
    verdict = blockdec.SpeculativeSampling().verify(
        drafts, p, q, sampling,
        blockdec.decoding.verify.VerifyKeys(accept=accept, next=nxt))
    assert int(verdict.accepted[0]) == 1
    counts[int(verdict.next_token[0])] += 1
  # Residual [.5, .2, 0] / .7: token 2 never, token 0 ~ 71%.
  assert counts[2] == 0 and 0.6 < counts[0] / 300 < 0.82


def test_typical_acceptance():
  """Medusa's rule: accept x iff p(x) > min(threshold, alpha * exp(-H))."""
  confident = jnp.log(jnp.asarray([0.9, 0.05, 0.05]))
  flat = jnp.log(jnp.asarray([0.4, 0.35, 0.25]))
  logits = jnp.stack([confident, flat, confident])[None, None]  # [1,1,3,3]
  typical = blockdec.Typical(posterior_threshold=0.3, posterior_alpha=0.3)
  # Draft 1 after the confident node: token 1 (p = .05 < .3) is rejected.
  v = typical.verify(jnp.asarray([[[1, 2]]]), logits, None, None, None)
  assert int(v.accepted[0]) == 0 and int(v.next_token[0]) == 0
  # Draft 0 (p = .9) passes; after the flat node alpha * exp(-H) = .10, so
  # token 2 (p = .25) passes too although it is not the argmax.
  v = typical.verify(jnp.asarray([[[0, 2]]]), logits, None, None, None)
  assert int(v.accepted[0]) == 2 and int(v.next_token[0]) == 0
  assert not typical.lossless and blockdec.Exact().lossless


def test_sampling_errors():
  cfg, params = random_model(0)
  prompts, lengths = np.array([[1, 2]]), np.array([2])
  with pytest.raises(ValueError, match="PRNG key"):
    blockdec.decode(params, cfg, prompts, lengths, 4,
                    sampling=blockdec.Sampling())
  with pytest.raises(ValueError, match="greedy rule"):
    blockdec.decode(params, cfg, prompts, lengths, 4,
                    method=blockdec.Blockwise(2, acceptance=blockdec.TopK(2)),
                    sampling=blockdec.Sampling(), key=jax.random.key(0))
  for bad in (dict(temperature=0), dict(temperature=-1.0), dict(top_k=0),
              dict(top_p=0.0), dict(top_p=1.5)):
    with pytest.raises(ValueError, match="Sampling"):
      blockdec.Sampling(**bad)
  with pytest.raises(TypeError, match="Sampling temperature='1'"):
    blockdec.Sampling(temperature="1")
  with pytest.raises(TypeError, match="Sampling"):
    blockdec.decode(params, cfg, prompts, lengths, 4, sampling=0.7,
                    key=jax.random.key(0))
  # A legacy uint32 key works and equals its typed form.
  a = blockdec.decode(params, cfg, prompts, lengths, 4,
                      sampling=blockdec.Sampling(), key=jax.random.PRNGKey(3))
  b = blockdec.decode(params, cfg, prompts, lengths, 4,
                      sampling=blockdec.Sampling(), key=jax.random.key(3))
  np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize("agree", [0, 2, 3])
def test_oracle_heads_that_are_right_are_accepted(agree):
  """Oracle heads whose q equals the target's p for `agree` drafts: those
  drafts are accepted (ratio 1) unless a token off the ~1 - 1e-3 mode is
  drawn, and a wrong head's draft is rejected (its token has p ~ 1e-4)."""
  from blockdec import decoding  # pylint: disable=g-import-not-at-top
  from tests.helpers import oracle_score_fn  # pylint: disable=g-import-not-at-top
  vocab, k, n = 17, 4, 24
  prompts = jnp.asarray(np.array([[5, 9, 1], [7, 0, 0], [3, 3, 0]], np.int32))
  lengths = jnp.asarray(np.array([3, 1, 2], np.int32))
  options = decoding.DecodeOptions(max_new_tokens=n, block_size=k,
                                   sampling=blockdec.Sampling(1.0))
  out = decoding.blockwise_decode(oracle_score_fn(vocab, k, agree), None,
                                  prompts, lengths, jnp.zeros(()), options,
                                  key=jax.random.key(0))
  per_call = np.asarray(out.lengths).sum() / np.asarray(out.num_calls).sum()
  assert per_call == pytest.approx(min(agree + 1, k), abs=0.15), per_call


def test_demo_reports_the_nll_agreement_it_measured():
  from blockdec import demo
  sampled = dict(nll=0.70, nll_stderr=0.03, ancestral_nll=0.76,
                 ancestral_nll_stderr=0.04)
  assert demo.nll_verdict(sampled).startswith(
      "equal within noise: 1.2 standard errors")
  far = dict(sampled, nll=0.50)
  assert demo.nll_verdict(far).startswith("5.2 standard errors apart: more")
