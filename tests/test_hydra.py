"""Hydra's dependent heads: exact under greedy, lossless with sampling,
trained on a frozen trunk.

Exactness: seeded sweeps over random architectures, ragged batches, block
sizes and EOS, token for token against the plain greedy loop. Alignment: a
"bigram" target (attention and MLP outputs zeroed, so the next token depends
on the current one alone) with heads that copy the last token they read
(head j's join keeps only the embedding of token t + j - 1): its drafts are
right only if every head reads the decided token and the drafts before its
own, in order, so every call accepts the whole block; Stern's heads cannot
do that. Lossless sampling: the chi-square test of tests/test_sampling.py,
with a biased verifier rejected.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blockdec
from blockdec import api
from blockdec.models import transformer
from blockdec.training import losses, train
from tests.helpers import ragged_prompts, random_model, tiny_config
from tests.test_exactness import check_against_greedy
from tests.test_sampling import (_ResampleFromTarget, assert_lossless,
                                 sampled_p_values)
from tests.test_training import (base, corpus, tiny,  # noqa: F401 (fixtures)
                                 train_killed_and_resumed)

CASES = [  # (arch_seed, batch, block_size, max_prompt, max_new_tokens, eos)
    (0, 1, 2, 5, 14, False), (2, 3, 4, 6, 20, True), (5, 5, 6, 9, 19, True),
    (7, 8, 8, 5, 25, False),
]


def bigram_with_copy_heads(cfg, params):
  """The target predicts from the current token alone; Hydra head j's
  state is the embedding of the last token it reads (t + j - 1)."""
  def zero_layer_outputs(path, x):
    names = [getattr(p, "key", "") for p in path]
    if names[0].startswith("layer_") and (
        names[1:3] == ["attn", "o"] or names[1:3] in (["mlp", "down"],
                                                      ["mlp", "proj"])):
      return jnp.zeros_like(x)
    return x

  params = jax.tree_util.tree_map_with_path(zero_layer_outputs, params)
  d, heads = cfg.d_model, {}
  for j in range(2, cfg.num_prediction_heads + 1):
    old = params["proposal_heads"][f"head_{j}"]
    heads[f"head_{j}"] = {
        **jax.tree_util.tree_map(jnp.zeros_like, old),
        "fc_in": {"kernel": jnp.concatenate([jnp.zeros(((j - 1) * d, d)),
                                             jnp.eye(d)]),
                  "bias": jnp.zeros((d,))}}
  return {**params, "proposal_heads": heads}


def cyclic_bigram(cfg, params):
  """Orthogonal embeddings and an output projection that maps token x to
  x + 1 (mod V): the bigram target's greedy text counts up, with no fixed
  point (untied embeddings, V <= d)."""
  v, d = cfg.vocab_size, cfg.d_model
  q, _ = np.linalg.qr(np.random.RandomState(0).randn(d, v))
  embed = jnp.asarray(q.T * 4.0, jnp.float32)  # [V, d], orthogonal rows
  return {**params, "embed": {"embedding": embed},
          "lm_head": {"kernel": jnp.roll(embed.T, 1, axis=1)}}


@pytest.mark.parametrize("arch,batch,k,p,n,with_eos", CASES)
def test_hydra_is_exact(arch, batch, k, p, n, with_eos):
  """Two weight sets: random heads, and copy heads on a bigram target."""
  cfg = tiny_config(arch, head_type="hydra")
  hist = check_against_greedy(
      arch, batch, k, p, n, with_eos, num_models=2, model={
          "head_type": "hydra"}, compact_rows=batch == 5,
      prepare=lambda seed, params: (bigram_with_copy_heads(cfg, params)
                                    if seed else params))
  assert hist[1:].sum() > 0, hist  # Drafts were accepted ...
  if k > 2:
    assert hist[:-1].sum() > 0, hist  # ... and rejected.


def test_dependent_heads_read_the_chain_in_order():
  cfg, params = random_model(3, head_type="hydra", max_seq_len=128,
                             vocab_size=16, tie_embeddings=False)
  params = bigram_with_copy_heads(cfg, cyclic_bigram(cfg, params))
  prompts, lengths = ragged_prompts(3, 4, 10, cfg.vocab_size)
  k, n = 8, 48
  out = blockdec.decode(params, cfg, prompts, lengths, n,
                        method=blockdec.Blockwise(block_size=k))
  # Every call but a row's last (clamped to the budget) accepts k tokens.
  np.testing.assert_array_equal(out.num_calls, np.full(4, n // k))
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=n)
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  last = prompts[np.arange(4), lengths - 1]
  np.testing.assert_array_equal(  # The text counts up from the prompt.
      greedy.tokens, (last[:, None] + 1 + np.arange(n)) % cfg.vocab_size)
  # Stern heads on the same target (zero residuals: every head repeats head
  # 1's token, which counting text never does) have nothing accepted.
  stern_cfg = cfg.replace(head_type="stern")
  stern = blockdec.init_params(stern_cfg, jax.random.key(0))
  stern = {**params, "proposal_heads": jax.tree_util.tree_map(
      jnp.zeros_like, stern["proposal_heads"])}
  stern_out = blockdec.decode(stern, stern_cfg, prompts, lengths, n,
                              method=blockdec.Blockwise(block_size=k))
  assert float(out.block_efficiency) == k
  assert float(stern_out.block_efficiency) == 1


@pytest.mark.parametrize("sampling,n,k,eos_id", [
    (blockdec.Sampling(temperature=1.0), 3, 4, None),
    (blockdec.Sampling(temperature=0.7, top_k=4, top_p=0.9), 4, 3, 2),
])
def test_hydra_sampling_matches_enumerated_distribution(sampling, n, k,
                                                        eos_id):
  cfg, params = _sampling_model()
  assert_lossless(cfg, params, n, sampling, blockdec.Blockwise(block_size=k),
                  eos_id)


def test_biased_verifier_is_caught_with_hydra():
  cfg, params = _sampling_model()
  p_values, _ = sampled_p_values(
      cfg, params, 3, blockdec.Sampling(temperature=1.0),
      blockdec.Blockwise(block_size=4, acceptance=_ResampleFromTarget()))
  assert min(p_values) < 1e-6, p_values


def _sampling_model():
  """A 6-token bigram target with copy heads (its q is near p, not equal)."""
  cfg, params = random_model(1, param_seed=0, vocab_size=6, n_layers=1,
                             num_prediction_heads=4, max_seq_len=16,
                             head_type="hydra")
  params = jax.tree_util.tree_map(lambda x: x * 0.5, params)
  return cfg, bigram_with_copy_heads(cfg, params)


def test_adaptive_draft_length_stays_exact():
  """The "confidence" estimate reads the Hydra drafter's own confidences
  (the "history" one is the core's, tested with every drafter)."""
  cfg, params = random_model(4, head_type="hydra")
  params = bigram_with_copy_heads(cfg, params)
  prompts, lengths = ragged_prompts(4, 3, 6, cfg.vocab_size)
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=24)
  out = blockdec.decode(params, cfg, prompts, lengths, 24,
                        method=blockdec.Blockwise(
                            block_size=6, adaptive=blockdec.AdaptiveBlockSize(
                                estimate="confidence", token_cost=0.2)))
  np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_tables_built_under_a_callers_jit_serve_later_calls():
  """Weights a caller's jitted function closes over are concrete, so their
  slot tables are built once and cached: eagerly, or the cache would hold
  that trace's tracers and the next decode would fail on them."""
  cfg, params = random_model(4, head_type="hydra")
  params = jax.tree_util.tree_map(lambda x: x + 0, params)  # No cached tables.
  assert transformer.hydra_tables_fit(cfg, cfg.num_prediction_heads)
  prompts, lengths = ragged_prompts(4, 2, 6, cfg.vocab_size)
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=12)
  traced = jax.jit(lambda p, n: blockdec.decode(params, cfg, p, n, 12).tokens)
  np.testing.assert_array_equal(traced(prompts, lengths), greedy.tokens)
  again = blockdec.decode(params, cfg, prompts, lengths, 12)
  np.testing.assert_array_equal(again.tokens, greedy.tokens)


def test_hydra_errors():
  cfg, params = random_model(1, head_type="hydra")
  prompts, lengths = ragged_prompts(1, 2, 4, cfg.vocab_size)
  with pytest.raises(ValueError, match="Hydra heads"):
    blockdec.decode(params, cfg, prompts, lengths, 8,
                    method=blockdec.Refined(block_size=3))
  with pytest.raises(ValueError, match="head_type='nope'"):
    cfg.replace(head_type="nope")
  # A Stern checkpoint is not a Hydra one: the heads' shapes differ.
  stern_params = blockdec.init_params(cfg.replace(head_type="stern"),
                                      jax.random.key(0))
  with pytest.raises(ValueError, match="fc_in"):
    blockdec.decode(stern_params, cfg, prompts, lengths, 8,
                    method=blockdec.Blockwise(3))


def test_hydra_heads_train_on_a_frozen_trunk_and_resume(base, corpus,
                                                        tmp_path):
  """configs/heads_hydra.py:tiny: only the heads move (greedy output is the
  base's), their held-out loss falls, and a killed run resumes exactly."""
  cfg, params, tokenizer, _ = base
  config = tiny("heads_hydra", corpus, steps=16, checkpoint_every=2,
                eval_every=8, log_every=1)
  assert config.regime == "frozen" and config.model.head_type == "hydra"
  config.optim.learning_rate = 1e-2
  summary, (hcfg, hparams, _) = train_killed_and_resumed(
      config, tmp_path, (cfg, params, tokenizer))
  assert hcfg.head_type == "hydra" and hcfg.num_prediction_heads == 4
  for key in params:  # Trunk and head 1: bit-for-bit.
    jax.tree_util.tree_map(np.testing.assert_array_equal, hparams[key],
                           params[key])
  rows = [r for r in train.read_metrics(tmp_path / "a" / "metrics.jsonl")
          if r["split"] == "valid"]
  assert [r["step"] for r in rows] == [8, 16]
  assert rows[-1]["head_losses"][1] < rows[0]["head_losses"][1]
  assert summary["regime"] == "frozen"
  prompts, lengths = ragged_prompts(0, 3, 6, hcfg.vocab_size)
  greedy = blockdec.greedy_decode(hparams, hcfg, prompts, lengths,
                                  max_new_tokens=16)
  out = blockdec.decode(hparams, hcfg, prompts, lengths, 16,
                        method=blockdec.Blockwise(4))
  np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_hf_export_keeps_hydra_heads(tmp_path):
  cfg, params = random_model(0, head_type="hydra", num_prediction_heads=3)
  blockdec.export_hf_checkpoint(cfg, params, tmp_path)
  cfg2, params2 = blockdec.load_hf_checkpoint(tmp_path)
  assert cfg2.head_type == "hydra" and cfg2.num_prediction_heads == 3
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         params2["proposal_heads"], params["proposal_heads"])


def _with_biases(params, seed):
  """`params` with every bias non-zero (initialised at zero)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      x + 0.1 * jax.random.normal(key, x.shape)
      if "bias" in jax.tree_util.keystr(path) else x
      for (path, x), key in zip(leaves, keys)])


@pytest.mark.parametrize("seed", [0, 3])
def test_slot_tables_give_the_heads_own_logits(seed):
  """Decoding reads each token slot's share of fc_in from a table row
  (`hydra_slot_tables`); the logits equal the head's own join of [h,
  embeddings] up to float rounding, biases included, tied or not."""
  cfg, params = random_model(seed, head_type="hydra")
  params = _with_biases(params, seed)
  k, d, v = cfg.num_prediction_heads, cfg.d_model, cfg.vocab_size
  tables = transformer.hydra_slot_tables(params, cfg, k)
  assert {name: t.shape for name, t in tables.items()} == {
      f"head_{j}": (j - 1, v, d) for j in range(2, k + 1)}
  h = jax.random.normal(jax.random.key(seed), (5, d))
  model = transformer.Transformer(cfg)
  for j in range(2, k + 1):
    tokens = jax.random.randint(jax.random.key(j), (5, j - 1), 0, v)
    want = model.apply({"params": params}, h, tokens, j,
                       method=transformer.Transformer.hydra_head)
    got = transformer.hydra_head_from_slots(params, cfg, h,
                                            tables[f"head_{j}"], tokens, j)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_decode_builds_the_tables_once_per_weights(monkeypatch):
  """Built once per set of weights and reused by later decodes; new
  weights get their own; traced weights (under a caller's jit) build them
  inline; past the size budget none are built and the heads join as in
  training. Every decode equals greedy."""
  cfg, params = random_model(2, head_type="hydra")
  prompts, lengths = ragged_prompts(2, 3, 6, cfg.vocab_size)
  builds, real = [], api._build_hydra_tables
  monkeypatch.setattr(api, "_build_hydra_tables",
                      lambda *a, **kw: builds.append(1) or real(*a, **kw))

  def decode(params):
    greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                    max_new_tokens=20)
    out = blockdec.decode(params, cfg, prompts, lengths, 20,
                          method=blockdec.Blockwise(block_size=5))
    np.testing.assert_array_equal(out.tokens, greedy.tokens)

  decode(params)
  decode(params)
  assert len(builds) == 1
  other = jax.tree_util.tree_map(lambda x: x * 1.5, params)
  decode(other)
  assert len(builds) == 2
  # Under a caller's jit the weights are traced: built inline, not cached.
  traced = jax.jit(lambda params: blockdec.decode(
      params, cfg, prompts, lengths, 20,
      method=blockdec.Blockwise(block_size=5)).tokens)(other)
  np.testing.assert_array_equal(traced, blockdec.greedy_decode(
      other, cfg, prompts, lengths, max_new_tokens=20).tokens)
  assert len(builds) == 2
  monkeypatch.setattr(transformer, "HYDRA_TABLE_BYTES", 0)
  assert api._hydra_tables(params, cfg, 5) is None
  decode(jax.tree_util.tree_map(lambda x: x * 0.5, params))
  assert len(builds) == 2


def test_the_drafter_reads_the_tables(monkeypatch):
  """Copy heads on the counting bigram target accept every draft through
  the tables; with the tables zeroed the heads lose the drafted tokens,
  calls multiply, and the output is still greedy's."""
  cfg, params = random_model(3, head_type="hydra", max_seq_len=128,
                             vocab_size=16, tie_embeddings=False)
  params = bigram_with_copy_heads(cfg, cyclic_bigram(cfg, params))
  prompts, lengths = ragged_prompts(3, 4, 10, cfg.vocab_size)
  k, n = 8, 48
  method = blockdec.Blockwise(block_size=k)
  out = blockdec.decode(params, cfg, prompts, lengths, n, method=method)
  np.testing.assert_array_equal(out.num_calls, np.full(4, n // k))
  real = api._hydra_tables
  monkeypatch.setattr(api, "_hydra_tables", lambda *a: jax.tree_util.tree_map(
      jnp.zeros_like, real(*a)))
  zeroed = blockdec.decode(params, cfg, prompts, lengths, n, method=method)
  np.testing.assert_array_equal(zeroed.tokens, out.tokens)
  assert (zeroed.num_calls > n // k).all(), zeroed.num_calls


@pytest.mark.parametrize("seed,regime", [(0, "distill"), (3, "finetune")])
def test_training_runs_hydra_heads_through_slot_tables(seed, regime):
  """A training batch with more positions than the vocabulary has runs the
  Hydra heads through slot tables built in the step (`hydra_slots_pay_off`):
  the per-head losses and every gradient equal those of the heads' own
  join, the embedding's included (a regime that trains everything)."""
  cfg, params = random_model(seed, head_type="hydra")
  params = _with_biases(params, seed)
  k = cfg.num_prediction_heads
  rng = np.random.RandomState(seed)
  batch = {"tokens": jnp.asarray(rng.randint(0, cfg.vocab_size, (3, 40)),
                                 jnp.int32),
           "mask": jnp.asarray(rng.rand(3, 40) < 0.8, jnp.float32)}
  assert transformer.hydra_slots_pay_off(cfg, k, 3 * 39)
  assert not transformer.hydra_slots_pay_off(cfg, k, cfg.vocab_size)

  def own_join(params):
    inputs, targets, weights = losses.head_targets(batch["tokens"],
                                                   batch["mask"], k)
    h = train.trunk_states(params, cfg, inputs)
    if regime == "distill":
      h = jax.lax.stop_gradient(h)
    logits = transformer.Transformer(cfg).apply(
        {"params": params}, h, None, targets, method="head_logits")
    return losses.per_head_losses(logits, targets, weights)

  def loss(fn):
    return lambda p: losses.regime_loss(regime, fn(p))

  slots = lambda p: train.head_losses(p, cfg, batch, regime)
  np.testing.assert_allclose(slots(params), own_join(params), rtol=1e-5)
  np.testing.assert_allclose(  # Forced off: the heads' own join.
      train.head_losses(params, cfg, batch, regime, hydra_slots=False),
      own_join(params), rtol=1e-6)
  want, got = jax.grad(loss(own_join))(params), jax.grad(loss(slots))(params)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      got, want)
  assert float(jnp.abs(got["proposal_heads"]["head_3"]["fc_in"]["kernel"])
               .max()) > 0
  if regime == "finetune":
    assert float(jnp.abs(got["embed"]["embedding"]).max()) > 0
