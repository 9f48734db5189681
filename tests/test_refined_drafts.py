"""Refined block drafts (Kim et al. 2024): n-gram LM, lattice beam search,
tree verification of several drafts, and exactness for every draft source."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blockdec
from blockdec import decoding
from blockdec import kernels
from blockdec.decoding import (DecodeOptions, DraftOptions, DraftTree, NGramLM,
                               NeuralRescorer, top_k_lattice)
from blockdec.decoding.lattice import small_top_k
from blockdec.decoding.rescoring import beam_search, ngram_scorer
from blockdec.models import transformer
from tests.helpers import (assert_same_or_near_tie, mid_way_eos,
                           ragged_prompts, random_model)

# ------------------------------------------------------------------ n-gram LM


def _random_docs(seed, vocab, num=12, max_len=60):
  rng = np.random.RandomState(seed)
  # A skewed, repetitive source so that higher orders see repeated n-grams.
  return [rng.choice(vocab, size=rng.randint(1, max_len),
                     p=np.arange(vocab, 0, -1) / np.arange(vocab, 0, -1).sum())
          for _ in range(num)]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ngram_probabilities_normalise(order):
  vocab = 7
  lm = NGramLM.build(_random_docs(order, vocab), order, vocab)
  rng = np.random.RandomState(0)
  context = rng.randint(-1, vocab, size=(40, order - 1))
  context[:5] = -1  # nothing known: the unigram
  if order > 1:
    context[5:10, -1] = vocab - 1  # a rare token after arbitrary history
  candidates = np.broadcast_to(np.arange(vocab), (40, vocab))
  probs = np.exp(np.asarray(lm.log_prob(context, candidates), np.float64))
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=2e-6)
  assert np.all(probs > 0)
  if order > 1:
    np.testing.assert_allclose(probs[0], np.asarray(lm.unigram), rtol=1e-6)


def test_ngram_matches_hand_computed_values():
  # Corpus "abab" + "c" over V = 3 (a=0, b=1, c=2), order 2, D = 0.5.
  lm = NGramLM.build([np.array([0, 1, 0, 1]), np.array([2])], 2, 3,
                     discounts=[0.5, 0.5])
  # Continuation unigram: a and b each follow one distinct token, c none.
  p1 = np.array([(1 - .5 + .5 * 2 / 3) / 2, (1 - .5 + .5 * 2 / 3) / 2,
                 (.5 * 2 / 3) / 2])
  np.testing.assert_allclose(np.asarray(lm.unigram), p1, rtol=1e-6)
  got = np.exp(np.asarray(lm.log_prob(np.array([[0], [1], [2], [-1]]),
                                      np.broadcast_to(np.arange(3), (4, 3)))))
  # After a: c(ab) = 2, C(a) = 2, one type -> (2 - .5)/2 + .5 * 1/2 * P1.
  np.testing.assert_allclose(got[0], [.25 * p1[0], .75 + .25 * p1[1],
                                      .25 * p1[2]], rtol=1e-6)
  # After b: c(ba) = 1, C(b) = 1 -> (1 - .5)/1 + .5 * P1.
  np.testing.assert_allclose(got[1], [.5 + .5 * p1[0], .5 * p1[1],
                                      .5 * p1[2]], rtol=1e-6)
  # c is never followed, and -1 is unknown: both back off to P1 entirely.
  np.testing.assert_allclose(got[2], p1, rtol=1e-6)
  np.testing.assert_allclose(got[3], p1, rtol=1e-6)


def test_ngram_backs_off_on_unseen_contexts(tmp_path):
  vocab = 9
  docs = [np.array([1, 2, 3, 1, 2, 4, 5, 2, 3] * 3)]
  lm = NGramLM.build(docs, 3, vocab)
  cands = np.broadcast_to(np.arange(vocab), (3, vocab))
  # (7, 2) and (8, 2) never occur: both reduce to the bigram after 2, which
  # is also what a context with an unknown first token gives.
  lp = np.asarray(lm.log_prob(np.array([[7, 2], [8, 2], [-1, 2]]), cands))
  np.testing.assert_allclose(lp[0], lp[1], rtol=1e-6)
  np.testing.assert_allclose(lp[0], lp[2], rtol=1e-6)
  seen = np.asarray(lm.log_prob(np.array([[1, 2]]), cands[:1]))[0]
  assert seen[3] > lp[0][3] and seen[4] > lp[0][4] - 1e-6  # 1 2 -> 3 or 4
  assert np.argmax(seen) in (3, 4) and np.exp(seen).sum() == pytest.approx(1, abs=1e-5)
  # Round trip through safetensors.
  lm.save(str(tmp_path / "lm.safetensors"))
  again = NGramLM.load(str(tmp_path / "lm.safetensors"))
  np.testing.assert_array_equal(
      np.asarray(again.log_prob(np.array([[1, 2]]), cands[:1])), seen[None])
  assert again.discounts == lm.discounts
  seq = np.asarray(lm.sequence_log_probs(docs[0][:10]))
  assert seq.shape == (10,) and np.all(np.isfinite(seq))


def test_ngram_hash_lookup_equals_sorted_search():
  """Every stored m-gram is found at its index in the sorted key table, and
  any other (context, token) pair is reported absent (-1)."""
  vocab = 40
  lm = NGramLM.build(_random_docs(5, vocab, num=30, max_len=200), 4, vocab)
  rng = np.random.default_rng(0)
  for m in range(2, 5):
    keys = np.asarray(lm.keys[m - 2])[:-1]  # without the sentinel
    assert lm.probes[m - 2] >= 1 and keys.size > 50
    find = jax.jit(lambda c, t, m=m: lm._find(m, c, t))
    got = np.asarray(find(jnp.asarray(keys // vocab), jnp.asarray(keys % vocab)))
    np.testing.assert_array_equal(got, np.arange(keys.size))
    ctx = rng.integers(-1, keys.max() // vocab + 2, 3000)
    tok = rng.integers(-1, vocab, 3000)
    query = ctx * vocab + tok
    pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    want = np.where((ctx >= 0) & (tok >= 0) & (keys[pos] == query), pos, -1)
    np.testing.assert_array_equal(np.asarray(find(jnp.asarray(ctx),
                                                  jnp.asarray(tok))), want)


def test_ngram_rejects_bad_input():
  with pytest.raises(ValueError, match="order=0"):
    NGramLM.build([np.array([1, 2])], 0, 5)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    NGramLM.build([np.array([1, 7])], 2, 5)
  lm = NGramLM.build([np.array([1, 2])], 3, 5)
  with pytest.raises(ValueError, match="needs 2"):
    lm.log_prob(np.zeros((1, 1), np.int32), np.zeros((1, 1), np.int32))


# --------------------------------------------------------------- beam search


def _brute_force(lattice, ngram=None, history=None, weight=0.0):
  """All paths with their scores, for row 0 of `lattice`."""
  tokens = np.asarray(lattice.tokens[0])
  log_probs = np.asarray(lattice.log_probs[0])
  k, width = tokens.shape
  out = []
  for choice in itertools.product(*[range(width if j else 1) for j in range(k)]):
    path = [int(tokens[j, c]) for j, c in enumerate(choice)]
    score = sum(float(log_probs[j, c]) for j, c in enumerate(choice))
    if ngram is not None:
      seq = list(np.asarray(history[0])) + path
      h = len(history[0])
      for j in range(1, k):
        ctx = np.array(seq[h + j - ngram.context_len:h + j])[None]
        score += weight * float(ngram.log_prob(ctx, np.array([[path[j]]]))[0, 0])
    out.append((score, path))
  return sorted(out, key=lambda x: -x[0])


def test_beam_search_returns_the_true_top_paths():
  rng = np.random.RandomState(3)
  vocab, k, width = 11, 4, 3
  logits = jnp.asarray(rng.randn(1, k, vocab) * 2)
  lattice = top_k_lattice(logits, width)
  assert int(lattice.tokens[0, 0, 0]) == int(jnp.argmax(logits[0, 0]))
  # Head scores alone: depths are independent, width p is exact.
  drafts, scores, _ = beam_search(lattice, 5, 5)
  want = _brute_force(lattice)[:5]
  np.testing.assert_array_equal(np.asarray(drafts[0]), [w[1] for w in want])
  np.testing.assert_allclose(np.asarray(scores[0]), [w[0] for w in want],
                             rtol=1e-5)
  # With a trigram term, W >= K^(k-2) keeps every prefix: exact again.
  lm = NGramLM.build(_random_docs(5, vocab, num=30), 3, vocab)
  history = jnp.asarray([[4, 2]], jnp.int32)
  scorer = ngram_scorer(lm, history, lattice, 0.7)
  drafts, scores, _ = beam_search(lattice, 6, width ** (k - 2), scorer)
  want = _brute_force(lattice, lm, history, 0.7)[:6]
  np.testing.assert_allclose(np.asarray(scores[0]), [w[0] for w in want],
                             rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(drafts[0]), [w[1] for w in want])
  # Plain argmax path with W = 1.
  drafts, _, _ = beam_search(lattice, 1, 1)
  np.testing.assert_array_equal(drafts[:, 0], lattice.argmax_path())


def test_small_top_k_equals_lax_top_k_with_ties():
  rng = np.random.default_rng(3)
  for shape, k in (((3, 5, 256), 4), ((2, 7), 7), ((4, 9), 1)):
    x = jnp.asarray(rng.integers(0, 5, shape).astype(np.float32))  # ties
    want, got = jax.lax.top_k(x, k), small_top_k(x, k)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_draft_tree_layout():
  tree = DraftTree(2, 3)
  assert tree.parents == (-1, 0, 1, 0, 3)
  np.testing.assert_array_equal(tree.depths, [0, 1, 2, 1, 2])
  np.testing.assert_array_equal(tree.paths, [[0, 1, 2], [0, 3, 4]])
  drafts = jnp.asarray([[[5, 6, 7], [5, 8, 9]]])
  np.testing.assert_array_equal(tree.flatten(drafts), [[5, 6, 7, 8, 9]])
  assert DraftTree(1, 4).parents == (-1, 0, 1, 2)  # a chain


# --------------------------------------------------- tree attention, cache


_apply = jax.jit(transformer.apply, static_argnames=("cfg", "mask"))


@pytest.mark.parametrize("backend,batch,p,k", [("xla", 2, 3, 4),
                                               ("pallas", 1, 2, 3)])
def test_tree_call_equals_separate_chains(backend, batch, p, k):
  """Each draft's logits in one tree call equal a causal call on that draft."""
  cfg, params = random_model(4, attention_backend=backend)
  prompt_len = 5
  tree = DraftTree(p, k)
  rng = np.random.RandomState(0)
  prompts = jnp.asarray(rng.randint(0, cfg.vocab_size, (batch, prompt_len)))
  drafts = jnp.asarray(rng.randint(0, cfg.vocab_size, (batch, p, k)))
  drafts = drafts.at[:, :, 0].set(drafts[:, :1, 0])
  positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
  cache = transformer.make_cache(cfg, batch, prompt_len + tree.size)
  _, cache = _apply(params, cfg=cfg, tokens=prompts, positions=positions,
                    cache=cache)
  tree_pos = prompt_len + jnp.asarray(tree.depths)[None].repeat(batch, 0)
  logits, tree_cache = _apply(params, cfg=cfg, tokens=tree.flatten(drafts),
                              positions=tree_pos, cache=cache,
                              mask=kernels.TreeMask(tree.parents))
  chain_pos = prompt_len + jnp.arange(k)[None].repeat(batch, 0)
  for c in range(p):
    want, chain_cache = _apply(params, cfg=cfg, tokens=drafts[:, c],
                               positions=chain_pos, cache=cache)
    got = logits[:, tree.paths[c]]
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
    # Moving draft c's slots back to consecutive ones gives the chain's cache.
    src = prompt_len + jnp.asarray(tree.paths[c])[None].repeat(batch, 0)
    moved = tree_cache.move_slots(src, jnp.full((batch,), prompt_len),
                                  jnp.full((batch,), prompt_len + k))
    n = prompt_len + k  # slots: last axis of the keys, -2 of the values
    for got_k, want_k in zip(moved.k, chain_cache.k):
      np.testing.assert_allclose(got_k[..., :n], want_k[..., :n], atol=1e-5)
    for got_v, want_v in zip(moved.v, chain_cache.v):
      np.testing.assert_allclose(got_v[..., :n, :], want_v[..., :n, :],
                                 atol=1e-5)
    np.testing.assert_array_equal(moved.end_index, prompt_len + k)


# ------------------------------------------------------------- oracle loops

VOCAB = 23


def _rule(t):
  return (3 * t + 1) % VOCAB


def _lattice_oracle(k, wrong_depth):
  """Heads right everywhere except depth `wrong_depth`, where the right token
  is their second choice (logit 9.5 against 10 for a wrong one)."""

  def score(params, tokens, positions, cache, mask=None):
    del params, positions, mask  # position-free: any tree works
    outs, tok = [], tokens
    for j in range(k):
      tok = _rule(tok)
      logits = 10.0 * jax.nn.one_hot(tok, VOCAB)
      if j == wrong_depth:
        logits = 10.0 * jax.nn.one_hot(_rule(tok), VOCAB) + 9.5 * jax.nn.one_hot(tok, VOCAB)
      outs.append(logits)
    return jnp.stack(outs, axis=2), cache

  return score


def _small_lm_oracle(params, tokens, positions, cache, mask=None):
  del params, positions, mask
  return 10.0 * jax.nn.one_hot(_rule(tokens), VOCAB)[:, :, None], cache


def _oracle_ngram():
  rng = np.random.RandomState(0)
  docs = []
  for _ in range(20):
    seq = [rng.randint(VOCAB)]
    for _ in range(40):
      seq.append(_rule(seq[-1]))
    docs.append(np.array(seq))
  return NGramLM.build(docs, 2, VOCAB)


def _oracle_greedy(prompt, n):
  seq = list(prompt)
  for _ in range(n):
    seq.append(_rule(seq[-1]))
  return seq[len(prompt):]


@pytest.mark.parametrize("source,p", [("heads", 1), ("heads", 2),
                                      ("ngram", 1), ("neural", 1),
                                      ("ngram+neural", 3),
                                      ("neural-parallel", 1)])
def test_oracle_second_choice_is_recovered(source, p):
  k, wrong, n = 6, 3, 24
  prompts = np.array([[1, 2, 3], [4, 0, 0]], np.int32)
  lengths = np.array([3, 1], np.int32)
  kw = {}
  if "ngram" in source:
    kw["ngram"] = _oracle_ngram()
  if "neural" in source:
    kw["rescorer"] = NeuralRescorer(params=None, cache=jnp.zeros(()),
                                    score_fn=_small_lm_oracle)
  # The parallel small LM conditions on the heads' (wrong) argmax prefix
  # past the wrong depth, so it gets a weight the heads there outvote.
  drafts = DraftOptions(num_drafts=p, lattice_width=3,
                        beam_width=4 if p == 3 else None,
                        ngram_weight=1.0 if "ngram" in source else 0.0,
                        neural_weight=(0.5 if "parallel" in source else 1.0)
                        if "neural" in source else 0.0,
                        neural_parallel="parallel" in source)
  out = decoding.refined_blockwise_decode(
      _lattice_oracle(k, wrong), None, jnp.asarray(prompts),
      jnp.asarray(lengths), jnp.zeros(()), DecodeOptions(n, k), drafts,
      compact_fn=lambda c, *_: c, **kw)
  for b in range(2):
    np.testing.assert_array_equal(out.tokens[b],
                                  _oracle_greedy(prompts[b, :lengths[b]], n))
  # Plain heads accept the `wrong` correct depths per call; any source that
  # puts the second choice in a draft accepts whole blocks.
  per_call = wrong if source == "heads" and p == 1 else k
  np.testing.assert_array_equal(out.num_calls, -(-n // per_call))


# ------------------------------------------------ exactness on real models

# One architecture and prompt shape for all cases, so the greedy references
# compile once per EOS setting; the cases vary source, k, p and beam width.
EXACT_ARCH, EXACT_BATCH = 5, 3
EXACT_CASES = [  # (source, k, p, beam, with_eos)
    ("heads", 8, 4, None, True),
    ("ngram", 3, 2, None, False),
    ("neural", 5, 3, None, True),
    ("ngram+neural", 4, 2, 3, False),
]


@pytest.mark.parametrize("source,k,p,beam,with_eos", EXACT_CASES)
def test_refined_decode_equals_greedy(source, k, p, beam, with_eos):
  n, max_prompt = 18, 6
  arch, batch = EXACT_ARCH, EXACT_BATCH
  eos_id = None
  for seed in range(2):
    cfg, params = random_model(arch, param_seed=100 * arch + seed)
    if seed == 1:  # heads that copy head 1 agree on repeats: ragged accepts
      params = jax.device_put({**params, "proposal_heads":
                               jax.tree_util.tree_map(
                                   np.zeros_like, params["proposal_heads"])})
    prompts, lengths = ragged_prompts(7 * k + seed, batch, max_prompt,
                                      cfg.vocab_size)
    if with_eos and eos_id is None:
      eos_id = mid_way_eos(cfg, params, prompts, lengths, n)
    kw = {}
    if "ngram" in source:
      kw["ngram"] = NGramLM.build(_random_docs(arch, cfg.vocab_size, 20), 3,
                                  cfg.vocab_size)
    if "neural" in source:
      kw["rescorer"] = random_model(arch, param_seed=999 + seed,
                                    num_prediction_heads=1)
      kw["rescorer_parallel"] = source == "ngram+neural"
    greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                    max_new_tokens=n, eos_id=eos_id)
    out = blockdec.refined_blockwise_decode(
        params, cfg, prompts, lengths, max_new_tokens=n, block_size=k,
        num_drafts=p, lattice_width=3, beam_width=beam, eos_id=eos_id, **kw)
    assert_same_or_near_tie(cfg, params, prompts, lengths, greedy, out)
    np.testing.assert_array_equal(out.lengths, greedy.lengths)
    calls, lens = np.asarray(out.num_calls), np.asarray(out.lengths)
    assert np.all(np.ceil(lens / k) <= calls) and np.all(calls <= lens)
    hist = np.asarray(out.accepted_hist)
    np.testing.assert_array_equal(hist.sum(-1), calls)
    np.testing.assert_array_equal((hist * np.arange(1, k + 1)).sum(-1), lens)


@pytest.mark.parametrize("estimate", ["history", "confidence"])
def test_refined_through_the_core_adaptive_and_compaction(estimate):
  """Refined drafts get what every method of the core gets: the adaptive
  draft length and row compaction, with the output still greedy's and
  compaction changing nothing."""
  cfg, params = random_model(EXACT_ARCH, param_seed=7)
  params = jax.device_put({**params, "proposal_heads": jax.tree_util.tree_map(
      np.zeros_like, params["proposal_heads"])})
  prompts, lengths = ragged_prompts(11, 5, 6, cfg.vocab_size)
  ngram = NGramLM.build(_random_docs(EXACT_ARCH, cfg.vocab_size, 20), 3,
                        cfg.vocab_size)
  method = blockdec.Refined(block_size=6, lattice_width=3, ngram=ngram,
                            adaptive=blockdec.AdaptiveBlockSize(
                                0.2, estimate=estimate))
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=24, eos_id=3)
  outs = [blockdec.decode(params, cfg, prompts, lengths, 24, method=method,
                          eos_id=3, compact_rows=c) for c in (True, False)]
  assert_same_or_near_tie(cfg, params, prompts, lengths, greedy, outs[0])
  for field in ("tokens", "lengths", "num_calls", "accepted_hist"):
    np.testing.assert_array_equal(getattr(outs[0], field),
                                  getattr(outs[1], field), err_msg=field)
  if estimate == "history":  # Untried depths look certain: drafts are tried.
    assert np.asarray(outs[0].accepted_hist)[:, 1:].sum() > 0


def test_refined_decode_rejects_bad_arguments():
  cfg, params = random_model(EXACT_ARCH)
  prompts, lengths = ragged_prompts(0, 2, 4, cfg.vocab_size)
  call = lambda **kw: blockdec.refined_blockwise_decode(
      params, cfg, prompts, lengths, max_new_tokens=4, **kw)
  with pytest.raises(ValueError, match="num_drafts=0"):
    call(num_drafts=0)
  with pytest.raises(ValueError, match="beam_width=1"):
    call(num_drafts=2, beam_width=1)
  with pytest.raises(ValueError, match="lattice_width"):
    call(lattice_width=cfg.vocab_size + 1)
  with pytest.raises(ValueError, match="vocab_size"):
    call(ngram=NGramLM.build([np.array([1, 2])], 2, cfg.vocab_size + 1))
  other, other_params = random_model(EXACT_ARCH, vocab_size=cfg.vocab_size + 1,
                                     num_prediction_heads=1)
  with pytest.raises(ValueError, match="rescorer's vocab_size"):
    call(rescorer=(other, other_params))


# ------------------------------------------------------------------ analysis


def test_draft_statistics_on_a_hand_made_lattice(tmp_path):
  from blockdec.analysis import draft_statistics, plot_draft_statistics
  vocab = 5
  # Two positions, k = 3 heads. Heads rank tokens 0 > 1 > 2 > ...
  base = np.log(np.array([0.5, 0.25, 0.125, 0.0625, 0.0625]))
  log_probs = np.broadcast_to(base, (2, 3, vocab)).copy()
  targets = np.array([[0, 1, 0], [0, 0, 3]])  # ranks [[0,1,0],[0,0,3]]
  valid = np.array([[True, True, True], [True, True, False]])
  stats = draft_statistics(log_probs, targets, valid, widths=(1, 2, 4))
  np.testing.assert_allclose(stats["accuracy"], [1.0, 0.5, 1.0])
  np.testing.assert_allclose(stats["coverage"][2], [1.0, 1.0, 1.0])
  # Row 0: depth 1 missed at K=1 -> 1; row 1: depth 1 hit, depth 2 invalid -> 2.
  assert stats["oracle_block"][1] == pytest.approx(1.5)
  assert stats["oracle_block"][2] == pytest.approx(2.5)
  np.testing.assert_allclose(stats["draft_repetition"], [1.0, 1.0])
  np.testing.assert_allclose(stats["text_repetition"], [0.5, 0.0])
  np.testing.assert_allclose(stats["confidence"], 0.5)
  plot_draft_statistics(stats, tmp_path / "drafts.png")
  assert (tmp_path / "drafts.png").stat().st_size > 0


def test_head_predictions_follow_the_greedy_continuation():
  from blockdec.analysis import draft_statistics, head_predictions
  cfg, params = random_model(EXACT_ARCH)
  # The exactness tests' shapes: the greedy decode is compiled already.
  prompts, lengths = ragged_prompts(3, EXACT_BATCH, 6, cfg.vocab_size)
  log_probs, targets, valid = head_predictions(params, cfg, prompts, lengths,
                                               max_new_tokens=18, num_heads=3)
  assert log_probs.shape == (3 * 18, 3, cfg.vocab_size)
  assert np.all(valid[:, 0]) and not np.all(valid[:, 2])
  stats = draft_statistics(log_probs, targets, valid)
  assert stats["accuracy"][0] == pytest.approx(1.0)  # head 1 is greedy
  assert stats["coverage"][1][0] == pytest.approx(1.0)
