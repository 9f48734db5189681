"""What a verification call costs on this machine, measured.

Blockwise decoding gains wall-clock only where the tokens a call commits
outgrow what the call costs beside a one-token call, and that cost depends
on the hardware, the model and the batch: on the 2-core CPU this project
runs on, a k = 8 call of the `make demo` model costs 1.6x to 3x a greedy
step depending on the processor and the batch; on an accelerator that is
memory-bound at the batch it costs about 1x. `AdaptiveBlockSize` chooses
how many drafts each call verifies from such a cost model, so the costs
are worth measuring rather than guessing:

    costs = blockdec.measure_call_costs(params, cfg, batch=1,
                                        sizes=(1, 2, 4, 8))
    # e.g. ((1, 1.0), (2, 1.05), (4, 1.2), (8, 1.6))
    rule = blockdec.AdaptiveBlockSize(call_costs=costs)

Each timed call is the decoding loop's target call: T tokens at positions
P..P+T-1 against a KV cache with P committed slots, written in place (the
cache is donated, as in the loop), head 1's logits at every fed token,
several calls per compiled loop as in decoding (a call dispatched alone
from Python would add its dispatch to every size);
`experiments/step_costs.py` times the same call for its tables. Costs
depend on shapes, not on the weights' values, and timings on a shared
machine move: every size is timed once per round, the rounds repeated,
and each cost is the median over rounds of the size's time over the
one-token call's in the same round (`interleaved_ratios`), so a drift of
the machine's speed cancels; measuring with nothing else running still
gives the steadiest table.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from blockdec import cpu_compile
from blockdec import validation
from blockdec.config import ModelConfig
from blockdec.models import transformer


def random_model(d_model: int, n_layers: int, n_heads: int, *,
                 vocab_size: int = 256, max_seq_len: int = 512, seed: int = 0):
  """(cfg, params): a one-head model of this shape with random weights, for
  timings (a call's cost depends on the shapes, not on the values)."""
  cfg = ModelConfig(vocab_size=vocab_size, d_model=d_model,
                    n_layers=n_layers, n_heads=n_heads,
                    max_seq_len=max_seq_len, num_prediction_heads=1)
  return cfg, _init_params(cfg, jax.random.key(seed))


_init_params = jax.jit(transformer.init_params, static_argnums=0)


# Calls per dispatch: the decoding loop runs its calls inside one compiled
# while loop, so a timing that dispatched every call from Python would add
# the dispatch (~0.3 ms on the 2-core CPUs, a third of the demo model's
# one-token call) to every size and understate the ratios.
CALLS_PER_DISPATCH = 8


# `calls` target calls in a `lax.fori_loop`, each writing the same slots of
# the carried cache (donated, as in the decoding loop: written in place
# instead of copied); the logits' maximum is summed so no call is dead code.
# Compiled as `blockdec.decode` compiles its loop (`cpu_compile`), so the
# costs are the decode's.
@functools.partial(cpu_compile.jit, static_argnames=("cfg", "mask", "calls"),
                   donate_argnames=("cache",))
def _calls(params, tokens, positions, cache, memory, cfg, mask, calls):
  def body(_, carry):
    total, cache = carry
    logits, cache = transformer.apply(params, cfg, tokens, positions, cache,
                                      num_heads=1, mask=mask, memory=memory)
    return total + jnp.max(logits), cache

  return jax.lax.fori_loop(0, calls, body, (jnp.float32(0), cache))


def time_call(params, cfg: ModelConfig, batch: int, depths, mask=None, *,
              prompt_len: int = 128, cache_len: int | None = None,
              source_len: int = 32, repeats: int = 20) -> float:
  """Median milliseconds of one target call feeding len(depths) tokens,
  inside a compiled loop of `CALLS_PER_DISPATCH` calls as in decoding.

  Args:
    params, cfg: the model (any weights of its shapes).
    batch: rows per call.
    depths: each fed token's position offset from the first: range(T) for
      a chain of T, a tree's node depths for a tree.
    mask: None (a causal chain) or the call's block mask (e.g.
      `kernels.TreeMask(parents)` for a tree).
    prompt_len: committed slots P before the fed tokens.
    cache_len: the cache's slots (default P + 128 + T).
    source_len: an encoder-decoder's source length (encoded once, outside
      the timed calls).
    repeats: timed dispatches after one warm-up (compilation).
  """
  repeats = validation.check_int("repeats", repeats, low=1)
  once = call_timer(params, cfg, batch, depths, mask, prompt_len=prompt_len,
                    cache_len=cache_len, source_len=source_len)
  return 1e3 * float(np.median([once() for _ in range(repeats)]))


def call_timer(params, cfg: ModelConfig, batch: int, depths, mask=None, *,
               prompt_len: int = 128, cache_len: int | None = None,
               source_len: int = 32) -> Callable[[], float]:
  """`once()` -> seconds per call of one timed dispatch of the call
  `time_call` describes (same arguments), compiled and warmed up here."""
  batch = validation.check_int("batch", batch, low=1)
  prompt_len = validation.check_int("prompt_len", prompt_len, low=0)
  depths = tuple(int(x) for x in depths)
  if not depths or min(depths) < 0:
    raise ValueError(f"depths={depths!r} must be non-empty offsets >= 0.")
  t = len(depths)
  length = prompt_len + 128 + t if cache_len is None else int(cache_len)
  if length < prompt_len + t or prompt_len + max(depths) >= cfg.max_seq_len:
    raise ValueError(
        f"prompt_len={prompt_len} with {t} fed tokens needs cache_len >= "
        f"{prompt_len + t} (got {length}) and positions below the model's "
        f"max_seq_len={cfg.max_seq_len}.")
  memory = None
  if cfg.encoder_layers:
    source = jnp.ones((batch, source_len), jnp.int32)
    memory = transformer.encode(params, cfg, source,
                                jnp.full((batch,), source_len, jnp.int32))
  cache = transformer.make_cache(cfg, batch, length)
  cache = cache.set_end_index(jnp.full((batch,), prompt_len, jnp.int32))
  tokens = jnp.ones((batch, t), jnp.int32)
  positions = prompt_len + jnp.broadcast_to(jnp.asarray(depths, jnp.int32),
                                            (batch, t))
  # Every call writes the same slots, so each returned cache is the next
  # dispatch's input (the donated one is gone).
  # The compile is chosen once, here (`cpu_compile.ENABLED` as it is now).
  run = functools.partial(_calls.pick(params), cfg=cfg, mask=mask,
                          calls=CALLS_PER_DISPATCH)
  carry = {"cache": cache}

  def once() -> float:
    start = time.perf_counter()
    total, carry["cache"] = run(params, tokens, positions, carry["cache"],
                                memory)
    jax.block_until_ready(total)
    return (time.perf_counter() - start) / CALLS_PER_DISPATCH

  once()  # Compiles.
  return once


def interleaved_ratios(timers: dict, base, repeats: int) -> dict:
  """{name: median over rounds of timers[name]() / timers[base]()}: every
  round times each timer once, in turn, so a drift of the machine's speed
  (up to 3x between hours on a shared 2-core CPU, and 25% between minutes)
  reaches every timer of the round alike; timing each size's repeats in a
  block of its own let the drift between blocks into the ratios (a 2-token
  call once came out at 2.4x a one-token call that way, against 1.7-2.0x)."""
  times = {name: [] for name in timers}
  for r in range(repeats):
    # Alternate the order, so no timer always runs first in its round.
    names = list(timers) if r % 2 == 0 else list(timers)[::-1]
    for name in names:
      times[name].append(timers[name]())
  return {name: float(np.median([x / b for x, b in zip(times[name],
                                                       times[base])]))
          for name in timers}


def measure_call_costs(params, cfg: ModelConfig, *, batch: int = 1,
                       sizes=(1, 2, 4, 8), prompt_len: int = 128,
                       repeats: int = 20) -> tuple[tuple[int, float], ...]:
  """Each chain size's call cost in one-token calls, measured here.

  Returns ((T, cost), ...) for T in `sizes` (sorted), cost = the median
  over `repeats` rounds of the time of a call verifying T tokens over that
  of a one-token call at the same batch in the same round (so T = 1 costs
  1.0; `interleaved_ratios`): the `call_costs` of `AdaptiveBlockSize`.
  """
  if (not isinstance(sizes, (tuple, list)) or not sizes
      or any(not validation.is_int(t) or t < 1 for t in sizes)):
    raise ValueError(f"sizes={sizes!r} must be a non-empty sequence of "
                     "positive ints.")
  repeats = validation.check_int("repeats", repeats, low=1)
  sizes = tuple(sorted(set(int(t) for t in sizes)))
  timers = {t: call_timer(params, cfg, batch, range(t), prompt_len=prompt_len,
                          cache_len=prompt_len + max(sizes) + 128)
            for t in sorted(set(sizes) | {1})}
  ratios = interleaved_ratios(timers, 1, repeats)
  return tuple((t, round(ratios[t], 4)) for t in sizes)
