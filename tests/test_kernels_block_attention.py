"""Tests for blockdec.kernels: block masks and the block attention kernel.

``TestBlockAttention`` runs the compiled kernel and is skipped on CPU;
``TestBlockAttentionInterpret`` runs the same cases in the Pallas interpreter,
so CPU CI exercises the kernel body. Shapes are small: interpret mode is slow.
"""

import functools
from unittest import mock

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdec import kernels

CAUSAL, TREE, BIDIR = "causal", "tree", "bidir"

# Per-dtype tolerances of kernel vs reference. bf16: the kernel rounds the
# probabilities to bf16 before the PV matmul and the output to bf16.
TOLERANCES = {
    jnp.float32: dict(atol=2e-5, rtol=2e-5),
    jnp.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _make_mask(kind: str, block_len: int, rng: np.random.Generator):
  if kind == CAUSAL:
    return kernels.CausalBlockMask(block_len)
  if kind == BIDIR:
    return kernels.BlockBidirectionalMask(block_len)
  if kind == TREE:
    parents = [-1] + [int(rng.integers(-1, i)) for i in range(1, block_len)]
    return kernels.TreeMask(parents)
  raise ValueError(kind)


def _random_parents(rng, *shape):
  """Random valid tree parents of shape [..., T]: parents[..., i] in [-1, i)."""
  t = shape[-1]
  return np.floor(rng.random(shape) * (np.arange(t) + 1)).astype(np.int32) - 1


def _random_inputs(rng, batch, block_len, num_heads, num_kv_heads, head_dim,
                   seq_len, dtype):
  q = rng.normal(size=(batch, block_len, num_heads, head_dim))
  k = rng.normal(size=(batch, seq_len, num_kv_heads, head_dim))
  v = rng.normal(size=(batch, seq_len, num_kv_heads, head_dim))
  return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype))


def _naive_attention(q, k, v, offsets, pattern, sm_scale):
  """NumPy float64 softmax over the materialized mask, one (row, head) at a time."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, block_len, num_heads, _ = q.shape
  seq_len, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  visible = kernels.materialize_mask(pattern, offsets, seq_len)  # [B, T, S]
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(num_heads):
      logits = q[b, :, h] @ k[b, :, h // group].T * sm_scale       # [T, S]
      for t in range(block_len):
        keep = visible[b, t]
        if not keep.any():
          continue
        w = np.exp(logits[t, keep] - logits[t, keep].max())
        out[b, t, h] = (w / w.sum()) @ v[b, keep, h // group]
  return out


# ----------------------------------------------------------------- masks ----


class TestMasks:

  def test_causal_pattern_and_worked_example(self):
    mask = kernels.CausalBlockMask(3)
    np.testing.assert_array_equal(mask.pattern(), np.tri(3, dtype=bool))
    expected = np.array([[1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 1, 0]], bool)
    np.testing.assert_array_equal(mask.materialize([2], 6)[0], expected)

  def test_tree_pattern(self):
    mask = kernels.TreeMask((-1, 0, 0, 1))
    expected = np.array([[1, 0, 0, 0],
                         [1, 1, 0, 0],
                         [1, 0, 1, 0],
                         [1, 1, 0, 1]], bool)
    np.testing.assert_array_equal(mask.pattern(), expected)
    # A chain is the causal pattern.
    chain = kernels.TreeMask((-1, 0, 1, 2))
    np.testing.assert_array_equal(chain.pattern(), np.tri(4, dtype=bool))
    # Several roots: siblings under the committed prefix.
    forest = kernels.TreeMask((-1, -1, 1))
    np.testing.assert_array_equal(
        forest.pattern(), np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1]], bool))

  def test_bidirectional_pattern(self):
    np.testing.assert_array_equal(
        kernels.BlockBidirectionalMask(3).pattern(), np.ones((3, 3), bool))
    sub = kernels.BlockBidirectionalMask(4, sub_block_len=2).pattern()
    np.testing.assert_array_equal(
        sub, np.array([[1, 1, 0, 0], [1, 1, 0, 0],
                       [1, 1, 1, 1], [1, 1, 1, 1]], bool))
    np.testing.assert_array_equal(
        kernels.BlockBidirectionalMask(4, 1).pattern(), np.tri(4, dtype=bool))
    # Block diffusion sees the whole prefix and nothing after the block.
    full = kernels.BlockBidirectionalMask(2).materialize([3], 7)[0]
    np.testing.assert_array_equal(full, [[1, 1, 1, 1, 1, 0, 0]] * 2)

  def test_algebra(self):
    causal = kernels.CausalBlockMask(4)
    bidir = kernels.BlockBidirectionalMask(4, 2)
    tree = kernels.TreeMask((-1, 0, 0, 2))
    np.testing.assert_array_equal((causal & bidir).pattern(),
                                  causal.pattern() & bidir.pattern())
    np.testing.assert_array_equal((causal | bidir).pattern(),
                                  causal.pattern() | bidir.pattern())
    combo = (causal & tree) | bidir
    np.testing.assert_array_equal(
        combo.pattern(),
        (causal.pattern() & tree.pattern()) | bidir.pattern())
    assert combo.block_len == 4

  def test_hash_and_equality(self):
    a = kernels.CausalBlockMask(4) | kernels.TreeMask([-1, 0, 0, 1])
    b = kernels.CausalBlockMask(block_len=4) | kernels.TreeMask((-1, 0, 0, 1))
    assert a == b and hash(a) == hash(b)
    assert kernels.CausalBlockMask(4) != kernels.CausalBlockMask(5)
    assert kernels.CausalBlockMask(4) != kernels.BlockBidirectionalMask(4, 1)
    assert (kernels.BlockBidirectionalMask(4)
            == kernels.BlockBidirectionalMask(4, sub_block_len=4))
    assert len({a, b, kernels.CausalBlockMask(4)}) == 2
    p = kernels.PatternMask(np.tri(3, dtype=bool))
    assert p == kernels.PatternMask(np.tri(3)) and hash(p) == hash(
        kernels.PatternMask(np.tri(3)))
    with pytest.raises(dataclasses_frozen_error()):
      kernels.CausalBlockMask(4).block_len = 5

  def test_errors(self):
    with pytest.raises(ValueError, match="different block lengths"):
      _ = kernels.CausalBlockMask(3) & kernels.CausalBlockMask(4)
    with pytest.raises(TypeError, match="BlockMask"):
      _ = kernels.CausalBlockMask(3) | np.ones((3, 3), bool)
    with pytest.raises(ValueError, match=r"parents\[1\]=1"):
      kernels.TreeMask((-1, 1))
    with pytest.raises(ValueError, match="block_len=0"):
      kernels.CausalBlockMask(0)
    with pytest.raises(ValueError, match="square"):
      kernels.PatternMask(np.ones((2, 3)))

  @hypothesis.settings(max_examples=30, deadline=None)
  @hypothesis.given(st.lists(st.integers(0, 1000), min_size=1, max_size=9))
  def test_tree_is_ancestor_closure(self, draws):
    parents = [d % (i + 1) - 1 for i, d in enumerate(draws)]  # in [-1, i-1]
    pattern = kernels.TreeMask(parents).pattern()
    for i in range(len(parents)):
      ancestors, node = {i}, parents[i]
      while node >= 0:
        ancestors.add(node)
        node = parents[node]
      assert set(np.flatnonzero(pattern[i])) == ancestors

  @hypothesis.settings(max_examples=12, deadline=None)
  @hypothesis.given(st.integers(1, 9), st.integers(0, 2**32 - 1))
  def test_runtime_tree_pattern_equals_tree_mask(self, block_len, seed):
    parents = _random_parents(np.random.default_rng(seed), 3, block_len)
    got = jax.jit(lambda m: m.pattern())(kernels.RuntimeTreeMask(parents))
    assert got.shape == (3, block_len, block_len)
    for row, p in zip(np.asarray(got), parents):
      np.testing.assert_array_equal(row, kernels.TreeMask(p).pattern())
    shared = kernels.RuntimeTreeMask(parents[0]).pattern()
    np.testing.assert_array_equal(shared,
                                  kernels.TreeMask(parents[0]).pattern())

  def test_runtime_tree_is_a_pytree(self):
    mask = kernels.RuntimeTreeMask([[-1, 0, 1], [-1, -1, 0]])
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    assert len(leaves) == 1 and leaves[0].dtype == jnp.int32
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(again, kernels.RuntimeTreeMask) and again.block_len == 3
    with pytest.raises(TypeError, match="unhashable"):
      hash(mask)  # data, not a static jit argument
    assert not mask.slots_are_positions
    assert kernels.CausalBlockMask(3).slots_are_positions
    assert not kernels.TreeMask((-1, 0, 1)).slots_are_positions
    assert not (kernels.CausalBlockMask(3)
                | kernels.TreeMask((-1, 0, 1))).slots_are_positions
    with pytest.raises(ValueError, match=r"parents\[1, 1\]=1 is invalid"):
      kernels.RuntimeTreeMask([[-1, 0, 1], [-1, 1, 0]])
    with pytest.raises(ValueError, match=r"\[T\] or \[B, T\]"):
      kernels.RuntimeTreeMask(np.zeros((1, 1, 2), np.int32))

  def test_runtime_pattern_is_a_pytree(self):
    pattern = np.stack([np.tri(3, dtype=bool), np.ones((3, 3), bool)])
    mask = kernels.RuntimePatternMask(pattern)
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    assert len(leaves) == 1 and leaves[0].dtype == jnp.bool_
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(again, kernels.RuntimeMask) and again.block_len == 3
    assert again.batched and mask.slots_are_positions
    np.testing.assert_array_equal(
        jax.jit(lambda m: m.pattern())(mask), pattern)
    with pytest.raises(TypeError, match="unhashable"):
      hash(mask)
    with pytest.raises(ValueError, match=r"\[T, T\] or \[B, T, T\]"):
      kernels.RuntimePatternMask(np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="must be bool"):
      kernels.RuntimePatternMask(np.ones((3, 3), np.int32))
    with pytest.raises(ValueError, match="B=3"):
      mask.check_batch(3)

  def test_mask_is_static_jit_argument_without_retrace(self):
    rng = np.random.default_rng(0)
    q, k, v = _random_inputs(rng, 1, 2, 2, 1, 16, 16, jnp.float32)
    offsets = jnp.array([3], jnp.int32)
    fn = jax.jit(kernels.block_attention_reference,
                 static_argnames=("mask",))
    fn(q, k, v, offsets, mask=kernels.CausalBlockMask(2))
    fn(q, k, v, offsets, mask=kernels.CausalBlockMask(block_len=2))
    assert fn._cache_size() == 1


def dataclasses_frozen_error():
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.FrozenInstanceError


# ------------------------------------------------------------- reference ----


class TestReference:

  @pytest.mark.parametrize("kind", [CAUSAL, TREE, BIDIR])
  @pytest.mark.parametrize("group", [1, 2, 4])
  def test_reference_matches_naive_softmax(self, kind, group):
    rng = np.random.default_rng([group, len(kind)])
    batch, block_len, num_kv_heads, head_dim, seq_len = 3, 5, 2, 8, 24
    mask = _make_mask(kind, block_len, rng)
    q, k, v = _random_inputs(rng, batch, block_len, num_kv_heads * group,
                             num_kv_heads, head_dim, seq_len, jnp.float32)
    offsets = np.array([0, 7, seq_len - block_len], np.int32)
    got = kernels.block_attention_reference(q, k, v, jnp.asarray(offsets),
                                            mask)
    want = _naive_attention(q, k, v, offsets, mask.pattern(),
                            1 / np.sqrt(head_dim))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)

  def test_runtime_tree_matches_naive_softmax_per_row(self):
    rng = np.random.default_rng(7)
    batch, block_len, seq_len = 3, 5, 24
    q, k, v = _random_inputs(rng, batch, block_len, 4, 2, 8, seq_len,
                             jnp.float32)
    parents = _random_parents(rng, batch, block_len)
    offsets = np.array([0, 7, seq_len - block_len], np.int32)
    got = jax.jit(kernels.block_attention_reference)(
        q, k, v, jnp.asarray(offsets), kernels.RuntimeTreeMask(parents))
    for b in range(batch):
      want = _naive_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1],
                              offsets[b:b + 1],
                              kernels.TreeMask(parents[b]).pattern(),
                              1 / np.sqrt(8))
      np.testing.assert_allclose(np.asarray(got[b:b + 1]), want, atol=1e-5,
                                 rtol=1e-5)

  def test_row_without_visible_keys_is_zero(self):
    rng = np.random.default_rng(1)
    q, k, v = _random_inputs(rng, 1, 2, 1, 1, 8, 8, jnp.float32)
    mask = kernels.PatternMask([[0, 0], [1, 1]])
    out = kernels.block_attention_reference(q, k, v, jnp.array([0]), mask)
    np.testing.assert_array_equal(np.asarray(out[0, 0]), 0.0)
    assert np.isfinite(np.asarray(out)).all()


# ---------------------------------------------------------------- kernel ----

# (batch, T, H, H_kv, D, S, block_kv or None, offsets rule)
#   offsets rules: "random" (ragged, anywhere valid), "edges" (at tile starts,
#   block ending exactly at a tile end, at 0, and at S - T).
KERNEL_CASES = [
    # name,                B, T, H, Hkv, D,  S,   bkv,  offsets
    ("verify_k4_mha",      3, 4, 2, 2, 32, 96,   32,  "random"),
    ("verify_k2_gqa2",     2, 2, 4, 2, 16, 64,   16,  "edges"),
    ("verify_k10_gqa4",    2, 10, 8, 2, 32, 80,  16,  "random"),
    ("edges_k5_gqa4",      4, 5, 4, 1, 16, 64,   16,  "edges"),
    ("s_not_multiple",     2, 3, 2, 1, 24, 50,   None, "random"),
    ("big_tile_pad",       2, 4, 4, 2, 16, 40,   64,  "edges"),
]


def _offsets(rule, rng, batch, block_len, seq_len, block_kv):
  if rule == "random":
    return rng.integers(0, seq_len - block_len + 1, size=batch).astype(np.int32)
  _, bkv = kernels.BlockSizes(block_kv=block_kv).resolve(1, seq_len)
  # The first `batch` of: 0, a tile start, a block ending on a tile end, S - T.
  candidates = [0, bkv, 2 * bkv - block_len, seq_len - block_len,
                bkv - 1, 1]
  candidates = [min(max(c, 0), seq_len - block_len) for c in candidates]
  return np.array(candidates[:batch], np.int32)


class TestBlockAttention:
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _skip_compiled_on_cpu(self):
    if not self.INTERPRET and jax.default_backend() == "cpu":
      pytest.skip("Compiled Pallas kernels need a GPU or TPU; see the "
                  "Interpret subclass.")

  def _check(self, case, kind, dtype, seed=0):
    _, batch, block_len, heads, kv_heads, head_dim, seq_len, bkv, rule = case
    rng = np.random.default_rng([seed, batch, block_len, heads, seq_len])
    mask = _make_mask(kind, block_len, rng)
    q, k, v = _random_inputs(rng, batch, block_len, heads, kv_heads, head_dim,
                             seq_len, dtype)
    offsets = jnp.asarray(_offsets(rule, rng, batch, block_len, seq_len, bkv))
    block_sizes = None if bkv is None else kernels.BlockSizes(block_kv=bkv)
    got = kernels.block_attention(q, k, v, offsets, mask,
                                  block_sizes=block_sizes,
                                  interpret=self.INTERPRET)
    want = kernels.block_attention_reference(q, k, v, offsets, mask)
    assert got.shape == q.shape and got.dtype == q.dtype
    # Every query row of the block is valid: compare all of them.
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(want, np.float32),
                               **TOLERANCES[dtype])

  @pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in
                                                      KERNEL_CASES])
  @pytest.mark.parametrize("kind", [CAUSAL, TREE, BIDIR])
  def test_matches_reference_f32(self, case, kind):
    self._check(case, kind, jnp.float32)

  @pytest.mark.parametrize("case", KERNEL_CASES[:3], ids=[c[0] for c in
                                                          KERNEL_CASES[:3]])
  def test_matches_reference_bf16(self, case):
    self._check(case, CAUSAL, jnp.bfloat16)

  def _check_runtime_mask(self, case, rng, mask, static_of_row):
    """`mask` agrees with the reference, and row b with static_of_row(b)."""
    _, batch, block_len, heads, kv_heads, head_dim, seq_len, bkv, rule = case
    q, k, v = _random_inputs(rng, batch, block_len, heads, kv_heads, head_dim,
                             seq_len, jnp.float32)
    offsets = jnp.asarray(_offsets(rule, rng, batch, block_len, seq_len, bkv))
    run = functools.partial(kernels.block_attention, q, k, v, offsets,
                            block_sizes=kernels.BlockSizes(block_kv=bkv),
                            interpret=self.INTERPRET)
    got = run(mask)
    np.testing.assert_allclose(
        got, kernels.block_attention_reference(q, k, v, offsets, mask),
        **TOLERANCES[jnp.float32])
    for b in range(batch):
      np.testing.assert_allclose(got[b], run(static_of_row(b))[b], atol=1e-6,
                                 rtol=1e-6)

  @pytest.mark.parametrize("case", KERNEL_CASES[1:2], ids=[c[0] for c in
                                                           KERNEL_CASES[1:2]])
  @pytest.mark.parametrize("per_row", [False, True])
  def test_runtime_tree_matches_static_tree(self, case, per_row):
    """A RuntimeTreeMask gives each row the output of TreeMask(its parents)."""
    _, batch, block_len, heads, _, _, seq_len, _, _ = case
    rng = np.random.default_rng([batch, block_len, heads, seq_len])
    parents = _random_parents(rng, batch if per_row else 1, block_len)
    self._check_runtime_mask(
        case, rng, kernels.RuntimeTreeMask(parents if per_row else parents[0]),
        lambda b: kernels.TreeMask(parents[b if per_row else 0]))

  @pytest.mark.parametrize("case", KERNEL_CASES[1:2], ids=[c[0] for c in
                                                           KERNEL_CASES[1:2]])
  def test_runtime_pattern_matches_static_pattern(self, case):
    """A per-row RuntimePatternMask gives each row PatternMask(its pattern)."""
    _, batch, block_len, _, _, _, seq_len, _, _ = case
    rng = np.random.default_rng([batch, block_len, seq_len, 7])
    # Random patterns in which every query sees itself.
    patterns = (rng.random((batch, block_len, block_len)) < 0.5) | np.eye(
        block_len, dtype=bool)
    self._check_runtime_mask(case, rng, kernels.RuntimePatternMask(patterns),
                             lambda b: kernels.PatternMask(patterns[b]))

  def test_tiles_past_the_block_are_skipped(self):
    # NaNs in tiles wholly after offset + T would poison the output if those
    # tiles were loaded and masked rather than skipped.
    rng = np.random.default_rng(2)
    batch, block_len, seq_len, bkv = 2, 3, 64, 16
    q, k, v = _random_inputs(rng, batch, block_len, 2, 1, 16, seq_len,
                             jnp.float32)
    offsets = np.array([5, 20], np.int32)        # blocks end in tiles 0 and 1
    first_skipped = -(-(offsets + block_len) // bkv) * bkv
    k_nan, v_nan = k, v
    for b in range(batch):
      k_nan = k_nan.at[b, first_skipped[b]:].set(jnp.nan)
      v_nan = v_nan.at[b, first_skipped[b]:].set(jnp.nan)
    mask = kernels.CausalBlockMask(block_len)
    got = kernels.block_attention(q, k_nan, v_nan, jnp.asarray(offsets), mask,
                                  block_sizes=kernels.BlockSizes(block_kv=bkv),
                                  interpret=self.INTERPRET)
    assert np.isfinite(np.asarray(got)).all()
    want = kernels.block_attention_reference(q, k, v, jnp.asarray(offsets),
                                             mask)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)

  def test_input_errors(self):
    rng = np.random.default_rng(3)
    q, k, v = _random_inputs(rng, 1, 2, 3, 2, 16, 32, jnp.float32)
    offsets = jnp.zeros((1,), jnp.int32)
    call = functools.partial(kernels.block_attention,
                             interpret=self.INTERPRET)
    with pytest.raises(ValueError, match="num_heads=3 must be a multiple"):
      call(q, k, v, offsets, kernels.CausalBlockMask(2))
    q = q[:, :, :2]
    with pytest.raises(ValueError, match="must equal the query block length"):
      call(q, k, v, offsets, kernels.CausalBlockMask(3))
    with pytest.raises(ValueError, match="block_kv=24 must be a power of two"):
      call(q, k, v, offsets, kernels.CausalBlockMask(2),
           block_sizes=kernels.BlockSizes(block_kv=24))
    with pytest.raises(ValueError, match=r"offsets must have shape \(1,\)"):
      call(q, k, v, jnp.zeros((2,), jnp.int32), kernels.CausalBlockMask(2))
    with pytest.raises(ValueError, match=r"\[T\] or \[B, T\] with B=1"):
      call(q, k, v, offsets, kernels.RuntimeTreeMask([[-1, 0], [-1, 0]]))
    with pytest.raises(ValueError, match="must equal the query block length"):
      call(q, k, v, offsets, kernels.RuntimeTreeMask([-1, 0, 1]))


class TestBlockAttentionInterpret(TestBlockAttention):
  INTERPRET = True


# ------------------------------------------------- tile accounting, lowering -


def test_skipped_kv_tile_fraction():
  # S=512, bkv=128, T=4: row 0 visits 1 of 4 tiles, row 1 visits 3 of 4.
  assert kernels.skipped_kv_tile_fraction([10, 300], 4, 512,
                                          block_kv=128) == 0.5
  assert kernels.skipped_kv_tile_fraction([508], 4, 512, block_kv=128) == 0.0
  # Block ending exactly on a tile edge does not touch the next tile.
  assert kernels.skipped_kv_tile_fraction([124], 4, 512, block_kv=128) == 0.75
  # S not a multiple of block_kv: counted over the padded tiles.
  assert kernels.skipped_kv_tile_fraction([0], 2, 300, block_kv=128) == (
      pytest.approx(2 / 3))


# Distinct shapes per platform so no jit cache entry traced for one platform's
# branch is reused for the other.
@pytest.mark.parametrize("runtime_mask", [False, True])
@pytest.mark.parametrize("platform,backend,marker,seq_len", [
    ("cuda", "gpu", "__gpu$xla.gpu.triton", 200),
    ("tpu", "tpu", "tpu_custom_call", 232),
])
def test_lowers_for_gpu_and_tpu(platform, backend, marker, seq_len,
                                runtime_mask):
  """Lowers (not compiles) the kernel for Triton and Mosaic from a CPU host."""
  from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  batch, block_len, heads, kv_heads, head_dim = 2, 3, 4, 2, 64
  sds = jax.ShapeDtypeStruct
  args = (sds((batch, block_len, heads, head_dim), jnp.bfloat16),
          sds((batch, seq_len, kv_heads, head_dim), jnp.bfloat16),
          sds((batch, seq_len, kv_heads, head_dim), jnp.bfloat16),
          sds((batch,), jnp.int32))
  if runtime_mask:  # per-row parents [B, T], traced
    args += (sds((batch, block_len), jnp.int32),)
    fn = lambda q, k, v, offsets, parents: kernels.block_attention(
        q, k, v, offsets, kernels.RuntimeTreeMask(parents))
  else:
    fn = functools.partial(kernels.block_attention,
                           mask=kernels.TreeMask((-1, 0, 0)))
  checks = [jax.export.DisabledSafetyCheck.custom_call(marker)]
  abstract_mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), abstract_device=mesh_lib.AbstractDevice(
          device_kind="TPU v5 lite", num_cores=1, platform="tpu"))
  with mock.patch.object(jax, "default_backend", lambda: backend):
    if backend == "tpu":  # Mosaic asks the (abstract) device for its chip.
      with jax.sharding.use_abstract_mesh(abstract_mesh):
        exported = jax.export.export(jax.jit(fn), platforms=[platform],
                                     disabled_checks=checks)(*args)
    else:
      exported = jax.export.export(jax.jit(fn), platforms=[platform],
                                   disabled_checks=checks)(*args)
  assert marker in exported.mlir_module()
