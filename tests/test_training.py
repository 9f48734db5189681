"""Training: every config steps, exact resume, regimes, checkpoints, diagnostics."""

import json
import pathlib

import jax
import numpy as np
import pytest

import blockdec
from blockdec.training import (data, defaults, diagnostics, distill,
                                pipeline, train)
from tests.test_training_data import write_corpus

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAD_CONFIGS = ("heads_frozen", "heads_finetune", "heads_distill")


def tiny(name: str, corpus, **changes):
  """configs/<name>.py:tiny on the test corpus, quiet."""
  c = pipeline.load_config(ROOT / "configs" / f"{name}.py", "tiny")
  c.data.corpus = str(corpus)
  c.data.valid_fraction, c.data.test_fraction = 0.2, 0.1
  c.progress = False
  for k, v in changes.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def train_killed_and_resumed(config, tmp_path, init):
  """Trains `config` to the end in tmp_path/a, and in tmp_path/b kills it
  after step 3 and resumes; asserts both end with identical parameters.

  Returns (summary of run a, (cfg, params, tokenizer) of run a).
  """
  summary = train.train(config, tmp_path / "a", init=init)
  killed = train.Trainer(config, tmp_path / "b", init=init).run(stop_at_step=3)
  assert killed[1] is None and int(killed[0].step) == 3
  train.train(config, tmp_path / "b", init=init)
  loaded = blockdec.load_checkpoint(tmp_path / "a")
  _, resumed, _ = blockdec.load_checkpoint(tmp_path / "b")
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, loaded[1])
  return summary, loaded


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"), n=30)


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
  """A tiny trained base LM: (cfg, params, tokenizer, workdir)."""
  workdir = tmp_path_factory.mktemp("base")
  summary = train.train(tiny("base_lm", corpus, steps=3), workdir)
  assert summary["steps"] == 3 and np.isfinite(summary["valid"]["loss"])
  return (*blockdec.load_checkpoint(workdir), workdir)


def test_base_run_writes_everything(base):
  cfg, params, tokenizer, workdir = base
  assert cfg.vocab_size == 256 and cfg.num_prediction_heads == 1
  for f in ("model_config.json", "params.safetensors", "tokenizer_config.json",
            "metrics.jsonl", "summary.json", "loss_curve.png"):
    assert (workdir / f).exists(), f
  rows = train.read_metrics(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
  assert any(r["split"] == "valid" for r in rows)


# heads_frozen's step is covered by test_frozen_heads_keep_greedy_output.
@pytest.mark.parametrize("name,regime", [
    ("heads_finetune", "finetune"),
    ("heads_distill", "distill"), ("heads_distill", "distill_finetune")])
def test_one_step_of_every_head_config(name, regime, base, corpus, tmp_path):
  cfg, params, tokenizer, _ = base
  config = tiny(name, corpus, regime=regime, steps=1,
                **{"distill.cache_dir": str(tmp_path / "distill")})
  trainer = train.Trainer(config, tmp_path / "run", init=(cfg, params, tokenizer))
  state, summary = trainer.run()
  assert summary["steps"] == 1 and int(state.step) == 1
  assert trainer.cfg.num_prediction_heads == 4
  assert len(summary["head_agreement"]) == 4
  new = state.params
  unchanged = jax.tree_util.tree_map(
      lambda a, b: bool(np.array_equal(a, b)),
      {k: v for k, v in new.items() if k != "proposal_heads"}, params)
  frozen = regime in ("frozen", "distill")
  assert all(jax.tree_util.tree_leaves(unchanged)) == frozen
  if regime.startswith("distill"):
    assert list((tmp_path / "distill").glob("distill-*.npz"))


def test_gentle_finetuning_scales_the_trunk_and_weighs_head_one():
  """optim.trunk_lr_scale scales every update outside proposal_heads only;
  first_head_weight w gives (w * L1 + L2 + ... + Lk) / (w + k - 1)."""
  from blockdec.training import defaults, losses
  params = {"layer_0": {"w": np.ones((3, 3), np.float32)},
            "proposal_heads": {"head_2": {"w": np.ones((3, 3), np.float32)}}}
  grads = jax.tree_util.tree_map(lambda x: 0.5 * x, params)
  updates = {}
  for scale in (1.0, 0.1):
    optim = defaults.default_config().optim
    optim.warmup_steps = 0
    if scale != 1.0:
      optim.trunk_lr_scale = scale
    opt, _ = train.make_optimizer(optim, total_steps=10)
    updates[scale], _ = opt.update(grads, opt.init(params), params)
  np.testing.assert_allclose(updates[0.1]["layer_0"]["w"],
                             0.1 * updates[1.0]["layer_0"]["w"], rtol=1e-6)
  np.testing.assert_array_equal(updates[0.1]["proposal_heads"]["head_2"]["w"],
                                updates[1.0]["proposal_heads"]["head_2"]["w"])
  assert np.all(updates[1.0]["layer_0"]["w"] != 0)
  per_head = np.array([1.0, 2.0, 3.0, 6.0], np.float32)
  assert float(losses.regime_loss("finetune", per_head)) == pytest.approx(3.0)
  assert float(losses.regime_loss("finetune", per_head, 3.0)) == \
      pytest.approx((3 * 1 + 2 + 3 + 6) / 6)
  # Regimes that train the proposal heads alone ignore the weight.
  assert float(losses.regime_loss("frozen", per_head, 3.0)) == \
      pytest.approx(11 / 3)


def test_bad_gentle_finetuning_options_fail_clearly(corpus, tmp_path):
  for changes, match in (({"optim.trunk_lr_scale": 0.0}, "trunk_lr_scale"),
                         ({"first_head_weight": -1.0}, "first_head_weight"),
                         ({"first_head_weight": "half"}, "first_head_weight")):
    config = tiny("heads_finetune", corpus)
    for path, value in changes.items():
      node, leaf = (config.optim, "trunk_lr_scale") if "." in path else \
          (config, path)
      node[leaf] = value
    with pytest.raises(ValueError, match=match):
      train.Trainer(config, tmp_path / "run")


def test_frozen_heads_keep_greedy_output(base, corpus, tmp_path):
  cfg, params, tokenizer, _ = base
  config = tiny("heads_frozen", corpus, steps=3)
  config.optim.learning_rate = 0.05  # Move the heads a lot.
  summary = train.train(config, tmp_path, init=(cfg, params, tokenizer))
  hcfg, hparams, _ = blockdec.load_checkpoint(tmp_path)
  for key in params:  # Trunk and head 1: bit-for-bit.
    jax.tree_util.tree_map(np.testing.assert_array_equal, hparams[key],
                           params[key])
  prompts, lengths = train.pad_prompts(
      [tokenizer.encode("def alpha"), tokenizer.encode("x")])
  before = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=12)
  after = blockdec.blockwise_decode(hparams, hcfg, prompts, lengths,
                                    max_new_tokens=12)
  np.testing.assert_array_equal(after.tokens, before.tokens)
  # The Pallas attention backend decodes this trained checkpoint identically.
  pallas_cfg = hcfg.replace(attention_backend="pallas")
  for fn in (blockdec.greedy_decode, blockdec.blockwise_decode):
    got = fn(hparams, pallas_cfg, prompts, lengths, max_new_tokens=12)
    np.testing.assert_array_equal(got.tokens, before.tokens)
  assert summary["valid"]["head_losses"][0] == pytest.approx(
      json.loads((base[3] / "summary.json").read_text())["valid"]["loss"],
      abs=1e-5)


def test_resume_follows_the_same_trajectory(corpus, tmp_path):
  config = tiny("base_lm", corpus, steps=5, checkpoint_every=2, log_every=1,
                eval_every=3)
  train.train(config, tmp_path / "a")
  killed = train.Trainer(config, tmp_path / "b").run(stop_at_step=3)
  assert killed[1] is None and int(killed[0].step) == 3
  # Restart: resumes from the step-2 checkpoint, redoes step 3.
  train.train(config, tmp_path / "b")
  rows = lambda d: [(r["split"], r["step"], r["loss"], r["head_losses"])
                    for r in train.read_metrics(tmp_path / d / "metrics.jsonl")]
  assert rows("a") == rows("b")
  assert len(rows("a")) == 5 + 2
  _, pa, _ = blockdec.load_checkpoint(tmp_path / "a")
  _, pb, _ = blockdec.load_checkpoint(tmp_path / "b")
  jax.tree_util.tree_map(np.testing.assert_array_equal, pa, pb)


def test_cpu_compiler_options_by_regime_backend_and_jaxlib():
  options = lambda regime, setting, backend="cpu", jaxlib=(0, 10): (
      train.cpu_compiler_options(regime, setting, backend=backend,
                                 jaxlib=jaxlib))
  dots = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
  # "auto": the regimes that backpropagate through a model, not the heads
  # on a frozen trunk.
  for regime in ("base", "finetune", "distill_finetune", "draft",
                 "block_diffusion", "eagle"):
    assert options(regime, "auto") == dots, regime
  for regime in ("frozen", "distill"):
    assert options(regime, "auto") == {}, regime
    assert options(regime, "on") == dots, regime
  assert options("base", "off") == {}
  assert options("base", "on", backend="gpu") == {}
  assert options("base", "on", jaxlib=(0, 11)) == {}  # Not measured there.
  with pytest.raises(ValueError, match="cpu_ynn_dots_only='always'"):
    options("base", "always")


def test_dots_only_steps_equal_the_default_steps(corpus, tmp_path):
  if not train.cpu_compiler_options("base", "on"):
    pytest.skip("the option applies only to XLA:CPU on jaxlib 0.10; here "
                "both runs would compile alike")
  runs = {}
  for setting in ("on", "off"):
    config = tiny("base_lm", corpus, steps=4, log_every=1,
                  cpu_ynn_dots_only=setting)
    trainer = train.Trainer(config, tmp_path / setting)
    state, _ = trainer.run()
    runs[setting] = (trainer.train_step, state.params,
                     [r["loss"] for r in train.read_metrics(
                         tmp_path / setting / "metrics.jsonl")
                      if r["split"] == "train"])
  # The option reached the compiled step ...
  batch = trainer.batches.batch(0)
  lowered = {s: fn.lower(trainer.initial_state, batch)
             for s, (fn, _, _) in runs.items()}
  compiled = {s: low.compile().as_text() for s, low in lowered.items()}
  assert compiled["on"] != compiled["off"]
  # ... the program itself is the same,
  assert lowered["on"].as_text("hlo") == lowered["off"].as_text("hlo")
  # and it trains alike up to float rounding.
  np.testing.assert_allclose(runs["on"][2], runs["off"][2], rtol=1e-5)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      runs["on"][1], runs["off"][1])


def test_distillation_data_is_the_greedy_continuation(base, tmp_path):
  cfg, params, tokenizer, _ = base
  stream = np.arange(200, dtype=np.int32) % 97
  kw = dict(num_sequences=5, prefix_len=6, new_tokens=10, batch_size=4, seed=1)
  tokens, mask = distill.generate(params, cfg, stream, cache_dir=tmp_path, **kw)
  assert tokens.shape == mask.shape == (5, 16)
  np.testing.assert_array_equal(mask[:, :6], 0)
  np.testing.assert_array_equal(mask[:, 6:], 1)
  greedy = blockdec.greedy_decode(params, cfg, tokens[:, :6],
                                  np.full(5, 6, np.int32), max_new_tokens=10)
  np.testing.assert_array_equal(tokens[:, 6:], greedy.tokens)
  cached = list(tmp_path.glob("distill-*.npz"))
  assert len(cached) == 1
  again, _ = distill.generate(params, cfg, stream, cache_dir=tmp_path, **kw)
  np.testing.assert_array_equal(again, tokens)
  assert len(list(tmp_path.glob("distill-*.npz"))) == 1


def test_sampled_distillation_data_is_the_teachers_samples(base, tmp_path):
  """distill.temperature > 0: each batch of rows is the teacher's ancestral
  sample with its own key, cached apart from the greedy data."""
  cfg, params, _, _ = base
  stream = np.arange(200, dtype=np.int32) % 97
  kw = dict(num_sequences=5, prefix_len=6, new_tokens=10, batch_size=4, seed=1,
            cache_dir=tmp_path)
  greedy, _ = distill.generate(params, cfg, stream, **kw)
  tokens, mask = distill.generate(params, cfg, stream, temperature=1.5, **kw)
  assert tokens.shape == mask.shape == (5, 16)
  np.testing.assert_array_equal(mask[:, :6], 0)
  np.testing.assert_array_equal(mask[:, 6:], 1)
  np.testing.assert_array_equal(tokens[:, :6], greedy[:, :6])  # Same prefixes.
  assert (tokens[:, 6:] != greedy[:, 6:]).any()
  sampling = blockdec.Sampling(temperature=1.5)
  for i, rows in ((0, slice(0, 4)), (1, slice(4, 5))):
    # The last batch is padded to 4 rows; its real row is row 0 of the call.
    prefixes = np.zeros((4, 6), np.int32)
    prefixes[:rows.stop - rows.start] = tokens[rows, :6]
    want = blockdec.decode(params, cfg, prefixes, np.full(4, 6, np.int32), 10,
                           method=blockdec.Autoregressive(), sampling=sampling,
                           key=jax.random.fold_in(jax.random.key(1), i))
    np.testing.assert_array_equal(
        tokens[rows, 6:], np.asarray(want.tokens)[:rows.stop - rows.start])
  assert len(list(tmp_path.glob("distill-*.npz"))) == 2
  again, _ = distill.generate(params, cfg, stream, temperature=1.5, **kw)
  np.testing.assert_array_equal(again, tokens)
  assert len(list(tmp_path.glob("distill-*.npz"))) == 2
  with pytest.raises(ValueError, match="temperature"):
    distill.generate(params, cfg, stream, temperature=-1.0, **kw)


def test_a_teacher_with_heads_distills_as_its_base(base, tmp_path):
  """A run that starts from a heads model (the "both" regime starts from the
  distillation run) gets its base's greedy outputs from the cache."""
  cfg, params, _, _ = base
  for overrides in ({"num_prediction_heads": 4, "head_hidden": 0},
                    {"num_prediction_heads": 3, "head_type": "hydra"},
                    {"eagle_layers": 1}):
    heads_cfg, heads_params = train.heads_model(cfg, params, overrides, seed=3)
    assert heads_cfg != cfg
    got_cfg, got_params = train.greedy_teacher(heads_cfg, heads_params)
    assert got_cfg == cfg, overrides
    jax.tree_util.tree_map(np.testing.assert_array_equal, got_params, params)
  assert train.greedy_teacher(cfg, params)[1] is params
  stream = np.arange(200, dtype=np.int32) % 97
  kw = dict(num_sequences=3, prefix_len=5, new_tokens=6, batch_size=3, seed=0,
            cache_dir=tmp_path)
  first, _ = distill.generate(params, cfg, stream, **kw)
  again, _ = distill.generate(*reversed(train.greedy_teacher(
      *train.heads_model(cfg, params, {"num_prediction_heads": 4}, seed=1))),
                              stream, **kw)
  np.testing.assert_array_equal(again, first)
  assert len(list(tmp_path.glob("distill-*.npz"))) == 1


def test_bad_configs_and_corpora_fail_clearly(base, corpus, tmp_path):
  cases = [({"regime": "sometimes"}, "regime"),
           ({"steps": 0}, "steps"),
           ({"batch_size": -1}, "batch_size"),
           ({"data.tokenizer": "chars"}, "tokenizer"),
           ({"optim.learning_rate": 0.0}, "learning_rate"),
           ({"data.corpus": str(tmp_path / "missing")}, "missing"),
           ({"data.corpus": str(tmp_path)}, "matches no files"),
           ({"model.d_model": 31}, "d_model"),
           ({"data.seq_len": 1000}, "seq_len"),
           ({"distill.temperature": -0.5}, "temperature"),
           ({"cpu_ynn_dots_only": "yes"}, "cpu_ynn_dots_only='yes'")]
  for changes, match in cases:
    with pytest.raises((ValueError, FileNotFoundError), match=match):
      train.Trainer(tiny("base_lm", corpus, **changes), tmp_path / "run")
  translation = pipeline.load_config("configs/translation.py", "tiny")
  translation.distill.temperature = 0.6
  with pytest.raises(ValueError, match="decoder-only teachers"):
    defaults.check_config(translation)
  frozen = tiny("heads_frozen", corpus)
  frozen.base = None
  with pytest.raises(ValueError, match="init_from"):
    train.Trainer(frozen, tmp_path / "h")
  cfg, params, tokenizer, _ = base
  with pytest.raises(ValueError, match="num_prediction_heads"):
    train.Trainer(tiny("heads_frozen", corpus,
                       **{"model.num_prediction_heads": 1}),
                  tmp_path / "h1", init=(cfg, params, tokenizer))
  with pytest.raises(ValueError, match="shape"):
    train.Trainer(tiny("heads_frozen", corpus, model={"d_model": 64}),
                  tmp_path / "h2", init=(cfg, params, tokenizer))


def test_checkpoint_round_trip_and_errors(base, tmp_path):
  cfg, params, tokenizer, _ = base
  blockdec.save_checkpoint(tmp_path / "ck", cfg, params, tokenizer)
  cfg2, params2, tok2 = blockdec.load_checkpoint(tmp_path / "ck")
  assert cfg2 == cfg and tok2.kind == "bytes"
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)

  with pytest.raises(FileNotFoundError, match="does not exist"):
    blockdec.load_checkpoint(tmp_path / "nothing")
  (tmp_path / "ck" / "params.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="params.safetensors"):
    blockdec.load_checkpoint(tmp_path / "ck")
  blockdec.save_checkpoint(tmp_path / "ck", cfg, params, tokenizer)
  other = cfg.replace(n_layers=cfg.n_layers + 1)
  (tmp_path / "ck" / "model_config.json").write_text(json.dumps(other.to_dict()))
  with pytest.raises(ValueError, match="do not match the config"):
    blockdec.load_checkpoint(tmp_path / "ck")
  (tmp_path / "ck" / "model_config.json").unlink()
  with pytest.raises(FileNotFoundError, match="model_config.json"):
    blockdec.load_checkpoint(tmp_path / "ck")


def test_pipeline_reuses_the_cache(base, corpus, tmp_path):
  config = tiny("heads_frozen", corpus, steps=1)
  config.diagnostics.num_prompts = 0
  config.base = tiny("base_lm", corpus, steps=3, workdir=str(base[3]))
  logs = []
  first = pipeline.train_or_load(config, tmp_path, log=logs.append)
  assert [l.split()[0] for l in logs] == ["[cache]", "[train]"]
  logs.clear()
  second = pipeline.train_or_load(config, tmp_path, log=logs.append)
  assert [l.split()[0] for l in logs] == ["[cache]", "[cache]"]
  assert second.workdir == first.workdir
  jax.tree_util.tree_map(np.testing.assert_array_equal, first.params,
                         second.params)
  changed = config.copy_and_resolve_references()
  changed.optim.learning_rate = 1e-4
  assert pipeline.config_key(changed) != pipeline.config_key(config)
  changed.progress = True  # Not part of the key.
  changed.cpu_ynn_dots_only = "off"  # Nor is how XLA compiles the step.
  changed.optim.learning_rate = config.optim.learning_rate
  assert pipeline.config_key(changed) == pipeline.config_key(config)
  # distill.temperature came after runs were cached: at its default (greedy
  # data) a config keys as one without the field; sampled data keys apart.
  older = config.copy_and_resolve_references()
  with older.unlocked():
    del older.distill["temperature"]
  assert pipeline.config_key(older) == pipeline.config_key(config)
  changed.distill.temperature = 0.6
  assert pipeline.config_key(changed) != pipeline.config_key(config)


def test_head_agreement_on_an_oracle():
  rng = np.random.RandomState(0)
  seq = rng.randint(0, 50, size=(2, 12))
  start, end = np.array([3, 5]), np.array([12, 10])
  k = 3
  pred = np.zeros((2, 12, k), np.int64)
  for i in range(1, k + 1):  # Head i predicts seq[t + i] ...
    pred[:, :12 - i, i - 1] = seq[:, i:]
  pred[0, 3, 1] = -1  # ... except head 2 misses once, head 3 never agrees.
  pred[:, :, 2] = -1
  hits, counts = diagnostics.agreement_counts(pred, seq, start, end)
  # Valid t: start <= t and t + i < end, so end - i - start per row.
  expected_counts = [(12 - i - 3) + (10 - i - 5) for i in range(1, k + 1)]
  np.testing.assert_array_equal(counts, expected_counts)
  np.testing.assert_array_equal(hits, [expected_counts[0],
                                       expected_counts[1] - 1, 0])


def test_head_agreement_of_head_one_is_perfect(base):
  cfg, params, tokenizer, _ = base
  prompts, lengths = train.pad_prompts(
      [tokenizer.encode("def gamma(x):\n"), tokenizer.encode("# f")])
  agree = diagnostics.head_agreement(params, cfg, prompts, lengths, 10)
  assert agree.shape == (1,) and agree[0] == pytest.approx(1.0)


def test_draft_model_trains_on_the_base_vocabulary_and_resumes(base, corpus,
                                                              tmp_path):
  """configs/draft_model.py:tiny: a fresh small model distilled from the base;
  a run killed after step 3 resumes to the uninterrupted run's parameters."""
  cfg, params, tokenizer, _ = base
  config = tiny("draft_model", corpus, steps=4, checkpoint_every=2,
                log_every=1, **{"distill.cache_dir": str(tmp_path / "distill")})
  summary, (dcfg, _, dtok) = train_killed_and_resumed(
      config, tmp_path, (cfg, params, tokenizer))
  assert (dcfg.vocab_size, dcfg.max_seq_len) == (cfg.vocab_size, cfg.max_seq_len)
  assert (dcfg.d_model, dcfg.num_prediction_heads) == (16, 1)
  assert dtok.kind == tokenizer.kind
  assert summary["regime"] == "draft" and np.isfinite(summary["valid"]["loss"])
  report = summary["draft_agreement"]
  assert 0 <= report["agreement"] <= 1
  assert set(report["tokens_per_call"]) == {4, 8}
  assert len(list((tmp_path / "distill").glob("distill-*.npz"))) == 1


def test_bad_draft_configs_fail_clearly(base, corpus, tmp_path):
  init = base[:3]
  cases = [({"model.vocab_size": 300}, "share its base's vocabulary"),
           ({"model.num_prediction_heads": 2}, "head 1 only"),
           ({"model.n_heads": 5}, "d_model=16 must be divisible by n_heads=5")]
  for changes, match in cases:
    with pytest.raises(ValueError, match=match):
      train.Trainer(tiny("draft_model", corpus, **changes), tmp_path / "d",
                    init=init)
  orphan = tiny("draft_model", corpus)
  orphan.base = None
  with pytest.raises(ValueError, match="distill a draft from"):
    train.Trainer(orphan, tmp_path / "o")
  with pytest.raises(ValueError, match="draft_model preset 'huge' unknown"):
    pipeline.load_config(ROOT / "configs" / "draft_model.py", "huge")


def test_draft_tokens_per_call_on_an_oracle():
  match = np.array([[1, 1, 0, 1, 1, 1, 1, 0, 0]], bool)  # Continuation: t 0..7.
  start, end = np.array([0]), np.array([9])
  # Block 4 (3 drafted): [1 1 0] [1 1 1 1] [0] -> 8 tokens in 3 calls;
  # block 2: [1 1] [0] [1 1] [1 1] [0] -> 5 calls; a draft that never agrees
  # gives 1 per call, one that always agrees block_size (but the last call).
  assert diagnostics.draft_tokens_per_call(match, start, end, 4) == 8 / 3
  assert diagnostics.draft_tokens_per_call(match, start, end, 2) == 8 / 5
  assert diagnostics.draft_tokens_per_call(~match & False, start, end, 4) == 1.0
  assert diagnostics.draft_tokens_per_call(match | True, start, end, 4) == 4.0
  assert diagnostics.draft_tokens_per_call(match | True, start, end, 5) == 4.0


def test_head_regimes_on_distilled_rows_reuse_the_trunks_states(
    base, corpus, tmp_path):
  """Heads trained on a frozen trunk over distilled rows that the steps
  visit more than once: the batches carry the trunk's states, computed once
  (`Trainer.frozen_trunk_features`), the step gives what it gives from the
  tokens alone, and a killed run resumes exactly. Regimes that move the
  trunk, and runs that visit each row once, compute it in the step."""
  cfg, params, tokenizer, _ = base
  init = (cfg, params, tokenizer)

  def hydra_distill(steps):
    config = pipeline.load_config(ROOT / "configs" / "heads_hydra.py",
                                  "tiny_distill")
    config.data.corpus = str(corpus)
    config.data.valid_fraction, config.data.test_fraction = 0.2, 0.1
    config.progress, config.steps = False, steps
    config.checkpoint_every, config.eval_every = 1, steps
    config.distill.cache_dir = str(tmp_path / "distill")
    return config

  config = hydra_distill(steps=6)  # 6 x 4 rows over 8 distilled rows.
  assert config.regime == "distill" and config.distill.num_sequences == 8
  trainer = train.Trainer(config, tmp_path / "run", init=init)
  batch = trainer.batches.batch(0)
  assert batch["hidden"].shape == (4, batch["tokens"].shape[1] - 1,
                                   cfg.d_model)
  np.testing.assert_allclose(
      batch["hidden"], train.trunk_states(trainer.initial_state.params,
                                          trainer.cfg, batch["tokens"][:, :-1]),
      rtol=1e-5, atol=1e-6)
  state = trainer.initial_state
  with_states = trainer.train_step(state, batch)
  without = trainer.train_step(state, {k: v for k, v in batch.items()
                                       if k != "hidden"})
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      with_states, without)
  train_killed_and_resumed(config, tmp_path / "resume", init)

  once = train.Trainer(hydra_distill(steps=2), tmp_path / "once", init=init)
  assert "hidden" not in once.batches.batch(0)
  finetune = tiny("heads_distill", corpus, regime="distill_finetune",
                  steps=6, **{"distill.cache_dir": str(tmp_path / "distill")})
  moving = train.Trainer(finetune, tmp_path / "moving", init=init)
  assert "hidden" not in moving.batches.batch(0)
  assert moving.frozen_trunk_features(batch["tokens"]) == {}
