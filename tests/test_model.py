"""The Transformer and its KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blockdec
from blockdec import kernels
from blockdec.models import transformer
from tests.helpers import random_model


def _positions(start, t, batch):
  return jnp.broadcast_to(jnp.arange(start, start + t, dtype=jnp.int32), (batch, t))


@pytest.mark.parametrize("arch", [0, 3, 5])
def test_cached_blocks_match_full_forward_after_rollback(arch):
  """Write a block, roll back part of it, continue: logits equal a fresh pass."""
  cfg, params = random_model(arch)
  rng = np.random.RandomState(arch)
  batch, total = 2, 20
  seq = jnp.asarray(rng.randint(0, cfg.vocab_size, (batch, total)), jnp.int32)
  reference = blockdec.forward_logits(params, cfg, seq)  # [B, T, V]

  cache = transformer.make_cache(cfg, batch, 32)
  # Prefill 8 tokens, then a 6-token block of which only 2 are "accepted".
  _, cache = transformer.apply(params, cfg, seq[:, :8], _positions(0, 8, batch), cache)
  junk = jnp.asarray(rng.randint(0, cfg.vocab_size, (batch, 6)), jnp.int32)
  junk = junk.at[:, :2].set(seq[:, 8:10])
  _, cache = transformer.apply(params, cfg, junk, _positions(8, 6, batch), cache)
  np.testing.assert_array_equal(cache.end_index, 14)
  cache = cache.set_end_index(jnp.full((batch,), 10))  # Roll back 4 slots.
  logits, cache = transformer.apply(params, cfg, seq[:, 10:], _positions(10, 10, batch), cache)
  np.testing.assert_array_equal(cache.end_index, 20)
  np.testing.assert_allclose(logits[:, :, 0], reference[:, 10:], atol=2e-5, rtol=1e-5)


def test_per_row_offsets():
  """Rows write blocks at different offsets in one call."""
  cfg, params = random_model(1)
  rng = np.random.RandomState(0)
  seq = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 12)), jnp.int32)
  reference = blockdec.forward_logits(params, cfg, seq)
  cache = transformer.make_cache(cfg, 2, 20)
  _, cache = transformer.apply(params, cfg, seq[:, :8], _positions(0, 8, 2), cache)
  offsets = jnp.asarray([5, 8])
  block = jnp.stack([seq[0, 5:9], seq[1, 8:12]])
  positions = offsets[:, None] + jnp.arange(4)
  logits, _ = transformer.apply(params, cfg, block, positions, cache)
  # Two programs, float32: sums in different orders (the tests compile
  # without LLVM's passes, tests/conftest.py) differ by ~3e-5 on logits of
  # a few units; a wrong offset differs by whole units.
  np.testing.assert_allclose(logits[0, :, 0], reference[0, 5:9], atol=5e-5)
  np.testing.assert_allclose(logits[1, :, 0], reference[1, 8:12], atol=5e-5)


def test_heads_shapes_and_shared_head_one():
  cfg, params = random_model(2)
  tokens = jnp.zeros((3, 5), jnp.int32)
  logits, _ = transformer.apply(params, cfg, tokens, _positions(0, 5, 3))
  assert logits.shape == (3, 5, cfg.num_prediction_heads, cfg.vocab_size)
  two, _ = transformer.apply(params, cfg, tokens, _positions(0, 5, 3), num_heads=2)
  np.testing.assert_allclose(two, logits[:, :, :2], atol=1e-6)
  assert set(params["proposal_heads"]) == {f"head_{j}" for j in range(2, 9)}


@pytest.mark.parametrize("overrides", [
    dict(tie_embeddings=False),
    dict(norm="layernorm", mlp="gelu", position="learned", qkv_bias=True,
         proj_bias=True),
    dict(rope_scaling=(8.0, 1.0, 4.0, 64)),
    dict(num_prediction_heads=1),
])
def test_architecture_variants_decode_exactly(overrides):
  cfg, params = random_model(4, **overrides)
  if not cfg.tie_embeddings:
    assert "lm_head" in params
  prompts = np.array([[1, 2, 3], [4, 5, 0]], np.int32)
  lengths = np.array([3, 2], np.int32)
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths, max_new_tokens=10)
  block = blockdec.blockwise_decode(params, cfg, prompts, lengths, max_new_tokens=10)
  np.testing.assert_array_equal(block.tokens, greedy.tokens)
  assert np.isfinite(np.asarray(blockdec.forward_logits(params, cfg, prompts))).all()


def test_bfloat16_model_runs():
  """bfloat16: block and one-token calls round differently, so blockwise output
  may drift from greedy at near-ties; this checks it runs and stays sane."""
  cfg, params = random_model(0, dtype="bfloat16", param_dtype="bfloat16")
  assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.bfloat16
  prompts = np.array([[1, 2, 3]], np.int32)
  out = blockdec.blockwise_decode(params, cfg, prompts, np.array([3]), max_new_tokens=8)
  assert out.tokens.shape == (1, 8) and int(out.lengths[0]) == 8


_PREFIX_MASKS = [
    None,
    kernels.TreeMask((-1, 0, 0, 1, 2, -1)),
    kernels.BlockBidirectionalMask(6, sub_block_len=4),
    # One tree per row: a forest, a chain, a star.
    kernels.RuntimeTreeMask(np.array([[-1, 0, 0, 1, 2, -1],
                                      [-1, 0, 1, 2, 3, 4],
                                      [-1, 0, 0, 0, 0, 0]])),
]


@pytest.mark.parametrize("mask", _PREFIX_MASKS,
                         ids=["causal", "tree", "bidir", "runtime_tree"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_prefix_block_attention_equals_masked_attention(mask, heads):
  """Attention to (cached prefix, own block) equals plain masked attention
  over the cache with the block written at its slots."""
  from blockdec.models import attention
  (h, h_kv), b, t, s, d = heads, 3, 6, 20, 8
  rng = np.random.RandomState(0)
  q = rng.randn(b, t, h, d).astype(np.float32)
  k, v = (rng.randn(b, t, h_kv, d).astype(np.float32) for _ in range(2))
  k_cache, v_cache = (rng.randn(b, h_kv, s, d).astype(np.float32)
                      for _ in range(2))  # stale slots hold noise
  offsets = np.array([0, 5, s - t], np.int32)
  pattern = (np.tri(t, dtype=bool) if mask is None
             else np.asarray(mask.pattern()))  # [T, T] or [B, T, T]
  got = attention.prefix_block_attention(  # keys are key-major in the cache
      q, k_cache.swapaxes(2, 3), v_cache, k, v, offsets, pattern)
  k_full, v_full = k_cache.copy(), v_cache.copy()
  for row, off in enumerate(offsets):
    k_full[row, :, off:off + t] = k[row].swapaxes(0, 1)
    v_full[row, :, off:off + t] = v[row].swapaxes(0, 1)
  rows = np.broadcast_to(pattern, (b, t, t))
  visible = np.concatenate([  # [B, T, S]
      kernels.materialize_mask(rows[r], offsets[r:r + 1], s) for r in range(b)])
  want = attention.dot_product_attention(q, k_full, v_full, visible)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_greedy_loop_does_not_copy_the_cache():
  """The one-token write goes into the cache buffers in place.

  XLA copies a buffer that is written while an unordered read of its old
  value is still pending; the attention orders its reads before the write
  (`attention._after`). At batch 1 a regression made every greedy step copy
  each layer's keys and values three times (40% of a demo-model step).
  Outside the loop each buffer is copied once (from the zero-filled cache);
  any copy more means one inside the loop.
  """
  from blockdec import api
  from blockdec.decoding import DecodeOptions
  cfg, params = random_model(0, n_layers=2, n_heads=2, n_kv_heads=2)
  prompts = np.ones((1, 8), np.int32)
  hlo = api._decode.lower(  # pylint: disable=protected-access
      params, prompts, np.array([8], np.int32), None, None, cfg=cfg,
      options=DecodeOptions(max_new_tokens=8, block_size=1),
      method=blockdec.Autoregressive()).compile().as_text()
  s = 8 + 8 + 1
  shape = f"f32[1,{cfg.num_kv_heads},{s},{cfg.dim_per_head}]"
  copies = [line for line in hlo.splitlines()
            if f"= {shape}" in line and " copy(" in line]
  assert len(copies) <= 2 * cfg.n_layers, "\n".join(copies)


def _prefill_then_decode(cfg, params, seq, *, empty_cache, keep=None):
  """The trunk on seq[:, :9] (a fresh cache), then 3 more tokens through
  the cache: (the trunk's hidden states, its cache, the later logits)."""
  batch = seq.shape[0]
  cache = transformer.make_cache(cfg, batch, 24)
  hidden, cache = transformer.Transformer(cfg).apply(
      {"params": params}, seq[:, :9], _positions(0, 9, batch), cache, None,
      empty_cache, keep=keep, method=transformer.Transformer.trunk)
  logits, _ = transformer.apply(params, cfg, seq[:, 9:],
                                _positions(9, 3, batch), cache)
  return hidden, cache, logits


@pytest.mark.parametrize("arch,overrides", [
    (0, {}), (3, {}), (5, dict(position="learned", norm="layernorm",
                               mlp="gelu", qkv_bias=True, proj_bias=True))])
def test_empty_cache_prefill_equals_reading_the_cache(arch, overrides):
  """The prefill trunk (`empty_cache=True`: the cache is written, not read)
  gives the same hidden states and the same cache as the general one, and
  decoding after it continues as after the general one."""
  cfg, params = random_model(arch, **overrides)
  rng = np.random.RandomState(arch)
  batch = 3
  seq = jnp.asarray(rng.randint(0, cfg.vocab_size, (batch, 12)), jnp.int32)
  (h0, c0, l0), (h1, c1, l1) = (
      _prefill_then_decode(cfg, params, seq, empty_cache=empty)
      for empty in (False, True))
  np.testing.assert_allclose(h1, h0, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(c1), jax.tree_util.tree_leaves(c0)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(l1, l0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,overrides", [
    (0, {}), (3, {}), (5, dict(position="learned", norm="layernorm",
                               mlp="gelu", qkv_bias=True, proj_bias=True))])
def test_prefill_keep_returns_the_kept_states_and_the_same_cache(arch,
                                                                 overrides):
  """`Transformer.trunk(keep=...)` (the prefill's outputs at chosen tokens
  only, e.g. each ragged row's last prompt token) returns the full call's
  hidden states at those tokens, writes the same cache, and decoding after
  it continues as after the full call."""
  cfg, params = random_model(arch, **overrides)
  rng = np.random.RandomState(arch)
  batch = 3
  seq = jnp.asarray(rng.randint(0, cfg.vocab_size, (batch, 12)), jnp.int32)
  keep = jnp.asarray([[8, 2], [4, 4], [0, 7]], jnp.int32)  # [B, M]
  (full, c0, l0), (part, c1, l1) = (
      _prefill_then_decode(cfg, params, seq, empty_cache=True, keep=kept)
      for kept in (None, keep))
  assert part.shape == (batch, 2, cfg.d_model)
  np.testing.assert_allclose(part, transformer.take_rows(full, keep),
                             atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(c1), jax.tree_util.tree_leaves(c0)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(l1, l0, atol=1e-5, rtol=1e-5)


def test_prefill_keep_skips_the_last_layers_work_elsewhere():
  """With keep, the last layer's feed-forward runs on the kept rows only:
  the compiled prefill has no [B, P, d_ff] value in that layer."""
  cfg, params = random_model(0, n_layers=2, mlp="swiglu")
  model = transformer.Transformer(cfg)
  batch, p = 2, 9
  seq = jnp.zeros((batch, p), jnp.int32)

  def ff_rows(keep):
    fn = jax.jit(lambda params, cache: model.apply(
        {"params": params}, seq, _positions(0, p, batch), cache, None, True,
        keep=keep, method=transformer.Transformer.trunk))
    hlo = fn.lower(params, transformer.make_cache(cfg, batch, 16)).as_text()
    return hlo.count(f"tensor<{batch}x{p}x{cfg.ff_dim}xf32>")

  full, kept = ff_rows(None), ff_rows(jnp.zeros((batch, 1), jnp.int32))
  assert 0 < kept < full, (kept, full)


def test_prefill_keep_attends_from_the_kept_queries_only():
  """With keep, the last layer projects and attends queries at the kept rows
  only: its attention scores are [B, H_kv, G * M, P] instead of
  [B, H_kv, G * P, P], and a layer without keep keeps the full scores."""
  cfg, params = random_model(0, n_layers=2)
  model = transformer.Transformer(cfg)
  batch, p, m = 2, 9, 3
  seq = jnp.zeros((batch, p), jnp.int32)
  group = cfg.n_heads // cfg.num_kv_heads

  def scores(keep, cache):
    fn = jax.jit(lambda params, cache: model.apply(
        {"params": params}, seq, _positions(0, p, batch), cache, None,
        cache is not None, keep=keep, method=transformer.Transformer.trunk))
    hlo = fn.lower(params, cache).as_text()
    return [hlo.count(f"tensor<{batch}x{cfg.num_kv_heads}x{group * rows}x{p}"
                      "xf32>") for rows in (p, m)]

  keep = jnp.zeros((batch, m), jnp.int32)
  for cache in (None, transformer.make_cache(cfg, batch, 16)):
    (full_p, full_m), (kept_p, kept_m) = scores(None, cache), scores(keep,
                                                                      cache)
    assert full_m == 0 and kept_m > 0, (full_m, kept_m)
    assert 0 < kept_p < full_p, (kept_p, full_p)


_FUSED_ARCHS = [(0, {}), (3, {}), (5, dict(norm="layernorm", mlp="gelu",
                                           qkv_bias=True, proj_bias=True)),
                (6, dict(qkv_bias=True, proj_bias=True))]


@pytest.mark.parametrize("arch,overrides", _FUSED_ARCHS)
def test_fused_projections_give_the_separate_projections_logits(arch,
                                                                  overrides):
  """Decoding's calls (<= FUSED_MAX_TOKENS tokens) through the fused
  query/key/value and gate/up kernels score as the separate kernels do,
  with a cache and without; longer calls (a prefill) keep the separate
  ones."""
  cfg, params = random_model(arch, **overrides)
  fused = transformer.with_fused_projections(
      params, transformer.fused_projections(params, cfg))
  assert "qkv" in fused["layer_0"]["attn"]
  assert ("gate_up" in fused["layer_0"]["mlp"]) == (cfg.mlp == "swiglu")
  rng = np.random.RandomState(arch)
  n = transformer.FUSED_MAX_TOKENS + 1
  seq = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 8 + n)), jnp.int32)
  for t in (1, 4, transformer.FUSED_MAX_TOKENS, n):
    for cache in (None, transformer.make_cache(cfg, 2, 8 + n)):
      start = 0 if cache is None else 8
      if cache is not None:
        _, cache = transformer.apply(params, cfg, seq[:, :8],
                                     _positions(0, 8, 2), cache)
      args = (seq[:, start:start + t], _positions(start, t, 2), cache)
      want, _ = transformer.apply(params, cfg, *args)
      got, _ = transformer.apply(fused, cfg, *args)
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def _dots(hlo: str) -> int:
  return sum(" dot(" in line or "ynn_fusion" in line and " fusion(" in line
             for line in hlo.splitlines())


def test_fused_projections_make_fewer_matrix_products():
  """A one-token call with the fused kernels makes 3 matrix products fewer
  per layer (query, key, value in one; gate, up in one); a prefill-sized
  call makes as many as without them."""
  cfg, params = random_model(0, n_layers=2)
  fused = transformer.with_fused_projections(
      params, transformer.fused_projections(params, cfg))

  def dots(p, t):
    fn = jax.jit(lambda p, x: transformer.apply(p, cfg, x, _positions(0, t, 1),
                                                num_heads=1)[0])
    return _dots(fn.lower(p, jnp.ones((1, t), jnp.int32)).compile().as_text())

  assert dots(fused, 1) == dots(params, 1) - 3 * cfg.n_layers, (
      dots(fused, 1), dots(params, 1))
  t = transformer.FUSED_MAX_TOKENS + 1
  assert dots(fused, t) == dots(params, t)


def test_decode_fuses_the_projections_once_per_weights_on_cpu(monkeypatch):
  """`blockdec.decode` on XLA:CPU adds the fused projections, built once per
  set of weights, with the same tokens as without;
  params it cannot cache (traced under a caller's jit) pass unchanged."""
  from blockdec import api
  cfg, params = random_model(3)
  built = []
  real = api._build_fused  # pylint: disable=protected-access

  def counting(p, cfg):
    built.append(cfg)
    return real(p, cfg)

  monkeypatch.setattr(api, "_build_fused", counting)
  monkeypatch.setattr(api, "_FUSED", {})
  prompts, lengths = np.array([[1, 2, 3], [4, 5, 0]], np.int32), np.array(
      [3, 2], np.int32)
  runs = [blockdec.decode(params, cfg, prompts, lengths, 12,
                          method=blockdec.PromptLookup(block_size=4))
          for _ in range(2)]
  assert built == [cfg]
  np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens)
  monkeypatch.setattr(api, "FUSE_PROJECTIONS_ON_CPU", False)
  plain = blockdec.decode(params, cfg, prompts, lengths, 12,
                          method=blockdec.PromptLookup(block_size=4))
  np.testing.assert_array_equal(plain.tokens, runs[0].tokens)
  assert built == [cfg]
  monkeypatch.setattr(api, "FUSE_PROJECTIONS_ON_CPU", True)
  traced = jax.jit(lambda p: api.with_fused_projections(p, cfg))
  assert "qkv" not in jax.eval_shape(traced, params)["layer_0"]["attn"]


def test_fused_greedy_loop_does_not_copy_the_cache():
  """As test_greedy_loop_does_not_copy_the_cache, with the fused kernels."""
  from blockdec import api
  from blockdec.decoding import DecodeOptions
  cfg, params = random_model(0, n_layers=2, n_heads=2, n_kv_heads=2)
  params = api.with_fused_projections(params, cfg)
  assert "qkv" in params["layer_0"]["attn"]
  hlo = api._decode.lower(  # pylint: disable=protected-access
      params, np.ones((1, 8), np.int32), np.array([8], np.int32), None, None,
      cfg=cfg, options=DecodeOptions(max_new_tokens=8, block_size=1),
      method=blockdec.Autoregressive()).compile().as_text()
  shape = f"f32[1,{cfg.num_kv_heads},17,{cfg.dim_per_head}]"
  copies = [line for line in hlo.splitlines()
            if f"= {shape}" in line and " copy(" in line]
  assert len(copies) <= 2 * cfg.n_layers, "\n".join(copies)


def test_fused_projections_of_freed_weights_are_dropped(monkeypatch):
  """The cache of fused kernels keeps no copy of weights freed since."""
  import gc
  from blockdec import api
  monkeypatch.setattr(api, "_FUSED", {})
  cfg, params = random_model(1)
  api.with_fused_projections(params, cfg)
  assert len(api._FUSED) == 1  # pylint: disable=protected-access
  del params
  gc.collect()
  _, other = random_model(1, param_seed=5)
  api.with_fused_projections(other, cfg)
  assert len(api._FUSED) == 1  # pylint: disable=protected-access
