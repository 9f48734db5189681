"""Shared test helpers: tiny random models, ragged prompts, oracle scorers."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import blockdec


def tiny_config(seed: int = 0, **overrides) -> blockdec.ModelConfig:
  """A small random architecture drawn from `seed` (varied GQA, norms, ...)."""
  rng = np.random.RandomState(seed)
  n_heads = int(rng.choice([2, 4]))
  kw = dict(
      vocab_size=int(rng.choice([17, 32, 61])),
      d_model=16 * n_heads,
      n_layers=int(rng.choice([1, 2])),
      n_heads=n_heads,
      n_kv_heads=int(rng.choice([h for h in (1, 2, 4) if n_heads % h == 0])),
      d_ff=int(rng.choice([32, 64])),
      max_seq_len=96,
      num_prediction_heads=8,
      tie_embeddings=bool(rng.rand() < 0.5),
  )
  kw.update(overrides)
  return blockdec.ModelConfig(**kw)


def random_model(seed: int = 0, param_seed: int | None = None, **overrides):
  """A random model: architecture from `seed`, weights from `param_seed`."""
  cfg = tiny_config(seed, **overrides)
  key = jax.random.key(seed if param_seed is None else param_seed)
  params = blockdec.init_params(cfg, key)
  # Sharpen the random model a little so argmaxes are not near-ties.
  params = jax.tree_util.tree_map(lambda x: x * 2.0, params)
  return cfg, params


def ragged_prompts(seed: int, batch: int, max_len: int, vocab: int):
  """Right-padded prompts [B, max_len] (padding = -1 garbage) and lengths [B]."""
  rng = np.random.RandomState(seed)
  lengths = rng.randint(1, max_len + 1, size=batch)
  lengths[rng.randint(batch)] = max_len
  prompts = rng.randint(0, vocab, size=(batch, max_len))
  prompts[np.arange(max_len)[None, :] >= lengths[:, None]] = 0
  return prompts.astype(np.int32), lengths.astype(np.int32)


def mid_way_eos(cfg, params, prompts, lengths, n: int) -> int:
  """A token the greedy output of the middle row emits a third of the way
  in: as eos_id, EOS really triggers mid-way (reuse the id for other
  weights of the same architecture: it is static, one compile)."""
  free = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                max_new_tokens=n)
  return int(np.asarray(free.tokens)[len(lengths) // 2, n // 3])


def assert_same_or_near_tie(cfg, params, prompts, lengths, expected, got,
                            tol: float = 1e-5):
  """Asserts equal outputs; a difference is tolerated only at a logit near-tie.

  At the first differing position of a row, the reference logits of the
  greedy prefix must have their top-2 gap below `tol` (the block call and the
  one-token call may round differently); anything else fails.
  """
  expected_tokens = np.asarray(expected.tokens)
  got_tokens = np.asarray(got.tokens)
  np.testing.assert_array_equal(np.asarray(expected.lengths) > 0, True)
  for b in range(expected_tokens.shape[0]):
    n = int(expected.lengths[b])
    diff = np.nonzero(expected_tokens[b, :n] != got_tokens[b, :n])[0]
    if not diff.size and int(got.lengths[b]) == n:
      continue
    i = int(diff[0]) if diff.size else min(n, int(got.lengths[b]))
    seq = np.concatenate([prompts[b, :lengths[b]], expected_tokens[b, :i]])
    logits = np.asarray(blockdec.forward_logits(params, cfg, seq[None]))[0, -1]
    top2 = np.sort(logits)[-2:]
    assert top2[1] - top2[0] < tol, (
        f"row {b} differs at generated token {i} without a near-tie "
        f"(gap {top2[1] - top2[0]:.3g}): expected {expected_tokens[b, :n]}, "
        f"got {got_tokens[b, :int(got.lengths[b])]}")


# ------------------------------------------------------------ oracle scorers


def oracle_next(prev, pos, vocab):
  """The oracle base model's greedy rule: next token from previous and position."""
  return (3 * prev + 7 * pos + 1) % vocab


def oracle_score_fn(vocab: int, num_heads: int, agree: int):
  """A scorer whose heads 2..agree+1 are right and the later heads wrong.

  Head 1 is the oracle base model (`oracle_next`); head j predicts the token
  j - 1 steps past head 1's, correctly iff j - 1 <= agree, otherwise off by
  one. Blockwise decoding must therefore accept exactly min(agree+1, k)
  tokens per call. The "cache" is unused.
  """

  def score(params, tokens, positions, cache):
    del params
    preds = []
    tok = tokens
    for j in range(num_heads):
      tok = oracle_next(tok, positions + j, vocab)  # token at position p+j+1
      preds.append(tok if j <= agree else (tok + 1) % vocab)
    logits = 10.0 * jax.nn.one_hot(jnp.stack(preds, axis=2), vocab)
    return logits, cache

  return score


def oracle_greedy(prompt, n, vocab):
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(oracle_next(seq[-1], len(seq) - 1, vocab)))
  return seq[len(prompt):]


def experiment_script(name: str, file: str | None = None):
  """experiments/<file or name>.py as a module named `name`, loaded once per
  process (sys.modules holds it: dataclasses defined there look it up)."""
  if name not in sys.modules:
    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        name, root / "experiments" / f"{file or name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]
