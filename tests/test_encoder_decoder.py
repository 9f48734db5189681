"""The encoder-decoder: every method decodes a target from a source exactly.

An encoder-decoder (`ModelConfig.encoder_layers > 0`) is decoded through
the same core as an LM, with the source encoded once and carried in the KV
cache. These tests check, over random models, that every exact method gives
plain greedy decoding's tokens for ragged sources and targets with EOS, that
speculative sampling draws the enumerated distribution of continuations of
a source, that the cached decoder equals the uncached forward pass, and that
bad sources are refused with errors that name the value.
"""

import jax
import numpy as np
import pytest

import blockdec
from blockdec.models import transformer
from tests.helpers import mid_way_eos, random_model, ragged_prompts
from tests.test_sampling import ALPHA, _AcceptTooOften, chi_square_p

BOS = 1


def _model(seed, **overrides):
  overrides = {"encoder_layers": 1 + seed % 2, **overrides}
  return random_model(seed, **overrides)


def _sources(seed, batch, width, vocab):
  """Ragged sources [B, S] (garbage past each length) and lengths [B]."""
  sources, lengths = ragged_prompts(seed + 100, batch, width, vocab)
  rng = np.random.RandomState(seed)
  pad = np.arange(width)[None, :] >= lengths[:, None]
  sources[pad] = rng.randint(0, vocab, size=pad.sum())
  return sources, lengths


def _targets(seed, batch, vocab):
  """Target starts: BOS, then up to two forced tokens (ragged)."""
  rng = np.random.RandomState(seed + 7)
  prompts = np.full((batch, 3), BOS, np.int32)
  prompts[:, 1:] = rng.randint(3, vocab, size=(batch, 2))
  return prompts, rng.randint(1, 4, size=batch).astype(np.int32)


ARCHITECTURES = [
    dict(),
    dict(position="learned", norm="layernorm", mlp="gelu"),
    dict(n_kv_heads=1, head_type="hydra"),
    dict(tie_embeddings=False),
]


def _methods(hydra: bool):
  """Every drafting method with an exact verifier (each compiles once)."""
  methods = [blockdec.Blockwise(block_size=2), blockdec.Blockwise(block_size=8),
             blockdec.Blockwise(block_size=4,
                                adaptive=blockdec.AdaptiveBlockSize()),
             blockdec.PromptLookup(ngram=2, block_size=4),
             blockdec.Lookahead(),
             blockdec.Blockwise(block_size=4,
                                tree=blockdec.DynamicTree(nodes=6, top_k=2))]
  if not hydra:
    methods += [blockdec.Refined(block_size=4, num_drafts=2),
                blockdec.Blockwise(tree=blockdec.DraftTree.from_parents(
                    (-1, 0, 0, 1, 2)))]
  return methods


@pytest.mark.parametrize("arch", range(len(ARCHITECTURES)))
def test_every_exact_method_equals_greedy(arch):
  """Ragged sources and targets, EOS mid-way, compaction on (the default;
  off for one method): each method's tokens equal greedy decoding's."""
  n, batch = 24, 5 - arch  # Batch sizes 5, 4, 3, 2.
  cfg, params = _model(arch, **ARCHITECTURES[arch])
  sources, source_lengths = _sources(arch, batch, 11, cfg.vocab_size)
  prompts, lengths = _targets(arch, batch, cfg.vocab_size)
  src = dict(source=sources, source_lengths=source_lengths)
  free = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                max_new_tokens=n, **src)
  eos = int(np.asarray(free.tokens)[batch // 2, n // 3])
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=n, eos_id=eos, **src)
  assert np.asarray(greedy.lengths).min() < n  # EOS cut a row short.
  # Each architecture runs half of the methods (every method runs on two
  # architectures): one compilation per method and model.
  methods = _methods(cfg.head_type == "hydra")[arch % 2::2]
  for i, method in enumerate(methods):
    out = blockdec.decode(params, cfg, prompts, lengths, n, method=method,
                          eos_id=eos, compact_rows=i != arch, **src)
    np.testing.assert_array_equal(out.tokens, greedy.tokens,
                                  err_msg=f"{method}")
    np.testing.assert_array_equal(out.lengths, greedy.lengths)


def test_batch_of_one():
  cfg, params = _model(5)
  sources, source_lengths = _sources(5, 1, 7, cfg.vocab_size)
  prompts = np.full((1, 1), BOS, np.int32)
  kw = dict(source=sources, source_lengths=source_lengths)
  greedy = blockdec.greedy_decode(params, cfg, prompts, [1],
                                  max_new_tokens=20, **kw)
  out = blockdec.blockwise_decode(params, cfg, prompts, [1],
                                  max_new_tokens=20, block_size=6, **kw)
  np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_decoder_equals_the_uncached_forward_pass_and_reads_the_source():
  cfg, params = _model(0)
  sources, source_lengths = _sources(0, 4, 9, cfg.vocab_size)
  prompts = np.full((4, 1), BOS, np.int32)
  lengths = np.ones(4, np.int32)
  out = blockdec.blockwise_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=12, block_size=4,
                                  source=sources,
                                  source_lengths=source_lengths)
  seqs = np.concatenate([prompts, np.asarray(out.tokens)], axis=1)
  logits = blockdec.forward_logits(params, cfg, seqs, source=sources,
                                   source_lengths=source_lengths)
  # Teacher-forced argmaxes along the decoded text are the decoded text.
  np.testing.assert_array_equal(np.argmax(logits[:, :-1], -1), out.tokens)
  # Padding past a source's length is never read ...
  garbage = sources.copy()
  garbage[np.arange(9)[None] >= source_lengths[:, None]] = 3
  again = blockdec.blockwise_decode(params, cfg, prompts, lengths,
                                    max_new_tokens=12, block_size=4,
                                    source=garbage,
                                    source_lengths=source_lengths)
  np.testing.assert_array_equal(again.tokens, out.tokens)
  # ... also ids outside the vocabulary, under the caller's jit (where the
  # host checks cannot read the lengths).
  garbage[np.arange(9)[None] >= source_lengths[:, None]] = 12345
  traced = jax.jit(lambda src, n: blockdec.blockwise_decode(
      params, cfg, prompts, lengths, max_new_tokens=12, block_size=4,
      source=src, source_lengths=n).tokens)
  np.testing.assert_array_equal(traced(garbage, source_lengths), out.tokens)
  # ... and the source itself is: other sources, other translations.
  other = blockdec.blockwise_decode(params, cfg, prompts, lengths,
                                    max_new_tokens=12, block_size=4,
                                    source=(sources + 1) % cfg.vocab_size,
                                    source_lengths=source_lengths)
  assert (np.asarray(other.tokens) != np.asarray(out.tokens)).any()


def test_head_predictions_of_a_translation_follow_its_greedy_output():
  from blockdec.analysis import draft_statistics, head_predictions
  cfg, params = _model(0)
  sources, source_lengths = _sources(0, 4, 9, cfg.vocab_size)
  prompts = np.full((4, 1), BOS, np.int32)
  lengths = np.ones(4, np.int32)
  kw = dict(source=sources, source_lengths=source_lengths)
  free = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                max_new_tokens=12, **kw)
  eos = int(np.asarray(free.tokens)[2, 4])  # Ends row 2 (at least) early.
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=12, eos_id=eos, **kw)
  log_probs, targets, valid = head_predictions(
      params, cfg, prompts, lengths, max_new_tokens=12, num_heads=3,
      eos_id=eos, **kw)
  gen_lengths = np.asarray(greedy.lengths)
  assert gen_lengths.min() < 12  # EOS ended a row early ...
  # ... and the positions are each row's own: one per generated token.
  assert log_probs.shape == (gen_lengths.sum(), 3, cfg.vocab_size)
  np.testing.assert_array_equal(
      targets[:gen_lengths[0], 0], np.asarray(greedy.tokens)[0, :gen_lengths[0]])
  assert not valid[gen_lengths[0] - 1, 1]  # Nothing follows the row's end.
  stats = draft_statistics(log_probs, targets, valid)
  assert stats["accuracy"][0] == pytest.approx(1.0)  # Head 1 is greedy.
  # The heads read the source: another source, other predictions.
  other, _, _ = head_predictions(
      params, cfg, prompts, lengths, max_new_tokens=12, num_heads=3,
      source=(sources + 1) % cfg.vocab_size, source_lengths=source_lengths)
  assert other.shape != log_probs.shape or not np.allclose(other, log_probs)


def test_a_row_does_not_depend_on_its_neighbours():
  cfg, params = _model(1)
  sources, source_lengths = _sources(1, 6, 10, cfg.vocab_size)
  prompts, lengths = _targets(1, 6, cfg.vocab_size)
  sampling = blockdec.Sampling(temperature=1.0)
  alone = blockdec.decode(params, cfg, prompts[2:3], lengths[2:3], 16,
                          method=blockdec.Blockwise(block_size=4),
                          sampling=sampling, key=jax.random.key(5),
                          source=sources[2:3],
                          source_lengths=source_lengths[2:3])
  # Row 2 alone is row 0 of its own batch: keys follow the row's index, so
  # compare against a batch where it is row 0 too.
  shifted = blockdec.decode(params, cfg, prompts[2:], lengths[2:], 16,
                            method=blockdec.Blockwise(block_size=4),
                            sampling=sampling, key=jax.random.key(5),
                            source=sources[2:],
                            source_lengths=source_lengths[2:])
  np.testing.assert_array_equal(alone.tokens[0], shifted.tokens[0])
  assert (np.asarray(shifted.tokens)[1:] != np.asarray(alone.tokens)).any()


def _enumerate(params, cfg, source, prompt, n, sampling):
  """{continuation: probability} of every n-token target continuation."""
  frontier = {(): 1.0}
  for _ in range(n):
    prefixes = list(frontier)
    seqs = np.array([list(prompt) + list(p) for p in prefixes], np.int32)
    logits = blockdec.forward_logits(
        params, cfg, seqs, source=np.repeat(source[None], len(seqs), 0),
        source_lengths=np.full(len(seqs), len(source), np.int32))[:, -1]
    probs = np.asarray(sampling.probs(logits), np.float64)
    frontier = {prefix + (int(t),): frontier[prefix] * row[t]
                for prefix, row in zip(prefixes, probs)
                for t in np.nonzero(row > 0)[0]}
  return frontier


@pytest.mark.parametrize("verifier,lossless,rows",
                         [(blockdec.Exact(), True, 2500),
                          (_AcceptTooOften(), False, 1000)])
def test_speculative_sampling_of_a_translation_is_lossless(verifier, lossless,
                                                          rows):
  """Two sources, one batch: each source's sampled continuations follow
  the enumerated distribution (and a biased verifier fails the test)."""
  cfg, params = random_model(1, param_seed=3, vocab_size=6, encoder_layers=1,
                             num_prediction_heads=4, max_seq_len=16)
  params = jax.tree_util.tree_map(lambda x: x * 0.5, params)
  sources = [np.array([2, 5, 3], np.int32), np.array([4, 4, 1], np.int32)]
  n = 3
  sampling = blockdec.Sampling(temperature=0.8, top_k=5)
  source = np.stack([sources[i % 2] for i in range(2 * rows)])
  source_lengths = np.array([3, 2] * rows, np.int32)  # Ragged: 3 and 2.
  prompts = np.full((2 * rows, 1), BOS, np.int32)
  out = blockdec.decode(params, cfg, prompts, np.ones(2 * rows, np.int32), n,
                        method=blockdec.Blockwise(block_size=3,
                                                  acceptance=verifier),
                        sampling=sampling, key=jax.random.key(0),
                        source=source, source_lengths=source_lengths)
  tokens = np.asarray(out.tokens)
  p_values = []
  for i, length in enumerate((3, 2)):
    counts = {}
    for seq in map(tuple, tokens[i::2].tolist()):
      counts[seq] = counts.get(seq, 0) + 1
    expected = _enumerate(params, cfg, sources[i][:length], [BOS], n, sampling)
    p_values.append(chi_square_p(counts, expected, rows))
  assert (min(p_values) > ALPHA) == lossless, p_values


def test_source_errors():
  cfg, params = _model(0)
  prompts, lengths = np.full((2, 1), BOS, np.int32), np.ones(2, np.int32)
  sources = np.full((2, 4), 3, np.int32)
  decode = lambda **kw: blockdec.decode(params, cfg, prompts, lengths, 4,
                                        **kw)
  with pytest.raises(ValueError, match="encoder-decoder.*pass source"):
    decode()
  with pytest.raises(ValueError, match=r"source_lengths=\[0, 4\]"):
    decode(source=sources, source_lengths=[0, 4])
  with pytest.raises(ValueError, match=r"source_lengths=\[2, 5\]"):
    decode(source=sources, source_lengths=[2, 5])
  with pytest.raises(ValueError, match="source must be a non-empty"):
    decode(source=sources[:1], source_lengths=[4])
  bad = sources.copy()
  bad[1, 0] = cfg.vocab_size
  with pytest.raises(ValueError, match=f"token id {cfg.vocab_size} outside"):
    decode(source=bad, source_lengths=[4, 4])
  bad[1, 3] = -5  # Past the row's length: padding is never checked.
  decode(source=np.where(bad < 0, bad, 3), source_lengths=[4, 3])
  with pytest.raises(ValueError, match="DraftModel"):
    decode(source=sources, source_lengths=[4, 4],
           method=blockdec.DraftModel(cfg, params, block_size=2))
  lm_cfg, lm_params = random_model(0)
  with pytest.raises(ValueError, match="decoder-only"):
    blockdec.decode(lm_params, lm_cfg, prompts, lengths, 4, source=sources,
                    source_lengths=[4, 4])
  with pytest.raises(ValueError, match="needs its source"):
    transformer.apply(params, cfg, prompts, np.zeros_like(prompts))
  with pytest.raises(ValueError, match="encoder-decoder"):
    blockdec.export_hf_checkpoint(cfg, params, "/nonexistent/never_written")
  with pytest.raises(ValueError, match="encoder_layers"):
    blockdec.ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=1,
                         encoder_layers=-1)
