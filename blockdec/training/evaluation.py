"""Evaluating a trained model: held-out loss, greedy-vs-blockwise decoding,
ancestral-vs-speculative sampling.

Shared by `make demo`, `blockdec eval`, experiments and notebooks.

    result = compare_decoding(params, cfg, tokenizer, prompt_texts,
                              max_new_tokens=64)
    result["block_efficiency"], result["degenerate_share"], result["speedup"]
    sampled = compare_sampling(params, cfg, tokenizer, prompt_texts,
                               sampling=blockdec.Sampling(temperature=0.6))
    sampled["tokens_per_call"], sampled["speedup"], sampled["nll"]
"""

from __future__ import annotations

import time

import jax
import numpy as np

from blockdec import api, metrics
from blockdec.training import data as data_lib
from blockdec.training import losses
from blockdec.training.train import make_eval_step, pad_prompts


def timed(fn, repeats: int):
  """(output, compile+first-run seconds, median seconds of `repeats` runs)."""
  t = time.perf_counter()
  out = fn()
  jax.block_until_ready(out.tokens)
  first = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out.tokens)
    times.append(time.perf_counter() - t)
  return out, first, float(np.median(times))


def heldout_prompts(tokenizer, num: int, min_bytes: int = 128,
                    max_bytes: int = 192, corpus: str = "stdlib",
                    split: str = "test"):
  """(texts, prompts int32 [num, P], lengths [num]): `num` held-out prompts
  of the corpus's `split` ("test", or "valid" for tuning on other text;
  `data.heldout_prompts`, cut at line boundaries), encoded and
  right-padded to one width."""
  splits = data_lib.split_corpus(data_lib.load_corpus(corpus))
  if split not in ("test", "valid"):
    raise ValueError(f"split={split!r} must be 'test' or 'valid'.")
  texts = data_lib.heldout_prompts(splits[split], num, min_bytes=min_bytes,
                                   max_bytes=max_bytes)
  prompts, lengths = pad_prompts([np.asarray(tokenizer.encode(t), np.int32)
                                  for t in texts])
  return texts, prompts, lengths


def compare_decoding(params, cfg, tokenizer, texts, *, max_new_tokens: int = 64,
                     block_size: int | None = None, repeats: int = 3,
                     adaptive=None, method=None) -> dict:
  """Greedy vs exact blockwise decoding of `texts` in one batch.

  `adaptive`: a `blockdec.AdaptiveBlockSize` for the blockwise side, or None.
  `method`: another method spec (`blockdec.DraftModel(...)`,
  `blockdec.PromptLookup(...)`, ...) in place of blockwise decoding; its
  results are reported under the same "blockwise" keys.

  Prompts that do not fit `cfg.max_seq_len` with `max_new_tokens` keep their
  last tokens.

  Returns a dict with per-row `greedy` / `blockwise` continuations (text),
  `degenerate` flags (metrics.is_degenerate on the blockwise continuation),
  block efficiency over all and over non-degenerate rows, tokens/s of both
  (medians of `repeats` timed runs after one warm-up), `speedup`, and whether
  the two outputs are `identical`.
  """
  block_size = block_size or cfg.num_prediction_heads
  room = cfg.max_seq_len - max_new_tokens
  if room < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a "
                     f"prompt within max_seq_len={cfg.max_seq_len}.")
  # Prompts longer than the room keep their last `room` tokens.
  prompts, lengths = pad_prompts([tokenizer.encode(t)[-room:] for t in texts])
  greedy, greedy_first, t_greedy = timed(lambda: api.greedy_decode(
      params, cfg, prompts, lengths, max_new_tokens=max_new_tokens), repeats)
  if method is None:
    run = lambda: api.blockwise_decode(
        params, cfg, prompts, lengths, max_new_tokens=max_new_tokens,
        block_size=block_size, adaptive=adaptive)
  else:
    run = lambda: api.decode(params, cfg, prompts, lengths, max_new_tokens,
                             method=method)
  block, block_first, t_block = timed(run, repeats)
  g_tokens, b_tokens = np.asarray(greedy.tokens), np.asarray(block.tokens)
  b_len, calls = np.asarray(block.lengths), np.asarray(block.num_calls)
  greedy_text = [tokenizer.decode(g_tokens[r, :int(greedy.lengths[r])])
                 for r in range(len(texts))]
  block_text = [tokenizer.decode(b_tokens[r, :int(b_len[r])])
                for r in range(len(texts))]
  degenerate = np.array([metrics.is_degenerate(t) for t in block_text])
  n_tokens = float(np.sum(b_len))
  return {
      "rows": len(texts), "max_new_tokens": max_new_tokens,
      "block_size": block_size,
      "identical": bool(np.array_equal(g_tokens, b_tokens)),
      "block_efficiency": metrics.block_efficiency(b_len, calls),
      "block_efficiency_non_degenerate": metrics.block_efficiency(
          b_len, calls, ~degenerate),
      "degenerate_share": float(degenerate.mean()),
      "prompt_degenerate_share": float(np.mean(
          [metrics.is_degenerate(t) for t in texts])),
      "greedy_tokens_per_s": float(np.sum(greedy.lengths)) / t_greedy,
      "blockwise_tokens_per_s": n_tokens / t_block,
      "speedup": t_greedy / t_block,
      "greedy_seconds": t_greedy, "blockwise_seconds": t_block,
      "greedy_first_call_seconds": greedy_first,
      "blockwise_first_call_seconds": block_first,
      "greedy": greedy_text, "blockwise": block_text,
      "degenerate": degenerate.tolist(),
      "row_block_efficiency": (b_len / np.maximum(calls, 1)).tolist(),
  }


def sample_nll(params, cfg, prompts, lengths, out) -> np.ndarray:
  """Per-token NLL [sum(out.lengths)] of each row's generated tokens under the
  model's unfiltered head 1 at temperature 1 (prompts [B, P], lengths [B]).

  Two samplers that draw from the same distribution give the same mean NLL
  up to noise: a cheap check of losslessness on real models.
  """
  prompts, lengths = np.asarray(prompts), np.asarray(lengths)
  tokens, n = np.asarray(out.tokens), np.asarray(out.lengths)
  seqs = [np.concatenate([prompts[r, :lengths[r]], tokens[r, :n[r]]])
          for r in range(len(n))]
  width = max(len(x) for x in seqs)
  batch = np.zeros((len(seqs), width), np.int32)
  for r, x in enumerate(seqs):
    batch[r, :len(x)] = x
  log_p = np.asarray(jax.nn.log_softmax(api.forward_logits(params, cfg, batch),
                                        axis=-1))
  nll = []
  for r in range(len(seqs)):
    pos = np.arange(lengths[r], lengths[r] + n[r])  # generated positions
    nll.append(-log_p[r, pos - 1, batch[r, pos]])
  return np.concatenate(nll) if nll else np.zeros(0)


def compare_sampling(params, cfg, tokenizer, texts, *, sampling,
                     max_new_tokens: int = 64, block_size: int | None = None,
                     repeats: int = 3, seed: int = 0) -> dict:
  """Ancestral vs speculative sampling of `texts` in one batch, same key.

  Returns tokens/s of both (medians of `repeats` timed runs after one
  warm-up), `speedup` (speculative over ancestral), `tokens_per_call` of
  speculative sampling, and the mean per-token NLL of each side's samples
  under the model at temperature 1 with its standard error (`nll`,
  `nll_stderr`; `ancestral_*` for the ancestral side): equal within noise
  when the speculative samples are distributed as the ancestral ones (the
  standard error treats tokens as independent; tokens of one row are not,
  so read it as a lower bound).
  """
  import blockdec  # pylint: disable=g-import-not-at-top
  room = cfg.max_seq_len - max_new_tokens
  if room < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a "
                     f"prompt within max_seq_len={cfg.max_seq_len}.")
  prompts, lengths = pad_prompts([tokenizer.encode(t)[-room:] for t in texts])
  key = jax.random.key(seed)
  run = lambda method: api.decode(params, cfg, prompts, lengths,
                                  max_new_tokens, method=method,
                                  sampling=sampling, key=key)
  anc, _, t_anc = timed(lambda: run(blockdec.Autoregressive()), repeats)
  spec, _, t_spec = timed(lambda: run(blockdec.Blockwise(block_size)),
                           repeats)
  result = {"rows": len(texts), "max_new_tokens": max_new_tokens,
            "sampling": repr(sampling),
            "ancestral_tokens_per_s": float(np.sum(anc.lengths)) / t_anc,
            "speculative_tokens_per_s": float(np.sum(spec.lengths)) / t_spec,
            "tokens_per_call": metrics.block_efficiency(
                np.asarray(spec.lengths), np.asarray(spec.num_calls))}
  result["speedup"] = (result["speculative_tokens_per_s"]
                       / result["ancestral_tokens_per_s"])
  for name, out in (("ancestral_", anc), ("", spec)):
    nll = sample_nll(params, cfg, prompts, lengths, out)
    result[name + "nll"] = float(nll.mean())
    result[name + "nll_stderr"] = float(nll.std() / np.sqrt(max(len(nll), 1)))
  return result


def heldout_loss(params, cfg, tokenizer, docs, *, seq_len: int = 256,
                 batch_size: int = 16, max_batches: int = 8) -> dict:
  """Per-head held-out loss (nats/token) and head 1 in nats per byte."""
  stream = data_lib.token_stream(docs, tokenizer)
  n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
  step = jax.jit(make_eval_step(cfg))
  ce = np.zeros(cfg.num_prediction_heads)
  w = np.zeros(cfg.num_prediction_heads)
  for batch in data_lib.eval_batches(stream, min(seq_len, cfg.max_seq_len - 1),
                                     batch_size, max_batches):
    c_sum, w_sum = step(params, batch)
    ce += np.asarray(c_sum)
    w += np.asarray(w_sum)
  per_head = ce / np.maximum(w, 1)
  return {"loss": float(per_head[0]), "head_losses": per_head.tolist(),
          "nats_per_byte": float(per_head[0] * len(stream) / max(n_bytes, 1)),
          "regime_loss_finetune": float(losses.regime_loss("finetune",
                                                           per_head))}
