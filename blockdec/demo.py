"""`make demo`: greedy vs exact blockwise decoding, side by side.

Until the training pipeline lands this decodes with a RANDOMLY INITIALISED
model, so block efficiency reflects random heads, not trained ones.
"""

from __future__ import annotations

import time

import jax
import numpy as np

import blockdec


def _timed(fn, repeats=3):
  out = fn()
  jax.block_until_ready(out.tokens)  # compile + first run
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out.tokens)
    times.append(time.perf_counter() - t)
  return out, float(np.median(times))


def main():
  print("NOTE: randomly initialised model (training is not wired in yet).")
  cfg = blockdec.ModelConfig(vocab_size=256, d_model=128, n_layers=2,
                             n_heads=4, max_seq_len=256,
                             num_prediction_heads=8)
  params = blockdec.init_params(cfg, jax.random.key(0))
  prompt = np.frombuffer(b"def fibonacci(n):\n    ", np.uint8).astype(np.int32)
  prompts, lengths = prompt[None], np.array([len(prompt)], np.int32)
  greedy, t_g = _timed(lambda: blockdec.greedy_decode(
      params, cfg, prompts, lengths, max_new_tokens=64))
  block, t_b = _timed(lambda: blockdec.blockwise_decode(
      params, cfg, prompts, lengths, max_new_tokens=64, block_size=8))
  same = bool(np.array_equal(greedy.tokens, block.tokens))
  n = int(greedy.lengths[0])
  print(f"greedy:    {n / t_g:8.0f} tokens/s, {int(greedy.num_calls[0])} calls")
  print(f"blockwise: {n / t_b:8.0f} tokens/s, {int(block.num_calls[0])} calls, "
        f"block efficiency {float(block.block_efficiency):.2f}, "
        f"speedup {t_g / t_b:.2f}x, identical output: {same}")


if __name__ == "__main__":
  main()
