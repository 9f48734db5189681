"""The EAGLE-style drafter: exact under greedy, lossless with sampling, trained
on a frozen trunk.

Exactness: seeded sweeps over random architectures, ragged batches, block
sizes and EOS, compared token for token with the plain greedy loop, with two
drafters: random weights (rarely right) and a "copy" drafter whose one layer
is the target's own first layer fed the next token's embedding (on a
one-layer target it reproduces the target's next state up to the first
prompt token it cannot see, so it is usually right). The copy drafter also
pins the feature and position bookkeeping: it accepts nearly every sampled
draft only if each drafted state sits at the right position beside the
right token. Lossless sampling: the chi-square test of tests/test_sampling.py
against the enumerated distribution, with a biased verifier rejected.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blockdec
from blockdec.training import eagle as eagle_training
from blockdec.training import train
from tests.helpers import mid_way_eos, ragged_prompts, random_model
from tests.test_exactness import _check_pair
from tests.test_sampling import (_ResampleFromTarget, assert_lossless,
                                 sampled_p_values)
from tests.test_training import (base, corpus, tiny,  # noqa: F401 (fixtures)
                                 train_killed_and_resumed)

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = [  # (arch_seed, batch, block_size, max_prompt, max_new_tokens, eos)
    (0, 1, 2, 5, 14, False), (2, 3, 4, 6, 20, True), (5, 5, 6, 9, 19, True),
    (7, 8, 3, 5, 25, False),
]


def copy_drafter(cfg, params):
  """`params` whose drafter is the target's layer 0 on the next token's
  embedding (its state input weighted 0) and the target's final norm."""
  d = cfg.d_model
  return {**params, "eagle": {
      "fc": {"kernel": jnp.concatenate([jnp.zeros((d, d)), jnp.eye(d)]),
             "bias": jnp.zeros((d,))},
      "layer_0": params["layer_0"], "norm": params["final_norm"]}}


@pytest.mark.parametrize("arch,batch,k,p,n,with_eos", CASES)
def test_eagle_is_exact(arch, batch, k, p, n, with_eos):
  eos_id, hist = None, 0
  for seed, make in enumerate((lambda c, x: x, copy_drafter)):
    cfg, params = random_model(arch, param_seed=100 * arch + seed,
                               eagle_layers=1, num_prediction_heads=1)
    params = make(cfg, params)
    prompts, lengths = ragged_prompts(100 * arch + seed, batch, p,
                                      cfg.vocab_size)
    if with_eos and eos_id is None:
      eos_id = mid_way_eos(cfg, params, prompts, lengths, n)
    greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                    max_new_tokens=n, eos_id=eos_id)
    # One chain, and a token tree of 3 chains (k > 2: the tree's cache
    # compaction and longest-chain choice matter).
    for chains in (1, 3) if k > 2 else (1,):
      out = blockdec.decode(params, cfg, prompts, lengths, n,
                            method=blockdec.Eagle(block_size=k,
                                                  num_drafts=chains),
                            eos_id=eos_id, compact_rows=batch == 5)
      _check_pair(cfg, params, prompts, lengths, greedy, out, k, n, eos_id,
                  eos_expected_in_row=(batch // 2 if seed == 0 and with_eos
                                       else None))
      hist = hist + np.asarray(out.accepted_hist).sum(0)
  assert hist[1:].sum() > 0, hist  # Drafts were accepted ...
  if k > 2:
    assert hist[:-1].sum() > 0, hist  # ... and rejected.


def test_copy_drafter_lines_up_states_positions_and_tokens():
  cfg, params = random_model(3, eagle_layers=1, n_layers=1,
                             num_prediction_heads=1, max_seq_len=128)
  prompts, lengths = ragged_prompts(3, 4, 24, cfg.vocab_size)
  k, n = 8, 48
  efficiency = {}
  for name, p in (("copy", copy_drafter(cfg, params)), ("random", params)):
    for sampling in (None, blockdec.Sampling(temperature=1.0)):
      out = blockdec.decode(p, cfg, prompts, lengths, n,
                            method=blockdec.Eagle(block_size=k),
                            sampling=sampling, key=jax.random.key(0))
      efficiency[name, sampling is not None] = float(out.block_efficiency)
  # The copy drafter's drafts are nearly always the target's (greedy), and
  # its q nearly equals the target's p (sampling): nearly all accepted. A
  # state, position or token off by one would lose that.
  assert efficiency["copy", False] > 0.75 * k, efficiency
  assert efficiency["copy", True] > 0.75 * k, efficiency
  assert efficiency["random", False] < 0.25 * k, efficiency


def test_more_chains_accept_more():
  """Chain 0 of the tree is the one-chain draft and the longest accepted
  chain is kept: a weak (random) drafter's second guesses pay off."""
  cfg, params = random_model(3, eagle_layers=1, n_layers=1,
                             num_prediction_heads=1, max_seq_len=128)
  prompts, lengths = ragged_prompts(3, 4, 24, cfg.vocab_size)
  efficiency = [float(blockdec.decode(
      params, cfg, prompts, lengths, 48,
      method=blockdec.Eagle(block_size=6, num_drafts=chains)).block_efficiency)
                for chains in (1, 4)]
  assert efficiency[1] > 1.15 * efficiency[0], efficiency


@pytest.mark.parametrize("chains", [1, 3], ids=["chain", "tree"])
@pytest.mark.parametrize("sampling,n,k,eos_id", [
    (blockdec.Sampling(temperature=1.0), 3, 4, None),
    (blockdec.Sampling(temperature=0.7, top_k=4, top_p=0.9), 4, 3, 2),
])
def test_eagle_sampling_matches_enumerated_distribution(sampling, n, k,
                                                        eos_id, chains):
  """One chain, and a tree of 3 chains (independent first draws verified by
  multi-candidate rejection)."""
  cfg, params = _sampling_model()
  assert_lossless(cfg, params, n, sampling,
                  blockdec.Eagle(block_size=k, num_drafts=chains), eos_id)


@pytest.mark.parametrize("chains", [1, 3], ids=["chain", "tree"])
def test_biased_verifier_is_caught_with_eagle(chains):
  cfg, params = _sampling_model()
  p_values, _ = sampled_p_values(
      cfg, params, 3, blockdec.Sampling(temperature=1.0),
      blockdec.Eagle(block_size=4, num_drafts=chains,
                     acceptance=_ResampleFromTarget()))
  assert min(p_values) < 1e-6, p_values


def _sampling_model():
  """tests/test_sampling.py's small-vocabulary model with a copy drafter
  (its q is near the target's p but not equal: both paths are used)."""
  cfg, params = random_model(1, param_seed=0, vocab_size=6, n_layers=1,
                             num_prediction_heads=1, max_seq_len=16,
                             eagle_layers=1)
  params = jax.tree_util.tree_map(lambda x: x * 0.5, params)
  return cfg, copy_drafter(cfg, params)


def test_eagle_errors():
  cfg, params = random_model(1, num_prediction_heads=1)
  prompts, lengths = ragged_prompts(1, 2, 4, cfg.vocab_size)
  with pytest.raises(ValueError, match="eagle_layers=0"):
    blockdec.decode(params, cfg, prompts, lengths, 8,
                    method=blockdec.Eagle(block_size=3))
  for bad, error in ((0, ValueError), (2.5, TypeError), (True, TypeError)):
    with pytest.raises(error, match="Eagle block_size"):
      blockdec.Eagle(block_size=bad)
  assert blockdec.Eagle(block_size=np.int64(3)) == blockdec.Eagle(3)
  with pytest.raises(ValueError, match="eagle_layers"):
    blockdec.ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2,
                         eagle_layers=-1)
  ecfg, eparams = random_model(1, num_prediction_heads=1, eagle_layers=1)
  with pytest.raises(ValueError, match="estimate='history'"):
    blockdec.decode(eparams, ecfg, prompts, lengths, 8,
                    method=blockdec.Eagle(adaptive=blockdec.AdaptiveBlockSize(
                        estimate="confidence")))
  with pytest.raises(ValueError, match="one chain"):
    blockdec.decode(eparams, ecfg, prompts, lengths, 8,
                    method=blockdec.Eagle(num_drafts=2,
                                          adaptive=blockdec.AdaptiveBlockSize()))
  with pytest.raises(ValueError, match="block_size >= 2"):
    blockdec.Eagle(block_size=1, num_drafts=2)
  with pytest.raises(ValueError, match="exceeds vocab_size"):
    blockdec.decode(eparams, ecfg, prompts, lengths, 8,
                    method=blockdec.Eagle(num_drafts=ecfg.vocab_size + 1))
  # A checkpoint without the drafter's weights is named as such.
  with pytest.raises(ValueError, match="eagle"):
    blockdec.decode(params, ecfg, prompts, lengths, 8,
                    method=blockdec.Eagle())


def test_adaptive_draft_length_stays_exact():
  cfg, params = random_model(4, n_layers=1, eagle_layers=1,
                             num_prediction_heads=1)
  params = copy_drafter(cfg, params)
  prompts, lengths = ragged_prompts(4, 3, 6, cfg.vocab_size)
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=24)
  out = blockdec.decode(params, cfg, prompts, lengths, 24,
                        method=blockdec.Eagle(
                            block_size=5, adaptive=blockdec.AdaptiveBlockSize(
                                token_cost=0.2)))
  np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_losses_score_the_next_state_and_the_targets_distribution():
  """A drafter that reproduces the target exactly scores 0 feature loss,
  top-1 of 1 and the target's entropy as its token loss; a random one
  does worse."""
  cfg, params = random_model(3, eagle_layers=1, n_layers=1,
                             num_prediction_heads=1)
  tokens = jnp.asarray(np.random.RandomState(0).randint(
      0, cfg.vocab_size, (2, 12)), jnp.int32)
  batch = {"tokens": tokens, "mask": jnp.ones_like(tokens)}
  key = jax.random.key(0)
  _, good = eagle_training.losses(copy_drafter(cfg, params), cfg, batch, key,
                                  noise=0.0)
  _, bad = eagle_training.losses(params, cfg, batch, key, noise=0.0)
  assert np.all(np.asarray(good["top1"]) > np.asarray(bad["top1"]))
  assert np.all(np.asarray(good["feature_loss"])
                < np.asarray(bad["feature_loss"]))
  with pytest.raises(ValueError, match="unroll=3"):
    eagle_training.losses(params, cfg, batch, key, unroll=3)


def test_eagle_trains_on_a_frozen_trunk_and_resumes(base, corpus, tmp_path):
  """configs/eagle.py:tiny: only params["eagle"] moves (greedy output is the
  base's), the drafter's held-out loss falls, and a run killed after step 3
  resumes to the uninterrupted run's parameters."""
  cfg, params, tokenizer, _ = base
  config = tiny("eagle", corpus, steps=16, checkpoint_every=2, eval_every=8,
                log_every=1)
  config.optim.learning_rate = 1e-2
  summary, (ecfg, eparams, _) = train_killed_and_resumed(
      config, tmp_path, (cfg, params, tokenizer))
  assert ecfg.eagle_layers == 1 and ecfg.replace(eagle_layers=0) == cfg
  for key in params:  # Trunk and head 1: bit-for-bit.
    jax.tree_util.tree_map(np.testing.assert_array_equal, eparams[key],
                           params[key])
  rows = [r for r in train.read_metrics(tmp_path / "a" / "metrics.jsonl")
          if r["split"] == "valid"]
  assert [r["step"] for r in rows] == [8, 16]
  assert rows[-1]["eagle_token_loss"][0] < rows[0]["eagle_token_loss"][0]
  assert summary["regime"] == "eagle"
  assert set(summary["eagle_tokens_per_call"]) == {"k4", "k8"}
  assert all(v >= 1 for v in summary["eagle_tokens_per_call"].values())


def test_eagle_trains_on_the_bases_greedy_text(base, corpus, tmp_path):
  """configs/eagle.py:tiny_distill: regime eagle_distill, on the base's
  generated continuations (cached beside the run); the base is frozen."""
  from blockdec.training import pipeline
  cfg, params, tokenizer, _ = base
  config = pipeline.load_config(ROOT / "configs" / "eagle.py", "tiny_distill")
  assert config.regime == "eagle_distill"
  assert config.name == "eagle_tiny_distill"
  config.data.corpus = str(corpus)
  config.data.valid_fraction, config.data.test_fraction = 0.2, 0.1
  config.progress, config.steps = False, 4  # 4 x 4 rows over 8: revisited.
  config.distill.cache_dir = str(tmp_path / "distill")
  summary = train.train(config, tmp_path / "run",
                        init=(cfg, params, tokenizer))
  assert summary["regime"] == "eagle_distill"
  assert len(list((tmp_path / "distill").glob("distill-*.npz"))) == 1
  # The frozen trunk's states of the whole rows are computed once and
  # carried by the batches; the step gives what it gives without them.
  trainer = train.Trainer(config, tmp_path / "again",
                          init=(cfg, params, tokenizer))
  batch = trainer.batches.batch(0)
  assert batch["hidden"].shape == batch["tokens"].shape + (cfg.d_model,)
  np.testing.assert_allclose(
      batch["hidden"], train.trunk_states(trainer.initial_state.params,
                                          trainer.cfg, batch["tokens"]),
      rtol=1e-5, atol=1e-6)
  state = trainer.initial_state
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      trainer.train_step(state, batch),
      trainer.train_step(state, {k: v for k, v in batch.items()
                                 if k != "hidden"}))
  _, eparams, _ = blockdec.load_checkpoint(tmp_path / "run")
  for key in params:
    jax.tree_util.tree_map(np.testing.assert_array_equal, eparams[key],
                           params[key])
  with pytest.raises(ValueError, match="'nope' unknown"):
    pipeline.load_config(ROOT / "configs" / "eagle.py", "nope")
  # The tiny GPT-2's drafter: its base is configs/gpt2_tiny.py (BPE).
  gpt2 = pipeline.load_config(ROOT / "configs" / "eagle.py",
                              "gpt2_tiny_distill")
  assert gpt2.base.to_dict() == pipeline.load_config(
      ROOT / "configs" / "gpt2_tiny.py").to_dict()
  assert (gpt2.data.tokenizer, gpt2.regime) == ("bpe", "eagle_distill")


def test_bad_eagle_configs_fail_clearly(base, corpus, tmp_path):

  init = base[:3]
  for changes, message in (
      ({"model": {"eagle_layers": 0}}, "eagle_layers >= 1"),
      ({"eagle.unroll": 3}, "unroll=3"),
      ({"eagle.noise": -1.0}, "noise=-1.0"),
  ):
    with pytest.raises(ValueError, match=message):
      train.Trainer(tiny("eagle", corpus, **changes), tmp_path / "x",
                    init=init)


@pytest.mark.parametrize("extra", [[], ["--temperature=0.7"]])
def test_cli_decodes_with_eagle(tmp_path, capsys, extra):
  from absl import flags
  from blockdec import cli
  from blockdec.training.tokenizers import ByteTokenizer
  cfg, params = random_model(0, vocab_size=256, num_prediction_heads=1,
                             eagle_layers=1)
  blockdec.save_checkpoint(tmp_path, cfg, params, tokenizer=ByteTokenizer())
  argv = ["blockdec", "decode", f"--checkpoint={tmp_path}", "--prompt=abcabc",
          "--max_new_tokens=6", "--method=eagle", "--block_size=3"]
  try:
    cli.main(flags.FLAGS(argv + extra))
  finally:
    flags.FLAGS.unparse_flags()
  out = capsys.readouterr().out
  assert out.startswith("abcabc")
  if extra:
    assert "speculative sampling (eagle)" in out
  else:
    assert "identical to greedy: True" in out


def test_hf_export_says_the_drafter_is_left_out(tmp_path):
  cfg, params = random_model(0, num_prediction_heads=1, eagle_layers=1)
  with pytest.warns(UserWarning, match="without its EAGLE drafter"):
    blockdec.export_hf_checkpoint(cfg, params, tmp_path)
  assert (tmp_path / "config.json").exists()
