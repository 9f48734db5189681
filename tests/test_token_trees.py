"""Token trees of any shape: static (Medusa / Sequoia) and dynamic (EAGLE-2).

Exactness: seeded sweeps over random models, trees (chains of different
lengths included), ragged batches, EOS and compaction, token for token
against the plain greedy loop, for Stern's heads, Hydra's heads and the
EAGLE drafter. Sampling: ranked tree drafts are deterministic, so with the
same key the output is ancestral sampling's token for token, and the
chi-square test against the enumerated distribution passes while a biased
verifier fails it. Shapes: `tree_shapes.best_tree` against brute force,
the acceptance estimator against analytic histograms, and a measured shape
on a real model. Dynamic trees: `lattice.grow_tree` against a NumPy
enumeration of EAGLE-2's expansion, and the same exactness and sampling
checks for Stern's and Hydra's heads growing per-row trees.
"""

import itertools

import jax
import numpy as np
import pytest

import blockdec
from blockdec import tree_shapes
from blockdec.decoding.lattice import DraftTree, grow_tree, ranked
from tests.helpers import mid_way_eos, ragged_prompts, random_model
from tests.test_eagle import copy_drafter
from tests.test_exactness import _check_pair, _heads_copy_head_one
from tests.test_sampling import (ALPHA, _MatchTopTwo, _model,
                                 sampled_p_values)

TREES = {
    "medusa": (-1, 0, 0, 0, 1, 1, 2, 4),  # chains of 3 and 4 tokens
    "spine": (-1, 0, 1, 2, 0, 1, 2),      # siblings along a spine
    "comb": DraftTree(3, 3).parents,      # chains sharing only the root
}


def random_tree(seed: int, size: int, depth: int) -> DraftTree:
  """A random tree of `size` nodes, at most `depth` drafts deep."""
  rng = np.random.RandomState(seed)
  parents, depths = [-1], [0]
  while len(parents) < size:
    p = int(rng.randint(len(parents)))
    if depths[p] < depth:
      parents.append(p)
      depths.append(depths[p] + 1)
  return DraftTree.from_parents(parents)


def test_tree_geometry():
  tree = DraftTree.from_parents(TREES["medusa"])
  # Depth first, children by rank: chain 0 is the rank-0 spine.
  np.testing.assert_array_equal(tree.paths, [[0, 1, 4, 7], [0, 1, 5, 5],
                                             [0, 2, 6, 6], [0, 3, 3, 3]])
  np.testing.assert_array_equal(tree.lengths, [4, 3, 3, 2])
  np.testing.assert_array_equal(tree.ranks, [0, 0, 1, 2, 0, 1, 0, 0])
  np.testing.assert_array_equal(tree.chain_ranks[0], [0, 0, 0])
  assert tree.padded and not tree.branches_at_root_only
  assert tree.width == 3 and tree.depth == 4 and tree.size == 8
  tokens = np.array([[10, 11, 14, 17], [10, 11, 15, -5], [10, 12, 16, -5],
                     [10, 13, -5, -5]])
  np.testing.assert_array_equal(tree.flatten(tokens), np.arange(10, 18))
  # The comb built either way is the same tree.
  assert DraftTree.from_parents(DraftTree(3, 4).parents) == DraftTree(3, 4)
  assert DraftTree(3, 4).branches_at_root_only and not DraftTree(3, 4).padded


def test_ranked_picks_each_places_rank():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 9))
  order = np.argsort(-np.asarray(logits), axis=-1, kind="stable")
  ranks = np.array([[0, 2, 1], [1, 0, 0]])  # [C = 2, D = 3]
  got = np.asarray(ranked(logits[:, None], ranks))  # [2, C, D]
  for b, c, j in itertools.product(range(2), range(2), range(3)):
    assert got[b, c, j] == order[b, j, ranks[c, j]]


def test_bad_trees_fail_clearly():
  with pytest.raises(ValueError, match="root"):
    DraftTree.from_parents((0, 0))
  with pytest.raises(ValueError, match="parents\\[2\\]=2"):
    DraftTree.from_parents((-1, 0, 2))
  tree = DraftTree.from_parents(TREES["medusa"])
  with pytest.raises(ValueError, match="block_size=3 must be the tree's"):
    blockdec.Blockwise(block_size=3, tree=tree)
  with pytest.raises(ValueError, match="adaptive"):
    blockdec.Blockwise(tree=tree, adaptive=blockdec.AdaptiveBlockSize())
  with pytest.raises(ValueError, match="lossless"):
    blockdec.Blockwise(tree=tree, acceptance=blockdec.TopK(2))
  with pytest.raises(TypeError, match="DraftTree"):
    blockdec.Blockwise(tree=(-1, 0))
  with pytest.raises(ValueError, match="not both"):
    blockdec.Eagle(num_drafts=2, tree=tree)
  cfg, params = random_model(0, num_prediction_heads=4, vocab_size=2)
  prompts, lengths = ragged_prompts(0, 2, 4, cfg.vocab_size)
  with pytest.raises(ValueError, match="vocab_size=2"):
    blockdec.decode(params, cfg, prompts, lengths, 8,
                    method=blockdec.Blockwise(tree=tree))
  cfg, params = random_model(0, num_prediction_heads=3)
  with pytest.raises(ValueError, match="num_prediction_heads=3"):
    blockdec.decode(params, cfg, prompts, lengths, 8,
                    method=blockdec.Blockwise(tree=tree))


def _equals_greedy(cfg, params, seed, batch, p, n, with_eos, method):
  """Decodes ragged prompts both ways, checks they match token for token, and
  returns [calls that accepted drafts, calls that rejected some]."""
  prompts, lengths = ragged_prompts(seed, batch, p, cfg.vocab_size)
  eos_id = mid_way_eos(cfg, params, prompts, lengths, n) if with_eos else None
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=n, eos_id=eos_id)
  out = blockdec.decode(params, cfg, prompts, lengths, n, method=method,
                        eos_id=eos_id, compact_rows=batch == 5)
  _check_pair(cfg, params, prompts, lengths, greedy, out,
              cfg.num_prediction_heads, n, eos_id)
  h = np.asarray(out.accepted_hist).sum(0)
  return np.array([h[1:].sum(), h[:-1].sum()])


CASES = [  # (arch_seed, batch, tree seed, max_prompt, max_new_tokens, eos)
    (0, 1, 0, 5, 14, False), (2, 3, 1, 6, 20, True), (5, 5, 2, 9, 19, True),
]


def _methods(tree):
  return {"stern": ({}, blockdec.Blockwise(tree=tree)),
          "hydra": ({"head_type": "hydra"}, blockdec.Blockwise(tree=tree)),
          "eagle": ({"eagle_layers": 1}, blockdec.Eagle(tree=tree))}


@pytest.mark.parametrize("arch,batch,tree_seed,p,n,with_eos", CASES)
def test_static_trees_are_exact(arch, batch, tree_seed, p, n, with_eos):
  """Random trees and a Medusa-like one, with every tree drafter, equal the
  plain greedy loop. Stern's heads copy head 1 (drafts right where the text
  repeats) and the EAGLE drafter copies the target's layer, so deep paths
  are accepted; Hydra's heads are random (over 8 tokens)."""
  tree = (DraftTree.from_parents(TREES["medusa"]) if tree_seed == 1
          else random_tree(tree_seed, 7 + 3 * tree_seed, 2 + tree_seed))
  hist = {}
  for name, (model, method) in _methods(tree).items():
    seed = 100 * arch + len(name)
    # A small vocabulary: random Hydra heads' top ranks hit sometimes.
    cfg, params = random_model(arch, param_seed=seed,
                               num_prediction_heads=tree.depth, vocab_size=8,
                               **model)
    if name == "eagle":
      params = copy_drafter(cfg, params)
    if name == "stern":
      params = _heads_copy_head_one(params)
    # Calls that accepted drafts, and calls that rejected some.
    hist[name] = _equals_greedy(cfg, params, seed, batch, p, n, with_eos,
                                method)
  for name, (accepted, rejected) in hist.items():
    assert accepted > 0 and rejected > 0, (name, accepted, rejected)


def test_a_tree_accepts_more_than_its_spine():
  """The chain of rank-0 drafts is chain 0 of every tree here; a weak
  (random) drafter's lower-ranked guesses pay off."""
  cfg, params = random_model(3, num_prediction_heads=5, max_seq_len=128)
  prompts, lengths = ragged_prompts(3, 4, 24, cfg.vocab_size)
  tree = tree_shapes.best_tree(np.full((4, 4), 0.5), budget=20)
  eff = [float(blockdec.decode(params, cfg, prompts, lengths, 48,
                               method=m).block_efficiency)
         for m in (blockdec.Blockwise(block_size=5),
                   blockdec.Blockwise(tree=tree))]
  assert eff[1] > 1.15 * eff[0], eff


def test_tree_sampling_is_ancestral_sampling():
  """Ranked drafts and grown trees are deterministic: matched against the
  target's draws keyed by generated index, the output is Autoregressive()
  sampling's (one model with Hydra heads and an EAGLE drafter; Stern's heads
  in the chi-square test and the dynamic test below)."""
  tree = DraftTree.from_parents(TREES["medusa"])
  cfg, params = random_model(4, param_seed=7, num_prediction_heads=4,
                             vocab_size=12, head_type="hydra", eagle_layers=1)
  params = copy_drafter(cfg, params)
  dynamic = blockdec.DynamicTree(nodes=8, top_k=3)
  _same_as_ancestral(cfg, params, blockdec.Sampling(temperature=0.8, top_k=6),
                     3, [blockdec.Blockwise(tree=tree),
                         blockdec.Eagle(tree=tree),
                         blockdec.Blockwise(tree=dynamic)])


def _same_as_ancestral(cfg, params, sampling, seed, methods):
  prompts, lengths = ragged_prompts(4, 5, 7, cfg.vocab_size)

  def run(m):
    return blockdec.decode(params, cfg, prompts, lengths, 18, method=m,
                           sampling=sampling, key=jax.random.key(seed),
                           eos_id=2)

  ancestral = run(blockdec.Autoregressive())
  for method in methods:
    out = run(method)
    np.testing.assert_array_equal(out.lengths, ancestral.lengths)
    np.testing.assert_array_equal(out.tokens, ancestral.tokens)
    assert np.asarray(out.accepted_hist)[:, 1:].sum() > 0, method


def test_tree_sampling_matches_enumerated_distribution_and_bias_is_caught():
  cfg, params = _model(seed=2)
  sampling = blockdec.Sampling(temperature=1.0)
  tree = DraftTree.from_parents((-1, 0, 0, 1, 3))
  p_values, out = sampled_p_values(cfg, params, 3, sampling,
                                   blockdec.Blockwise(tree=tree))
  assert min(p_values) > ALPHA, p_values
  hist = np.asarray(out.accepted_hist).sum(0)
  assert hist[0] > 0 and hist[1:].sum() > 0, hist
  biased, _ = sampled_p_values(cfg, params, 3, sampling, blockdec.Blockwise(
      tree=tree, acceptance=_MatchTopTwo()))
  assert min(biased) < 1e-6, biased


def _all_trees(size, depth, width):
  """Every tree of `size` nodes within depth and width (brute force)."""
  def grow(parents, depths, kids):
    if len(parents) == size:
      yield tuple(parents)
      return
    for p in range(len(parents)):
      if depths[p] < depth and kids[p] < width:
        # Canonical order: a node's parent is at least the last one's.
        if p >= parents[-1]:
          kids[p] += 1
          yield from grow(parents + [p], depths + [depths[p] + 1], kids)
          kids[p] -= 1
  yield from grow([-1], [0], [0] * size)


@pytest.mark.parametrize("seed", range(4))
def test_best_tree_is_optimal_for_its_budget(seed):
  rng = np.random.RandomState(seed)
  acc = np.sort(rng.uniform(0, 1, (3, 3)), axis=1)[:, ::-1]  # rank-ordered
  acc = acc / np.maximum(acc.sum(1, keepdims=True), 1)  # a distribution
  for budget in (2, 4, 6):
    best = tree_shapes.best_tree(acc, budget)
    assert best.size == budget
    brute = max(tree_shapes.expected_tokens(DraftTree.from_parents(p), acc)
                for p in _all_trees(budget, 3, 3))
    assert tree_shapes.expected_tokens(best, acc) == pytest.approx(brute)


def test_acceptance_is_recovered_from_probe_histograms():
  """Analytic histograms of probe trees under a known acceptance matrix."""
  acc = np.array([[.6, .2, .1], [.5, .3, .1], [.4, .2, .2], [.3, .3, .1]])
  depth, width = acc.shape
  hists = []
  for r in range(width):
    hit = acc[:, :r + 1].sum(1)  # depth j hit within ranks 0..r
    reach, hist = 1.0, np.zeros(depth + 1)
    for j in range(depth):
      hist[j] += reach * (1 - hit[j])
      hist[j + 1] += reach * (hit[j] - acc[j, 0])  # a sibling: stop there
      reach *= acc[j, 0]
    hist[depth] += reach
    hists.append(1000 * hist)
  np.testing.assert_allclose(tree_shapes.acceptance_from_histograms(hists),
                             acc, atol=1e-12)


def test_measured_shape_on_a_model():
  """Measured on a model whose heads copy head 1 (drafts right when the text
  repeats): a proper matrix, and the best tree for it is predicted to and
  does accept more per call than the chain."""
  cfg, params = random_model(6, num_prediction_heads=4, max_seq_len=64,
                             vocab_size=8)
  params = _heads_copy_head_one(params)
  prompts, lengths = ragged_prompts(6, 8, 12, cfg.vocab_size)

  def decode(tree):
    return blockdec.decode(params, cfg, prompts, lengths, 40,
                           method=blockdec.Blockwise(tree=tree))

  acc = tree_shapes.measure_acceptance(decode, depth=3, width=2)
  assert acc.shape == (3, 2) and np.all((acc >= 0) & (acc <= 1))
  assert np.all(acc.sum(1) <= 1 + 1e-9)
  tree = tree_shapes.best_tree(acc, budget=8)
  spine = tree_shapes.probe_tree(3, 0)  # the chain of rank-0 drafts
  assert tree_shapes.expected_tokens(tree, acc) > \
      tree_shapes.expected_tokens(spine, acc)
  # The chain's tokens per call, measured by the first probe decode.
  assert float(decode(tree).block_efficiency) > float(
      decode(spine).block_efficiency)


def _bigram_logits(vocab, seed=0):
  table = jax.random.normal(jax.random.key(seed), (vocab, vocab)) * 2.0
  return table, lambda level, paths: table[paths[..., -1]] * (1 + level / 4)


def test_grown_trees_keep_the_likeliest_nodes():
  """Brute force in NumPy: the pool of EAGLE-2's expansion, its T - 1
  likeliest nodes, and every node's path, parent and depth."""
  vocab, depth, spec = 9, 3, blockdec.DynamicTree(nodes=12, top_k=3)
  table, logits_fn = _bigram_logits(vocab)
  root = jax.numpy.array([1, 4, 7])
  rows = jax.device_get(grow_tree(logits_fn, root, depth, spec))
  log_q = lambda level, tok: np.asarray(jax.nn.log_softmax(
      logits_fn(level, np.array([[[tok]]]))[0, 0]))
  for b in range(3):
    # The pool: level 1 the root's top K; then the top K of the frontier's
    # top-K children by path log-probability.
    frontier = [((int(root[b]),), 0.0)]
    pool = []
    for level in range(1, depth + 1):
      kids = []
      for path, value in frontier:
        lq = log_q(level, path[-1])
        for t in np.argsort(-lq, kind="stable")[:spec.top_k]:
          kids.append((path + (int(t),), value + lq[t]))
      pool += kids
      frontier = sorted(kids, key=lambda x: -x[1])[:spec.top_k]
    best = sorted(pool, key=lambda x: -x[1])[:spec.nodes - 1]
    want = {path for path, _ in best}
    tokens, parents, depths = rows.tokens[b], rows.parents[b], rows.depths[b]
    got = set()
    for c in range(spec.nodes - 1):
      node = c + 1
      assert parents[node] < node and depths[node] == depths[parents[node]] + 1
      path = tuple(int(tokens[n]) for n in rows.paths[b, c, :depths[node] + 1])
      assert rows.paths[b, c, depths[node]] == node
      assert np.all(rows.paths[b, c, depths[node]:] == node)
      np.testing.assert_array_equal(rows.real[b, c],
                                    np.arange(1, depth + 1) <= depths[node])
      got.add(path)
    assert got == want


@pytest.mark.parametrize("head_type,arch,batch,p,n,with_eos,nodes,top_k,k", [
    ("stern", 1, 3, 6, 20, True, 10, 3, 4),
    ("hydra", 6, 5, 9, 19, False, 16, 2, 6)])
def test_dynamic_trees_are_exact(head_type, arch, batch, p, n, with_eos,
                                 nodes, top_k, k):
  """Random heads, and heads copying head 1 (a tree that follows the text's
  repeats), equal the plain greedy loop."""
  spec = blockdec.Blockwise(block_size=k, tree=blockdec.DynamicTree(
      nodes=nodes, top_k=top_k))
  counts = np.zeros(2)
  for seed in range(2):
    cfg, params = random_model(arch, param_seed=50 * arch + seed,
                               num_prediction_heads=k, head_type=head_type,
                               vocab_size=16)
    if seed and head_type == "stern":
      params = _heads_copy_head_one(params)
    counts += _equals_greedy(cfg, params, 50 * arch + seed, batch, p, n,
                             with_eos, spec)
  assert np.all(counts > 0), counts  # Drafts accepted, and rejected.


def test_dynamic_tree_sampling_is_ancestral_sampling():
  """Stern's heads (Hydra's run in the static test above)."""
  cfg, params = random_model(4, param_seed=9, num_prediction_heads=4,
                             vocab_size=12)
  _same_as_ancestral(cfg, params, blockdec.Sampling(temperature=0.9,
                                                    top_p=0.95), 5,
                     [blockdec.Blockwise(tree=blockdec.DynamicTree(
                         nodes=8, top_k=3))])


def test_dynamic_tree_errors():
  with pytest.raises(ValueError, match="nodes=1 must be an int >= 2"):
    blockdec.DynamicTree(nodes=1)
  with pytest.raises(ValueError, match="top_k=0"):
    blockdec.DynamicTree(top_k=0)
  with pytest.raises(ValueError, match="Eagle drafts static trees only"):
    blockdec.Eagle(tree=blockdec.DynamicTree())
  with pytest.raises(ValueError, match="adaptive"):
    blockdec.Blockwise(tree=blockdec.DynamicTree(),
                       adaptive=blockdec.AdaptiveBlockSize())
  cfg, params = random_model(0, num_prediction_heads=3)
  prompts, lengths = ragged_prompts(0, 2, 4, cfg.vocab_size)
  with pytest.raises(ValueError, match="grow only 6"):
    blockdec.decode(params, cfg, prompts, lengths, 8,
                    method=blockdec.Blockwise(tree=blockdec.DynamicTree(
                        nodes=16, top_k=2)))


def test_cli_decodes_with_a_dynamic_tree(tmp_path, capsys):
  from absl import flags
  from blockdec import cli
  from blockdec.training.tokenizers import ByteTokenizer
  cfg, params = random_model(0, vocab_size=256, num_prediction_heads=3)
  blockdec.save_checkpoint(tmp_path, cfg, params, tokenizer=ByteTokenizer())
  argv = ["blockdec", "decode", f"--checkpoint={tmp_path}", "--prompt=abcabc",
          "--max_new_tokens=6", "--tree_nodes=6"]
  try:
    cli.main(flags.FLAGS(argv))
  finally:
    flags.FLAGS.unparse_flags()
  out = capsys.readouterr().out
  assert out.startswith("abcabc") and "identical to greedy: True" in out
  try:
    with pytest.raises(SystemExit):
      cli.main(flags.FLAGS(argv + ["--method=lookahead"]))
  finally:
    flags.FLAGS.unparse_flags()
  assert "--tree_nodes=6 grows trees" in capsys.readouterr().err
