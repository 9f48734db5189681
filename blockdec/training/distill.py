"""Sequence-level distillation data (Stern sec. 4): the base model's own greedy text.

Heads trained on corpus text learn to predict the corpus; blockwise decoding
rewards predicting what the BASE MODEL will say. So we cut prefixes from the
training stream, continue each greedily with the teacher, and train on
prefix + continuation with the loss only on the continuation (mask 1 there).

Generation uses `blockdec.blockwise_decode` with Exact acceptance: its output
is the greedy output, and with the teacher's own heads (if it has any) it is
faster than one token per call. With `temperature` > 0 the continuations are
the teacher's samples instead (`blockdec.decode` with `Sampling`), e.g. for
a draft model that will draft while the teacher samples. Results are cached
on disk keyed by a hash of the teacher (config and parameter bytes), the
stream and the settings, so a rerun reuses them.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import numpy as np
from tqdm.auto import tqdm

from blockdec import api, methods
from blockdec.decoding import sampling


def params_digest(params) -> str:
  """sha256 over every parameter's path, dtype, shape and bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    leaf = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}{leaf.dtype}{leaf.shape}".encode())
    h.update(leaf.tobytes())
  return h.hexdigest()


def generate(params, cfg, stream: np.ndarray, *, num_sequences: int,
             prefix_len: int, new_tokens: int, batch_size: int = 64,
             seed: int = 0, cache_dir=None, progress: bool = False,
             temperature: float = 0.0):
  """The teacher's continuations of `num_sequences` corpus prefixes: greedy,
  or sampled at `temperature` > 0.

  Args:
    params, cfg: the teacher (the base model; its heads, if any, only speed up
      generation and do not change it).
    stream: int [n] training token stream to cut prefixes from.
    num_sequences, prefix_len, new_tokens: how many rows, prefix and
      continuation lengths.
    batch_size: rows per decoding call (the last call is padded).
    seed: chooses the prefix start positions.
    cache_dir: folder for the cached `.npz`; None disables caching.
    temperature: 0 for greedy continuations; > 0 samples them (batch i of
      rows draws with `jax.random.fold_in(jax.random.key(seed), i)`).

  Returns:
    tokens int32 [N, prefix_len + new_tokens] and mask float32 [N, same]
    (1 on the continuation).
  """
  stream = np.asarray(stream, np.int32)
  if len(stream) < prefix_len + 1:
    raise ValueError(f"the stream has {len(stream)} tokens, too few for "
                     f"prefix_len={prefix_len}.")
  if not temperature >= 0:
    raise ValueError(f"distill temperature={temperature!r}; allowed: 0 "
                     "(greedy) or > 0 (sampled continuations).")
  if prefix_len + new_tokens > cfg.max_seq_len:
    raise ValueError(f"distill prefix_len + new_tokens = "
                     f"{prefix_len + new_tokens} exceeds the teacher's "
                     f"max_seq_len={cfg.max_seq_len}.")
  # The proposal heads' kind never changes greedy text (head 1 decides it):
  # left out of the key, so data cached before the field existed is reused.
  teacher = {k: v for k, v in cfg.to_dict().items() if k != "head_type"}
  settings = dict(num_sequences=num_sequences, prefix_len=prefix_len,
                  new_tokens=new_tokens, seed=seed, cfg=teacher,
                  params=params_digest(params),
                  stream=hashlib.sha256(stream.tobytes()).hexdigest())
  if temperature:  # Greedy data keeps the key it was cached under.
    settings["temperature"] = float(temperature)
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
  path = None
  if cache_dir is not None:
    path = pathlib.Path(cache_dir) / f"distill-{key[:16]}.npz"
    if path.exists():
      with np.load(path) as f:
        return f["tokens"], f["mask"]

  rng = np.random.default_rng([seed, 7])
  starts = rng.integers(0, len(stream) - prefix_len + 1, size=num_sequences)
  prefixes = stream[starts[:, None] + np.arange(prefix_len)[None, :]]
  lengths = np.full((batch_size,), prefix_len, np.int32)
  continuations = []
  bar = tqdm(range(0, num_sequences, batch_size), desc="distill data",
             disable=not progress, unit="batch")
  for i in bar:
    rows = prefixes[i:i + batch_size]
    pad = batch_size - rows.shape[0]
    rows = np.concatenate([rows, np.zeros((pad, prefix_len), np.int32)])
    if temperature:
      out = api.decode(params, cfg, rows, lengths, new_tokens,
                       method=methods.Autoregressive(),
                       sampling=sampling.Sampling(temperature=temperature),
                       key=jax.random.fold_in(jax.random.key(seed),
                                              i // batch_size))
    else:
      out = api.blockwise_decode(params, cfg, rows, lengths,
                                 max_new_tokens=new_tokens,
                                 block_size=cfg.num_prediction_heads)
    continuations.append(np.asarray(out.tokens)[:batch_size - pad])
  tokens = np.concatenate([prefixes, np.concatenate(continuations)], axis=1)
  mask = np.zeros(tokens.shape, np.float32)
  mask[:, prefix_len:] = 1.0
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, tokens=tokens, mask=mask)
    tmp.replace(path)
  return tokens.astype(np.int32), mask
