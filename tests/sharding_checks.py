"""Sharded checks on 8 fake CPU devices, run in their own process.

`XLA_FLAGS=--xla_force_host_platform_device_count=8` only takes effect if it
is set before jax is first imported, and pytest (and its xdist workers)
import jax long before any test runs, so tests/test_sharding.py launches

    python tests/sharding_checks.py CASE [CASE ...]

and asserts that it exits 0. Each case raises AssertionError with the reason
on failure. Several cases share one process to pay for jax's start-up and
the compiles once.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import compile_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

# The fast-compile flags change no semantics; compiles dominate these checks.
os.environ["XLA_FLAGS"] = compile_flags.with_fast_compile(
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position
import time

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

import blockdec
from blockdec import sharding

MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
BATCH = 8


def tiny_model(**overrides):
  """Heads, vocabulary and MLP divisible by 8; 4 KV heads (GQA) so that the
  (1, 8) mesh exercises the replicate-if-not-divisible fallback."""
  kw = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4,
            d_ff=128, max_seq_len=48, num_prediction_heads=4,
            tie_embeddings=False)
  kw.update(overrides)
  cfg = blockdec.ModelConfig(**kw)
  params = blockdec.init_params(cfg, jax.random.key(1))
  # Sharpen the random model so argmaxes are not near-ties.
  params = jax.tree_util.tree_map(lambda x: x * 2.0, params)
  return cfg, params


def prompts_and_lengths(vocab):
  rng = np.random.RandomState(0)
  lengths = rng.randint(2, 9, size=BATCH).astype(np.int32)
  prompts = rng.randint(0, vocab, size=(BATCH, 8)).astype(np.int32)
  return prompts, lengths


def _spec(x):
  return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))


def _assert_sharded(x, spec, mesh, name):
  """`x` has PartitionSpec `spec` and per-device shards of the right shape."""
  assert _spec(x) == tuple(spec), f"{name}: spec {x.sharding.spec}, want {spec}"
  want = tuple(d // (mesh.shape[a] if a else 1)
               for d, a in zip(x.shape, spec))
  shards = x.addressable_shards
  assert len(shards) == 8, f"{name}: {len(shards)} shards"
  for shard in shards:
    assert shard.data.shape == want, (
        f"{name}: shard shape {shard.data.shape}, want {want} on {mesh}")


def check_mesh():
  mesh = blockdec.make_mesh((4, 2))
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(blockdec.make_mesh((-1, 1)).shape) == {"data": 8, "model": 1}
  for bad in ((3, 2), (0, 8), (-1, -1)):
    try:
      blockdec.make_mesh(bad)
    except ValueError as e:
      assert str(bad[0]) in str(e), e
    else:
      raise AssertionError(f"make_mesh({bad}) did not raise")


def check_params_sharding():
  """Leaves are sharded as DEFAULT_RULES / FSDP_RULES say, shards sized so."""
  cfg, params = tiny_model()
  for shape in MESHES:
    mesh = blockdec.make_mesh(shape)
    data, model = shape
    sp = blockdec.shard_params(params, cfg, mesh)
    layer = sp["layer_1"]
    expect = {
        "embed": (sp["embed"]["embedding"], ("model", None)),
        "q": (layer["attn"]["q"]["kernel"], (None, "model")),
        # [d, H_kv * D] = [64, 32]: divisible by 8 even with 4 KV heads.
        "k": (layer["attn"]["k"]["kernel"], (None, "model")),
        "o": (layer["attn"]["o"]["kernel"], ("model", None)),
        "gate": (layer["mlp"]["gate"]["kernel"], (None, "model")),
        "down": (layer["mlp"]["down"]["kernel"], ("model", None)),
        "norm": (layer["attn_norm"]["scale"], (None,)),
        "lm_head": (sp["lm_head"]["kernel"], (None, "model")),
        "fc1": (sp["proposal_heads"]["head_3"]["fc1"]["kernel"],
                (None, "model")),
        "fc2": (sp["proposal_heads"]["head_3"]["fc2"]["kernel"],
                ("model", None)),
    }
    for name, (x, spec) in expect.items():
      _assert_sharded(x, spec, mesh, f"{name} on {shape}")
    # Values are untouched.
    for a, b in zip(jax.tree_util.tree_leaves(params),
                    jax.tree_util.tree_leaves(sp)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # FSDP: d_model over data as well.
    fp = blockdec.shard_params(params, cfg, mesh, sharding.FSDP_RULES)
    _assert_sharded(fp["layer_0"]["attn"]["q"]["kernel"], ("data", "model"),
                    mesh, f"fsdp q on {shape}")
    _assert_sharded(fp["layer_0"]["mlp"]["down"]["kernel"], ("model", "data"),
                    mesh, f"fsdp down on {shape}")
  # Not divisible: replicated instead of an error.
  mesh = blockdec.make_mesh((4, 2))
  assert sharding.logical_to_spec(("embed", "vocab"), (64, 63), mesh) == P(
      None, None)
  assert sharding.logical_to_spec(("batch", None), (6, 3), mesh) == P(
      None, None)
  assert sharding.logical_to_spec(("embed", "heads"), (64, 64), mesh,
                                  sharding.FSDP_RULES) == P("data", "model")
  # Created in shards directly: same values as the one-device init.
  mesh = blockdec.make_mesh((2, 4))
  direct = sharding.init_params(cfg, jax.random.key(1), mesh)
  ref = blockdec.init_params(cfg, jax.random.key(1))
  for a, b in zip(jax.tree_util.tree_leaves(ref),
                  jax.tree_util.tree_leaves(direct)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0)
  _assert_sharded(direct["embed"]["embedding"], ("model", None), mesh,
                  "sharded init embed")


def check_decode(backends=("xla",), meshes=MESHES, fns=None):
  """Sharded greedy and blockwise decoding == one-device decoding."""
  # One layer (compiles dominate); tied embeddings: the vocabulary-sharded
  # table serves both the gather and the output projection.
  cfg, params, prompts, lengths, ref_greedy = _decode_setup()
  kw = dict(max_new_tokens=10)
  ref_block = blockdec.blockwise_decode(params, cfg, prompts, lengths, **kw)
  np.testing.assert_array_equal(ref_greedy.tokens, ref_block.tokens)
  for backend in backends:
    bcfg = cfg.replace(attention_backend=backend)
    for shape in meshes:
      mesh = blockdec.make_mesh(shape)
      sp = blockdec.shard_params(params, bcfg, mesh)
      for fn, ref in ((blockdec.greedy_decode, ref_greedy),
                      (blockdec.blockwise_decode, ref_block)):
        if fns is not None and fn.__name__ not in fns:
          continue
        out = fn(sp, bcfg, prompts, lengths, mesh=mesh, **kw)
        where = f"{fn.__name__} backend={backend} mesh={shape}"
        np.testing.assert_array_equal(np.asarray(out.tokens), ref.tokens,
                                      err_msg=where)
        np.testing.assert_array_equal(np.asarray(out.lengths), ref.lengths,
                                      err_msg=where)
        np.testing.assert_array_equal(np.asarray(out.num_calls),
                                      ref.num_calls, err_msg=where)
        assert _spec(out.tokens)[0] == "data" or shape[0] == 1, (
            where, out.tokens.sharding)


def _decode_setup():
  """check_decode's model and prompts, and their greedy decode."""
  cfg, params = tiny_model(n_layers=1, tie_embeddings=True)
  prompts, lengths = prompts_and_lengths(cfg.vocab_size)
  ref_greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                      max_new_tokens=10)
  return cfg, params, prompts, lengths, ref_greedy


def check_decode_methods():
  """Every method of the core runs sharded as on one device: refined drafts
  as a token tree, speculative sampling (same key: same samples), and the
  drafters without heads."""
  cfg, params, prompts, lengths, ref_greedy = _decode_setup()
  draft_cfg, draft_params = tiny_model(n_layers=1, num_prediction_heads=1)
  one_mesh = ((4, 2),)
  runs = (
      (dict(method=blockdec.Refined(block_size=3, num_drafts=2)), None),
      (dict(method=blockdec.Blockwise(3), sampling=blockdec.Sampling(0.8),
            key=jax.random.key(5)), None),
      # The drafters without heads: a draft model's cache in the carry,
      # prompt lookup, and lookahead's extra nodes in a tree call.
      (dict(method=blockdec.DraftModel(draft_cfg, draft_params, block_size=3),
            sampling=blockdec.Sampling(0.8), key=jax.random.key(6)), one_mesh),
      (dict(method=blockdec.PromptLookup(ngram=2, block_size=3)), one_mesh),
      (dict(method=blockdec.Lookahead(window=3, ngram=3, guesses=2)),
       one_mesh),
  )
  for run, meshes in runs:
    ref = blockdec.decode(params, cfg, prompts, lengths, 10, **run)
    if "sampling" not in run:
      np.testing.assert_array_equal(ref.tokens, ref_greedy.tokens)
    for shape in meshes or ((4, 2), (1, 8)):
      mesh = blockdec.make_mesh(shape)
      out = blockdec.decode(blockdec.shard_params(params, cfg, mesh), cfg,
                            prompts, lengths, 10, mesh=mesh, **run)
      where = f"{run} mesh={shape}"
      np.testing.assert_array_equal(np.asarray(out.tokens), ref.tokens,
                                    err_msg=where)
      np.testing.assert_array_equal(np.asarray(out.num_calls), ref.num_calls,
                                    err_msg=where)


def check_decode_model_drafters():
  """Block diffusion, EAGLE and Hydra run sharded as on one device."""
  cfg, params, prompts, lengths, ref_greedy = _decode_setup()
  # Block diffusion: denoising calls through View.score on the sharded
  # cache and, with the sub-block cache, View.write_score into it under a
  # per-row pattern, then the self-speculative causal call, fused (the next
  # block's guessed groups as extra nodes of that call).
  bd_cfg = cfg.replace(mask_token_id=cfg.vocab_size - 1)
  method = blockdec.BlockDiffusion(3, 0.5, acceptance=blockdec.Exact(),
                                   next_block_guesses=1, sub_block_size=1)
  ref = blockdec.decode(params, bd_cfg, prompts, lengths, 10, method=method)
  np.testing.assert_array_equal(ref.tokens, ref_greedy.tokens)
  mesh = blockdec.make_mesh((4, 2))
  out = blockdec.decode(blockdec.shard_params(params, bd_cfg, mesh), bd_cfg,
                        prompts, lengths, 10, mesh=mesh, method=method)
  np.testing.assert_array_equal(np.asarray(out.tokens), ref.tokens)
  np.testing.assert_array_equal(np.asarray(out.num_calls), ref.num_calls)
  # The EAGLE drafter: its parameters sharded with the model's, its cache
  # in the carry, the target's states through View.features; a chain
  # sampled and a tree greedy.
  e_cfg = cfg.replace(eagle_layers=1)
  e_params = blockdec.init_params(e_cfg, jax.random.key(7))
  mesh = blockdec.make_mesh((4, 2))
  for run in (dict(method=blockdec.Eagle(3), sampling=blockdec.Sampling(0.8),
                   key=jax.random.key(8)),
              dict(method=blockdec.Eagle(3, num_drafts=2))):
    ref = blockdec.decode(e_params, e_cfg, prompts, lengths, 10, **run)
    out = blockdec.decode(blockdec.shard_params(e_params, e_cfg, mesh), e_cfg,
                          prompts, lengths, 10, mesh=mesh, **run)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref.tokens,
                                  err_msg=str(run))
    np.testing.assert_array_equal(np.asarray(out.num_calls), ref.num_calls,
                                  err_msg=str(run))
  # Hydra heads: their joins (fc_in) sharded by the rules, drafting one
  # after the other from View.features.
  h_cfg = cfg.replace(head_type="hydra")
  h_params = blockdec.init_params(h_cfg, jax.random.key(9))
  ref = blockdec.decode(h_params, h_cfg, prompts, lengths, 10,
                        method=blockdec.Blockwise(3))
  np.testing.assert_array_equal(ref.tokens, blockdec.greedy_decode(
      h_params, h_cfg, prompts, lengths, max_new_tokens=10).tokens)
  out = blockdec.decode(blockdec.shard_params(h_params, h_cfg, mesh), h_cfg,
                        prompts, lengths, 10, mesh=mesh,
                        method=blockdec.Blockwise(3))
  np.testing.assert_array_equal(np.asarray(out.tokens), ref.tokens)
  np.testing.assert_array_equal(np.asarray(out.num_calls), ref.num_calls)


def check_decode_pallas():
  """The Pallas kernel under shard_map (batch and KV heads split) == xla on
  one device. (2, 4) splits both; (1, 8) must replicate the 4 KV heads."""
  check_decode(backends=("pallas",), meshes=((2, 4), (1, 8)),
               fns=("blockwise_decode",))
  # The kernel really runs per shard: under a mesh the attention is a
  # shard_map; without one it is not.
  from blockdec.models import attention  # pylint: disable=g-import-not-at-top
  q = jax.ShapeDtypeStruct((BATCH, 3, 8, 8), "float32")
  kv = jax.ShapeDtypeStruct((BATCH, 3, 4, 8), "float32")  # [B, T, H_kv, D]
  cache = jax.eval_shape(lambda: blockdec.KVCache.make(
      num_layers=1, batch=BATCH, length=16, num_kv_heads=4, head_dim=8))
  pos = jax.ShapeDtypeStruct((BATCH, 3), "int32")
  f = lambda q, k, v, c, p: attention.cached_attention(q, k, v, c, 0, p,
                                                       backend="pallas")
  with jax.set_mesh(blockdec.make_mesh((2, 4))):
    jaxpr = str(jax.make_jaxpr(f)(q, kv, kv, cache, pos))
  assert "shard_map" in jaxpr and "P('data', None, 'model', None)" in jaxpr, (
      jaxpr[:2000])
  assert "shard_map" not in str(jax.make_jaxpr(f)(q, kv, kv, cache, pos))
  # A per-row runtime pattern (block diffusion's sub-block cache) is split
  # with the rows: each shard's rows keep their own patterns.
  rng = np.random.RandomState(0)
  q, k, v = (rng.randn(BATCH, 3, *heads, 8).astype(np.float32)
             for heads in ((8,), (4,), (4,)))
  cache = blockdec.KVCache.make(num_layers=1, batch=BATCH, length=16,
                                num_kv_heads=4, head_dim=8)
  cache = cache.replace(k=(jax.numpy.asarray(
      rng.randn(BATCH, 4, 8, 16).astype(np.float32)),), v=(jax.numpy.asarray(
          rng.randn(BATCH, 4, 16, 8).astype(np.float32)),))
  pos = (rng.randint(0, 12, (BATCH, 1)) + np.arange(3)).astype(np.int32)
  patterns = (rng.rand(BATCH, 3, 3) < 0.5) | np.eye(3, dtype=bool)
  from blockdec import kernels  # pylint: disable=g-import-not-at-top
  mask = kernels.RuntimePatternMask(patterns)
  g = jax.jit(lambda q, k, v, c, p, m: attention.cached_attention(
      q, k, v, c, 0, p, backend="pallas", mask=m)[0])
  want = g(q, k, v, cache, pos, mask)
  with jax.set_mesh(blockdec.make_mesh((2, 4))):
    got = g(q, k, v, cache, pos, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6,
                             rtol=1e-6)


def check_cache_sharding():
  """The KV cache inside the sharded decode is split as the rules say."""
  from blockdec import api  # pylint: disable=g-import-not-at-top
  from blockdec.decoding import DecodeOptions  # pylint: disable=g-import-not-at-top
  cfg, params = tiny_model(n_layers=1)
  # The decode program pins each layer's cache [B, H_kv, ...] to data=4 x model=2.
  mesh = blockdec.make_mesh((4, 2))
  prompts, lengths = prompts_and_lengths(cfg.vocab_size)
  fn, param_sh, prompt_sh, row_sh = api._sharded_decoder(  # pylint: disable=protected-access
      cfg, DecodeOptions(max_new_tokens=4, block_size=2),
      blockdec.Blockwise(2), mesh, sharding.DEFAULT_RULES, prompts.shape)
  with jax.set_mesh(mesh):
    hlo = fn.lower(jax.device_put(params, param_sh),
                   jax.device_put(prompts, prompt_sh),
                   jax.device_put(lengths, row_sh), None, None).as_text()
  # Shardy: at creation (k, v) and after every model call (prefill, loop).
  pinned = '{"data"}, {"model"}, {}, {}]>'
  assert hlo.count("sharding_constraint") >= 4 and hlo.count(pinned) >= 4, (
      "cache sharding constraints missing from the decode program")
  for shape, kv in (((4, 2), "model"), ((1, 8), None)):
    mesh = blockdec.make_mesh(shape)
    cache = jax.eval_shape(
        lambda: blockdec.models.transformer.make_cache(cfg, BATCH, 16))
    sh = sharding.cache_shardings(mesh, cache)
    assert all(tuple(s.spec) == ("data", kv, None, None) for s in sh.k), sh.k
    assert tuple(sh.end_index.spec) == ("data",), sh.end_index.spec


def check_checkpoint():
  """Saved from a (4, 2) mesh, restored onto (2, 4) with the new shardings."""
  cfg, params = tiny_model()
  src = blockdec.make_mesh((4, 2))
  dst = blockdec.make_mesh((2, 4))
  sp = blockdec.shard_params(params, cfg, src, sharding.FSDP_RULES)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "params")
    sharding.save_checkpoint(path, sp)
    restored = sharding.restore_params(path, cfg, dst)
  want = sharding.param_shardings(cfg, dst)
  for a, b, s in zip(jax.tree_util.tree_leaves(params),
                     jax.tree_util.tree_leaves(restored),
                     jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert b.sharding.is_equivalent_to(s, b.ndim), (b.sharding, s)
  _assert_sharded(restored["layer_0"]["attn"]["k"]["kernel"],
                  (None, "model"), dst, "restored k")


def _tree_close(a, b, where, rtol=2e-5, atol=2e-6):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(
        np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
        err_msg=f"{where}: {jax.tree_util.keystr(path)}")


def check_train_step():
  """The trainer's step, sharded (DP, TP, DP+TP, FSDP) == one device.

  The optimizer is clipped SGD with momentum: unlike Adam's first step
  (update ~ lr * g / |g|, which turns the rounding of a near-zero gradient
  into a change of up to lr) it keeps float tolerances meaningful. The
  optimizer is elementwise apart from the global norm, so this still covers
  what sharding changes: the gradients, their all-reduces and the norm.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from blockdec.models import transformer  # pylint: disable=g-import-not-at-top
  from blockdec.training import train  # pylint: disable=g-import-not-at-top
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.sgd(0.5, momentum=0.9))
  schedule = lambda step: 0.5
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, 64, size=(BATCH, 17)).astype(np.int32)
  for regime, heads, meshes in (
      # (4, 2) with FSDP: d_model over data, heads/MLP/vocab over model.
      ("base", 1, ((8, 1), (4, 2, "fsdp"), (2, 4), (1, 8))),
      ("frozen", 4, ((2, 4, "fsdp"),)),
      # Hydra heads through slot tables on the trunk's states that the
      # batch carries (Trainer.frozen_trunk_features).
      ("distill", 4, ((4, 2),))):
    hydra = {"head_type": "hydra"} if regime == "distill" else {}
    cfg, params = tiny_model(n_layers=1, num_prediction_heads=heads, **hydra)
    batch = {"tokens": tokens, "mask": np.ones(tokens.shape, np.float32)}
    if hydra:
      assert transformer.hydra_slots_pay_off(cfg, heads, tokens[:, 1:].size)
      batch["hidden"] = np.asarray(train.trunk_states(params, cfg,
                                                      tokens[:, :-1]))
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state=optimizer.init(train.trainable(params, regime)))
    step_fn = train.make_train_step(cfg, regime, optimizer, schedule)
    ref_state, ref_metrics = jax.jit(step_fn)(state, batch)
    for shape in meshes:
      fsdp = shape[2:] == ("fsdp",)
      mesh = blockdec.make_mesh(shape[:2])
      config = sharding.ShardingConfig(mesh_shape=shape[:2], fsdp=fsdp)
      step, state_sh, batch_sh, _ = sharding.shard_train_step(
          step_fn, state, mesh, config, batch_size=BATCH)
      new_state, metrics = step(jax.device_put(state, state_sh),
                                sharding.put_batch(batch, batch_sh))
      where = f"{regime} train step on {shape}"
      _tree_close(ref_metrics, metrics, where)
      _tree_close(ref_state, new_state, where)
      # Parameters and momenta stay sharded as the rules say.
      embed = "data" if fsdp else None
      _assert_sharded(new_state.params["layer_0"]["mlp"]["up"]["kernel"],
                      (embed, "model"), mesh, where + " up")
      momenta = [(jax.tree_util.keystr(p), x) for p, x in
                 jax.tree_util.tree_leaves_with_path(new_state.opt_state)
                 if jax.tree_util.keystr(p).endswith(
                     ("['fc1']['kernel']", "['up']['kernel']"))]
      assert momenta, where
      for path, x in momenta:
        _assert_sharded(x, (embed, "model"), mesh, f"{where} {path}")


def check_trainer():
  """The training CLI path: config.sharding.mesh_shape makes the Trainer run
  sharded; a run checkpointed on (4, 2) resumes on (2, 4); both follow the
  one-device run."""
  import pathlib  # pylint: disable=g-import-not-at-top
  from blockdec.training import pipeline, train  # pylint: disable=g-import-not-at-top
  from tests.test_training_data import write_corpus  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).resolve().parents[1]
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    corpus = write_corpus(tmp / "corpus", n=30)

    def config(mesh_shape):
      c = pipeline.load_config(root / "configs" / "base_lm.py", "tiny")
      c.data.corpus = str(corpus)
      c.data.valid_fraction, c.data.test_fraction = 0.2, 0.1
      c.progress = False
      c.batch_size = 8
      c.eval_every = c.steps  # One held-out evaluation, at the end.
      c.sharding.mesh_shape = mesh_shape
      return c

    assert (pipeline.config_key(config(None))
            == pipeline.config_key(config((4, 2)))), "sharding is not in the key"
    ref, _ = train.Trainer(config(None), tmp / "ref").run()
    trainer = train.Trainer(config((4, 2)), tmp / "sharded")
    half, _ = trainer.run(stop_at_step=2)
    _assert_sharded(half.params["embed"]["embedding"], ("model", None),
                    trainer.mesh, "trainer embed on (4, 2)")
    resumed = train.Trainer(config((2, 4)), tmp / "sharded")
    final, summary = resumed.run()
    assert summary is not None and int(final.step) == int(ref.step)
    _assert_sharded(final.params["embed"]["embedding"], ("model", None),
                    resumed.mesh, "resumed embed on (2, 4)")
    # AdamW: a near-zero gradient element may round to an update of +-lr
    # (first steps are ~ lr * g / |g|), so compare the loss curve tightly and
    # the parameters only to within lr.
    rows = lambda d: [(r["split"], r["step"], r.get("loss"))
                      for r in train.read_metrics(d / "metrics.jsonl")]
    ref_rows, got_rows = rows(tmp / "ref"), rows(tmp / "sharded")
    assert [r[:2] for r in ref_rows] == [r[:2] for r in got_rows], got_rows
    np.testing.assert_allclose([r[2] for r in got_rows],
                               [r[2] for r in ref_rows], rtol=1e-4)
    _tree_close(ref.params, final.params, "trainer (4,2) -> (2,4)", rtol=0,
                atol=2 * config(None).optim.learning_rate)

    # Hydra heads on that base over its distilled rows, on a mesh: the
    # frozen trunk's states are computed once from the sharded parameters
    # (Trainer.frozen_trunk_features) and the run follows the one-device
    # run.
    def hydra(mesh_shape):
      c = pipeline.load_config(root / "configs" / "heads_hydra.py",
                               "tiny_distill")
      c.data.corpus = str(corpus)
      c.data.valid_fraction, c.data.test_fraction = 0.2, 0.1
      c.progress, c.steps, c.eval_every = False, 4, 4  # 16 rows over 8.
      c.distill.cache_dir = str(tmp / "distill")
      c.sharding.mesh_shape = mesh_shape
      return c

    base = blockdec.load_checkpoint(tmp / "ref")
    train.Trainer(hydra(None), tmp / "hydra_ref", init=base).run()
    sharded = train.Trainer(hydra((4, 2)), tmp / "hydra_sharded", init=base)
    assert "hidden" in sharded.batches.batch(0), "states not reused"
    _, summary = sharded.run()
    assert summary is not None
    ref_rows, got_rows = rows(tmp / "hydra_ref"), rows(tmp / "hydra_sharded")
    assert [r[:2] for r in ref_rows] == [r[:2] for r in got_rows], got_rows
    np.testing.assert_allclose([r[2] for r in got_rows],
                               [r[2] for r in ref_rows], rtol=1e-4)


CASES = {name[len("check_"):]: fn for name, fn in globals().items()
         if name.startswith("check_")}


def main(argv):
  assert jax.device_count() == 8, jax.devices()
  names = argv or list(CASES)
  for name in names:
    if name not in CASES:
      raise SystemExit(f"unknown case {name!r}; known: {sorted(CASES)}")
    start = time.perf_counter()
    CASES[name]()
    print(f"ok {name} ({time.perf_counter() - start:.1f}s)", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
