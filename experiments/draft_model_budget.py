r"""Where a draft-model decode's time goes, beside its weight-GEMM floor.

`experiments/hf_peers.py` reads `blockdec.DraftModel` against transformers'
assisted generation at batch 1; on 2 CPU cores the 64-token ratio sits
near its 5x target. This splits one such decode (batch 1, greedy, the
prompts one after another, every time a median over interleaved rounds in
one process) into its parts and sets each beside a floor: the same rows
multiplied through the model's own weight GEMMs in its order (q, k, v and
gate, up free to run side by side as in the model; the tied vocabulary
projection at the rows whose logits are read) inside a compiled loop, i.e.
the GEMM work alone, with no attention, norms, cache writes, drafting
logic or dispatch.

  decode        `decode(..., N, method=DraftModel(k))` per prompt
  prefill       the same with N = 1: the draft model's prompt call and its
                k first drafts, the target's prefill over P + k tokens that
                verifies them (speculative prefill), and the call's fixed
                costs; floor: the target's GEMMs at P + k rows (its last
                layer's keys and values; the rest of that layer and the
                vocabulary at the k + 1 rows read), the draft's prompt
                call likewise at P rows, and k draft steps
  loop          decode - prefill, per loop call (the loop calls of the
                N-token decode beyond the 1-token one's); floor: the
                target's GEMMs at k rows plus k - 1 draft steps at 1 row
    verify      one k-token target call alone (`calibration.call_timer`)
    draft steps k - 1 one-token calls of the draft model, each fed the
                last one's argmax, in a compiled scan
    the rest    loop - verify - draft steps: acceptance, commit, the
                drafter's bookkeeping, the loop itself
  fixed         a 1-token greedy decode of an 8-token prompt: its prefill
                and the reference loop's one call, which feeds the decided
                token (floor: both calls' GEMMs); what any decode call pays

The decode and the 1-token decode are timed once more, each right after a
full collection of Python's heap, as `hf_peers.py` timed every call before
`hf_peers.frozen_gc`: on 2 CPU cores a 1-token decode run after the ~0.2 s
single-threaded collection read about 1.2x its time (the second core idles
meanwhile, and XLA's two-thread work runs slower for the next ~50 ms).

`--model=demo` uses the `make demo` base and its distilled 1-layer draft
(configs/draft_model.py:demo; trained first when the cache lacks them) on
the held-out stdlib prompts of `hf_peers.py`; `--model=random` and
`--model=tiny` use random weights of the demo's shapes or tiny ones, with
random prompts (the split, not the acceptance, is what they show).

Launch (from the repository root):

  python experiments/draft_model_budget.py   # -> experiments/results/draft_model_budget.{json,md}
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import blockdec
from blockdec import calibration, metrics
from blockdec.models import transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
sys.path.insert(0, str(ROOT / "experiments"))
import greedy_floor  # pylint: disable=g-import-not-at-top,wrong-import-position
import hf_peers  # pylint: disable=g-import-not-at-top,wrong-import-position

# name -> ((d_model, n_layers, n_heads) of the target, of the draft).
RANDOM_SHAPES = {"random": ((256, 4, 4), (128, 1, 4)),
                 "tiny": ((32, 2, 2), (16, 1, 2))}
MODELS = ("demo",) + tuple(RANDOM_SHAPES)
SHORT_PROMPT = 8
LOOPS = 8  # timed passes per dispatch, so dispatch is not what is timed


def _median_ms(fn, repeats: int) -> float:
  """Median milliseconds of one of the LOOPS passes `fn` runs per call."""
  return 1e3 * greedy_floor.median_seconds(fn, repeats) / LOOPS


def _check_layout(cfg) -> None:
  if cfg.mlp != "swiglu" or not cfg.tie_embeddings or cfg.encoder_layers:
    raise ValueError("the GEMM floor follows a decoder-only model with a "
                     "SwiGLU MLP and tied embeddings; got mlp="
                     f"{cfg.mlp!r}, tie_embeddings={cfg.tie_embeddings}, "
                     f"encoder_layers={cfg.encoder_layers}.")


@functools.partial(jax.jit, static_argnames=("rows", "read", "n_layers"))
def _gemms(params, rows: int, read: int, n_layers: int):
  """LOOPS passes of the model's weight GEMMs: every layer at `rows` rows,
  except that the last layer's query, output and MLP GEMMs and the
  vocabulary projection run at the `read` rows whose outputs are used."""
  d = params["embed"]["embedding"].shape[1]

  def layer(p, x, last):
    a, m = p["attn"], p["mlp"]
    k, v = x @ a["k"]["kernel"], x @ a["v"]["kernel"]
    y = x[:read] if last else x
    q = y @ a["q"]["kernel"]
    x = y + (q + k[:y.shape[0]] + v[:y.shape[0]]) @ a["o"]["kernel"]
    g, u = x @ m["gate"]["kernel"], x @ m["up"]["kernel"]
    return x + (jax.nn.silu(g) * u) @ m["down"]["kernel"]

  def body(_, x):
    for i in range(n_layers):
      x = layer(params[f"layer_{i}"], x, i == n_layers - 1)
    logits = x @ params["embed"]["embedding"].T
    return jnp.ones((rows, d), jnp.float32) + 1e-6 * jnp.max(logits)

  return jax.lax.fori_loop(0, LOOPS, body, jnp.ones((rows, d), jnp.float32))


def gemm_floor_ms(params, cfg, rows: int, read: int, repeats: int) -> float:
  """Milliseconds of one pass of `_gemms` (module doc: the floor)."""
  _check_layout(cfg)
  return _median_ms(lambda: _gemms(params, rows, min(read, rows),
                                   cfg.n_layers), repeats)


@functools.partial(jax.jit, static_argnames=("cfg", "steps"),
                   donate_argnames=("cache",))
def _draft_steps(params, cache, position, cfg, steps: int):
  def step(carry, depth):
    token, cache = carry
    logits, cache = transformer.apply(
        params, cfg, token[:, None], (position + depth)[None, None], cache,
        num_heads=1)
    return (jnp.argmax(logits[:, 0, 0], -1).astype(jnp.int32), cache), None

  def body(_, carry):
    return jax.lax.scan(step, carry, jnp.arange(steps, dtype=jnp.int32))[0]

  return jax.lax.fori_loop(0, LOOPS, body,
                           (jnp.ones((1,), jnp.int32), cache))


def draft_steps_ms(params, cfg, steps: int, prompt_len: int,
                   repeats: int) -> float:
  """Milliseconds of `steps` one-token draft-model calls in a scan, each
  fed the previous call's argmax, against a cache of `prompt_len` slots."""
  cache = transformer.make_cache(cfg, 1, prompt_len + steps + 1)
  carry = {"cache": cache.set_end_index(jnp.full((1,), prompt_len,
                                                 jnp.int32))}
  position = jnp.int32(prompt_len)

  def once():
    token, carry["cache"] = _draft_steps(params, carry["cache"], position,
                                         cfg, steps)
    return token

  return _median_ms(once, repeats)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="demo", choices=MODELS)
  p.add_argument("--block_size", type=int, default=16,
                 help="k: the decided token plus k - 1 drafts per call")
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--prompt_len", type=int, default=128)
  p.add_argument("--num_prompts", type=int, default=8,
                 help="prompts decoded one after another per timed pass")
  p.add_argument("--repeats", type=int, default=9, help="timed rounds")
  p.add_argument("--cache_dir", default=str(ROOT / "cache"))
  p.add_argument("--out", default=str(RESULTS / "draft_model_budget"))
  args = p.parse_args(argv)
  for name in ("block_size", "new_tokens", "num_prompts", "repeats"):
    if getattr(args, name) < (2 if name == "block_size" else 1):
      p.error(f"--{name}={getattr(args, name)}; allowed: >= "
              f"{2 if name == 'block_size' else 1}.")
  if args.prompt_len < SHORT_PROMPT:
    p.error(f"--prompt_len={args.prompt_len}; allowed: >= {SHORT_PROMPT}.")
  return args


def models(args):
  """(cfg, params, draft cfg, draft params, prompts [R, P], note)."""
  if args.model == "demo":
    import draft_policy  # pylint: disable=g-import-not-at-top
    cfg, params, workdir, dcfg, dparams, dworkdir = draft_policy.demo_models(
        args.cache_dir)
    prompts = hf_peers.byte_prompts("stdlib", args.num_prompts,
                                    args.prompt_len)
    note = (f"the make demo base ({os.path.relpath(workdir, ROOT)}) and its "
            f"distilled draft ({os.path.relpath(dworkdir, ROOT)}), held-out "
            "stdlib prompts")
  else:
    target, draft = RANDOM_SHAPES[args.model]
    cfg, params = calibration.random_model(*target)
    dcfg, dparams = calibration.random_model(*draft, seed=1)
    prompts = np.random.RandomState(0).randint(
        1, cfg.vocab_size, (args.num_prompts, args.prompt_len)).astype(
            np.int32)
    note = (f"random weights, target (d_model, layers, heads) = {target}, "
            f"draft {draft}, random prompts")
  need = args.prompt_len + args.new_tokens + args.block_size
  if need > cfg.max_seq_len:
    raise ValueError(f"--prompt_len + --new_tokens + --block_size = {need}; "
                     f"allowed: <= {cfg.max_seq_len} (the model's positions).")
  return (cfg, jax.device_put(params), dcfg, jax.device_put(dparams),
          prompts, note)


def measure(args):
  cfg, params, dcfg, dparams, prompts, note = models(args)
  k, n, p = args.block_size, args.new_tokens, args.prompt_len
  method = blockdec.DraftModel(dcfg, dparams, block_size=k)
  lengths = jnp.full((1,), p, jnp.int32)
  short = jnp.full((1,), SHORT_PROMPT, jnp.int32)

  def decoder(new_tokens):
    return lambda: hf_peers.one_by_one(
        lambda row: blockdec.decode(params, cfg, jnp.asarray(row), lengths,
                                    new_tokens, method=method), prompts)

  fixed = lambda: hf_peers.one_by_one(
      lambda row: blockdec.greedy_decode(
          params, cfg, jnp.asarray(row[:, :SHORT_PROMPT]), short,
          max_new_tokens=1), prompts)
  timed_fns = {"decode": decoder(n), "prefill": decoder(1), "fixed": fixed}
  timed = hf_peers.interleaved(timed_fns, args.repeats)
  out = timed["decode"][3]
  r = prompts.shape[0]
  # The same two decodes each timed right after a full collection of
  # Python's heap, as hf_peers' harness did before `hf_peers.frozen_gc`.
  # (`hf_peers.without_gc` outside `frozen_gc`: a full collection.)
  collected = {"decode": [], "prefill": [], "collection": []}
  for _ in range(args.repeats):
    start = time.perf_counter()
    gc.collect()
    collected["collection"].append(time.perf_counter() - start)
    for name in ("decode", "prefill"):
      collected[name].append(hf_peers.without_gc(timed_fns[name])[0])
  # The target's call at the loop's mean committed length, and the draft
  # steps of one call, each alone inside a compiled loop.
  at = p + n // 2
  verify = calibration.call_timer(params, cfg, 1, range(k), prompt_len=at)
  call_ms = {"verify": float(np.median([1e3 * verify()
                                        for _ in range(args.repeats)])),
             "draft steps": draft_steps_ms(dparams, dcfg, k - 1, at,
                                           args.repeats)}
  floors = {
      "prefill": gemm_floor_ms(params, cfg, p + k, k + 1, args.repeats),
      "draft prompt": gemm_floor_ms(dparams, dcfg, p, 1, args.repeats),
      "draft step": gemm_floor_ms(dparams, dcfg, 1, 1, args.repeats),
      "verify": gemm_floor_ms(params, cfg, k, k, args.repeats),
      "fixed": gemm_floor_ms(params, cfg, SHORT_PROMPT, 1, args.repeats)
               + gemm_floor_ms(params, cfg, 1, 1, args.repeats)}
  per_prompt = {name: 1e3 * timed[name][1] / r for name in timed}
  loop_calls = (int(np.asarray(out.num_calls).sum())
                - int(np.asarray(timed["prefill"][3].num_calls).sum())) / r
  return {"model": args.model, "note": note, "block_size": k,
          "new_tokens": n, "prompt_len": p, "num_prompts": r,
          "repeats": args.repeats, "per_prompt_ms": per_prompt,
          "tokens_per_call": float(np.asarray(out.lengths).sum()
                                   / np.asarray(out.num_calls).sum()),
          "loop_calls_per_prompt": loop_calls, "call_ms": call_ms,
          "after_full_collection_ms": {
              name: 1e3 * float(np.median(t)) / (1 if name == "collection"
                                                  else r)
              for name, t in collected.items()},
          "floor_ms": floors}


def budget(m: dict) -> list[dict]:
  """Rows {part, ms, floor_ms (or None), of_decode} per prompt: the split
  and its floors (module doc)."""
  k, pp, f, c = m["block_size"], m["per_prompt_ms"], m["floor_ms"], m["call_ms"]
  calls = m["loop_calls_per_prompt"]
  loop = pp["decode"] - pp["prefill"]
  per_call = loop / calls if calls else 0.0
  call_floor = f["verify"] + (k - 1) * f["draft step"]
  prefill_floor = f["prefill"] + f["draft prompt"] + k * f["draft step"]
  rows = [("decode", pp["decode"], prefill_floor + calls * call_floor),
          ("prefill (decode of 1 token)", pp["prefill"], prefill_floor),
          (f"loop ({calls:.2f} calls)", loop, calls * call_floor),
          ("  per call", per_call, call_floor),
          (f"    verify ({k}-token target call)", c["verify"], f["verify"]),
          (f"    draft steps ({k - 1})", c["draft steps"],
           (k - 1) * f["draft step"]),
          ("    the rest", per_call - c["verify"] - c["draft steps"], None),
          ("fixed (8-token prompt, 1 token)", pp["fixed"], f["fixed"])]
  return [{"part": part, "ms": ms, "floor_ms": floor,
           "of_decode": ms / pp["decode"]} for part, ms, floor in rows]


def markdown(m: dict) -> str:
  lines = [
      "# A draft-model decode's time beside its weight-GEMM floor", "",
      f"Machine: {m['machine']}.", "", f"Command: `{m['command']}`.", "",
      f"{m['note']}; batch 1, greedy, prompt {m['prompt_len']}, "
      f"{m['new_tokens']} new tokens, block {m['block_size']}, "
      f"{m['num_prompts']} prompts one after another per pass, medians of "
      f"{m['repeats']} interleaved rounds. {m['tokens_per_call']:.2f} "
      f"tokens per call. Floor: the same rows through every weight matrix "
      "through the model's weight GEMMs and nothing else (`gemm_floor_ms`); "
      "x floor says how much of a part is anything but those GEMMs. The "
      "verification and the draft steps are timed alone after the decodes, "
      "so the rest carries their noise and can come out below zero.", "",
      "| part | ms per prompt | share of the decode | GEMM floor (ms) | "
      "x floor |", "|---|---|---|---|---|"]
  for r in m["rows"]:
    floor = r["floor_ms"]
    lines.append(f"| {r['part']} | {r['ms']:.2f} | {r['of_decode']:.0%} | "
                 + ("–" if floor is None else f"{floor:.2f}") + " | "
                 + ("–" if floor is None else f"{r['ms'] / floor:.2f}x")
                 + " |")
  after, pp = m["after_full_collection_ms"], m["per_prompt_ms"]
  lines += ["", "Timed right after a full collection of Python's heap "
            f"({after['collection']:.0f} ms here) before each pass, as "
            "`hf_peers.py`'s harness did before `hf_peers.frozen_gc`: the "
            f"decode {after['decode']:.2f} ms per prompt "
            f"({after['decode'] / pp['decode']:.2f}x), the 1-token decode "
            f"{after['prefill']:.2f} ({after['prefill'] / pp['prefill']:.2f}x)."]
  lines += ["", "## Reading", "", m["reading"], ""]
  return "\n".join(lines)


def reading(m: dict) -> str:
  rows = {r["part"].strip(): r for r in m["rows"]}
  decode = m["rows"][0]
  floor_share = decode["floor_ms"] / decode["ms"]
  return (f"The GEMMs alone would take {decode['floor_ms']:.1f} of the "
          f"{decode['ms']:.1f} ms per prompt ({floor_share:.0%}); the rest "
          "is attention, norms, cache writes, drafting logic and dispatch. "
          f"The prefill is {rows['prefill (decode of 1 token)']['of_decode']:.0%} "
          "of the decode; a decode call's fixed cost "
          f"{m['rows'][-1]['ms']:.2f} ms.")


def main(argv=None):
  args = parse_args(argv)
  load = os.getloadavg()[0]
  m = measure(args)
  m["rows"] = budget(m)
  m["reading"] = reading(m)
  out = metrics.write_results(args.out, m, markdown,
                              script="experiments/draft_model_budget.py",
                              argv=argv, load_before=load)
  for r in m["rows"]:
    print(f"  {r['part']:40s} {r['ms']:8.2f} ms  "
          + ("" if r["floor_ms"] is None else f"floor {r['floor_ms']:.2f}"))
  print(f"wrote {out}.json and .md")
  return m


if __name__ == "__main__":
  main()
