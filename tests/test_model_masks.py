"""The model's cached block call under every kind of block mask.

Each mask's cached call (committed prefix in the KV cache, block written and
attended in one call) must give the logits of a dense reference: the model
run without a cache over the whole sequence [prefix; block], with its
self-attention replaced by attention under an explicit [B, S, S] mask. Both
attention backends are checked; pallas runs the kernel in interpret mode on
CPU (`attention.cached_attention` picks it from the default backend).
"""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdec import api
from blockdec import kernels
from blockdec.decoding.rescoring import tree_call
from blockdec.models import attention
from blockdec.models import transformer
from tests.helpers import random_model

B, T, CACHE = 2, 6, 16
LENGTHS = np.array([5, 3])  # committed prefix per row: ragged offsets
NUM_HEADS = 2
TREE = (-1, 0, 0, 1, 1, 2)
# One tree per row: TREE, and a forest (second root at node 1) of depth 3.
ROW_TREES = np.array([TREE, (-1, -1, 1, 2, 0, 4)])
# One pattern per row (block diffusion's sub-block cache): row 0 causal in
# its first 2 queries and both ways after; row 1 both ways.
ROW_PATTERNS = np.stack([
    np.where(np.arange(T)[:, None] < 2, np.tri(T, dtype=bool), True),
    np.ones((T, T), bool)])

MASKS = {
    "none": None,
    "causal": kernels.CausalBlockMask(T),
    "tree": kernels.TreeMask(TREE),
    "runtime_tree": kernels.RuntimeTreeMask(np.array(TREE)),
    "runtime_tree_per_row": kernels.RuntimeTreeMask(ROW_TREES),
    "runtime_pattern_per_row": kernels.RuntimePatternMask(ROW_PATTERNS),
    "bidir_sub2": kernels.BlockBidirectionalMask(T, sub_block_len=2),
    "bidir_or_tree": (kernels.BlockBidirectionalMask(T, sub_block_len=3)
                      | kernels.TreeMask(TREE)),
}

# The kernel runs in the Pallas interpreter; each mask compiles it anew, so
# pallas checks a subset (static tree, per-row runtime tree, sub-blocks).
PALLAS_MASKS = ("none", "tree", "runtime_tree_per_row",
                "runtime_pattern_per_row", "bidir_sub2")


def _apply(params, cfg, tokens, positions, cache, mask):
  """The cached call (eager: its small ops compile once for every mask)."""
  return transformer.apply(params, cfg, tokens, positions, cache, NUM_HEADS,
                           mask)


def _depths(parents: np.ndarray) -> np.ndarray:
  """Depth of each node (roots 0) of a tree [T] or per-row trees [B, T]."""
  parents = np.atleast_2d(parents)
  depths = np.zeros(parents.shape, np.int32)
  for i in range(parents.shape[1]):  # parents precede children
    p = parents[:, i]
    depths[:, i] = np.where(p >= 0, depths[np.arange(len(p)), p] + 1, 0)
  return depths


def _block_layout(mask):
  """(patterns [B, T, T] bool, depths [B, T]) of the block under `mask`."""
  if mask is None:
    return np.broadcast_to(np.tri(T, dtype=bool), (B, T, T)), np.broadcast_to(
        np.arange(T), (B, T))
  pattern = np.broadcast_to(np.asarray(mask.pattern()), (B, T, T))
  if isinstance(mask, kernels.RuntimeTreeMask):
    depths = _depths(np.asarray(mask.parents))
  elif isinstance(mask, kernels.TreeMask):
    depths = _depths(np.array(mask.parents))
  else:  # consecutive positions
    depths = np.arange(T)[None]
  return pattern, np.broadcast_to(depths, (B, T))


@pytest.fixture(scope="module")
def setup():
  """A tiny GQA model, a prefix, a block, and the cache after the prefix."""
  cfg, params = random_model(1, vocab_size=17, d_model=32, n_heads=4,
                             n_kv_heads=2, n_layers=2, d_ff=32,
                             num_prediction_heads=NUM_HEADS, max_seq_len=32)
  rng = np.random.RandomState(0)
  p = int(LENGTHS.max())
  prefix = rng.randint(0, cfg.vocab_size, (B, p)).astype(np.int32)
  block = rng.randint(0, cfg.vocab_size, (B, T)).astype(np.int32)
  cache = transformer.make_cache(cfg, B, CACHE)
  # Row 1 writes junk past its prefix; the block overwrites it.
  _, cache = _apply(params, cfg, prefix,
                    jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (B, p)),
                    cache, None)
  return cfg, params, prefix, block, cache.set_end_index(jnp.asarray(LENGTHS))


def _dense_reference(cfg, params, prefix, block, mask):
  """Block logits [B, T, heads, V] of an uncached call with an explicit mask.

  Row b's sequence is its prefix then the block (padded to P + T); query r
  sees key s as `cached_attention` promises: the prefix causally, the whole
  prefix from the block, and block key j from block query i iff
  pattern[i, j]. Block node i sits at position len(prefix) + depth(i).
  """
  patterns, depths = _block_layout(mask)
  s = prefix.shape[1] + T
  tokens = np.zeros((B, s), np.int32)
  positions = np.zeros((B, s), np.int32)
  visible = np.zeros((B, s, s), bool)
  for b, p in enumerate(LENGTHS):
    tokens[b, :p], tokens[b, p:p + T] = prefix[b, :p], block[b]
    positions[b, :p], positions[b, p:p + T] = np.arange(p), p + depths[b]
    visible[b, :p, :p] = np.tri(p, dtype=bool)
    visible[b, p:p + T, :p] = True
    visible[b, p:p + T, p:p + T] = patterns[b]
    visible[b, np.arange(p + T, s), np.arange(p + T, s)] = True  # padding

  def masked_attention(q, k, v, positions, query_positions=None):
    del positions
    assert query_positions is None  # No keep: every query is computed.
    return attention.dot_product_attention(
        q, k.swapaxes(1, 2), v.swapaxes(1, 2), jnp.asarray(visible))

  with mock.patch.object(attention, "self_attention", masked_attention):
    logits, _ = transformer.apply(params, cfg, jnp.asarray(tokens),
                                  jnp.asarray(positions), None,
                                  num_heads=NUM_HEADS)
  return np.stack([logits[b, p:p + T] for b, p in enumerate(LENGTHS)])


def _block_positions(mask):
  _, depths = _block_layout(mask)
  return jnp.asarray(LENGTHS[:, None] + depths, jnp.int32)


@pytest.mark.parametrize("backend,name",
                         [("xla", n) for n in MASKS]
                         + [("pallas", n) for n in PALLAS_MASKS])
def test_cached_call_equals_dense_reference(setup, backend, name):
  cfg, params, prefix, block, cache = setup
  mask = MASKS[name]
  cfg = cfg.replace(attention_backend=backend)
  got, new_cache = _apply(params, cfg, jnp.asarray(block),
                          _block_positions(mask), cache, mask)
  want = _dense_reference(cfg, params, prefix, block, mask)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
  np.testing.assert_array_equal(new_cache.end_index, LENGTHS + T)


def test_runtime_tree_equals_static_tree(setup):
  """Shared [T] parents give TreeMask's logits and cache; per-row [B, T]
  parents give, on row b, TreeMask(parents[b])'s logits and cache."""
  cfg, params, _, block, cache = setup
  block = jnp.asarray(block)
  cases = [(np.array(TREE), [TREE, TREE]),
           (ROW_TREES, [tuple(r) for r in ROW_TREES])]
  for parents, row_trees in cases:
    runtime = kernels.RuntimeTreeMask(parents)
    got, got_cache = _apply(params, cfg, block, _block_positions(runtime),
                            cache, runtime)
    for b, tree in enumerate(row_trees):
      static = kernels.TreeMask(tree)
      want, want_cache = _apply(params, cfg, block, _block_positions(static),
                                cache, static)
      np.testing.assert_allclose(got[b], want[b], atol=1e-6, rtol=1e-6)
      for got_k, want_k in zip(got_cache.k, want_cache.k):
        np.testing.assert_allclose(got_k[b], want_k[b], atol=1e-6)


def test_runtime_tree_compiles_once_for_every_tree(setup):
  """Parents are data: new trees reuse the compiled call (no retrace)."""
  cfg, params, _, block, cache = setup
  traces = []

  @jax.jit
  def call(params, cache, parents, positions):
    traces.append(1)
    return transformer.apply(params, cfg, jnp.asarray(block), positions, cache,
                             NUM_HEADS, kernels.RuntimeTreeMask(parents))[0]

  for tree in (ROW_TREES, (TREE, TREE), ((-1, 0, 1, 2, 3, 4),) * B):
    mask = kernels.RuntimeTreeMask(np.array(tree))
    want = [_apply(params, cfg, jnp.asarray(block), _block_positions(mask),
                   cache, kernels.TreeMask(row))[0][b]
            for b, row in enumerate(tree)]
    np.testing.assert_allclose(
        call(params, cache, mask.parents, _block_positions(mask)),
        np.stack(want), atol=1e-4, rtol=1e-4)
  assert len(traces) == 1


def test_tree_call_forwards_runtime_mask_through_model_score_fn(setup):
  """`tree_call(..., mask=)` under jit reaches the trunk of `model_score_fn`."""
  cfg, params, _, block, cache = setup
  score = api.model_score_fn(cfg, num_heads=NUM_HEADS)
  mask = kernels.RuntimeTreeMask(ROW_TREES)
  positions = _block_positions(mask)

  @jax.jit
  def heads(params, cache, parents, nodes):
    head_fn, _ = tree_call(score, params, jnp.asarray(block), positions, cache,
                           mask=kernels.RuntimeTreeMask(parents))
    return head_fn(nodes, NUM_HEADS)

  nodes = jnp.broadcast_to(jnp.arange(T), (B, T))
  want, _ = _apply(params, cfg, jnp.asarray(block), positions, cache, mask)
  np.testing.assert_allclose(heads(params, cache, ROW_TREES, nodes), want,
                             atol=1e-4, rtol=1e-4)


def test_mask_errors(setup):
  cfg, params, _, block, cache = setup
  block, positions = jnp.asarray(block), _block_positions(None)
  with pytest.raises(ValueError, match=r"mask.block_len=4 must equal the "
                     r"block length T=6"):
    transformer.apply(params, cfg, block, positions, cache,
                      mask=kernels.CausalBlockMask(4))
  with pytest.raises(ValueError, match=r"parents must be \[T\] or \[B, T\] "
                     r"with B=2"):
    transformer.apply(params, cfg, block, positions, cache,
                      mask=kernels.RuntimeTreeMask(np.array([TREE] * 3)))
  with pytest.raises(TypeError, match=r"TreeMask\(parents\)"):
    transformer.apply(params, cfg, block, positions, cache, mask=TREE)
  with pytest.raises(ValueError, match="needs a KV cache"):
    transformer.apply(params, cfg, block, positions, None,
                      mask=kernels.TreeMask(TREE))
  with pytest.raises(ValueError, match=r"parents\[1, 2\]=2 is invalid"):
    kernels.RuntimeTreeMask(np.array([TREE, (-1, 0, 2, 1, 1, 1)]))
