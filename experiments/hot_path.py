r"""Hot-path check: greedy and blockwise tokens/s of this tree vs a git revision.

    python experiments/hot_path.py --baseline=HEAD~1 [--repeats=5 --rounds=3]

Checks the baseline revision out into a temporary git worktree and times the
`make demo` model (configs/heads_frozen.py:demo, from the cache; trained if
missing) in both trees with the same interpreter: greedy and blockwise
(k = 8, Exact) at batch 1 and 8 on held-out stdlib prompts, 64 new tokens.
The two trees run in alternating child processes (baseline, current,
baseline, ...) for `--rounds` rounds, so a change of machine speed hits both
alike; each child reports the median of `--repeats` timed runs after a
warm-up, and the result per tree is the median over rounds. Writes
experiments/results/hot_path.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from blockdec import metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"

# Runs in a child with the tree under test first on sys.path; prints JSON.
CHILD = r"""
import json, sys, time
import jax, numpy as np
import blockdec
from blockdec.training import data, pipeline, train
cache_dir, repeats, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
config = pipeline.load_config("configs/heads_frozen.py:demo")
run = pipeline.train_or_load(config, cache_dir)
splits = data.split_corpus(data.load_corpus(config.data.corpus),
                           config.data.valid_fraction, config.data.test_fraction)
texts = data.heldout_prompts(splits["test"], 8, min_bytes=128, max_bytes=192)
room = run.cfg.max_seq_len - new_tokens
out = {"blockdec": blockdec.__file__}
for batch in (1, 8):
  prompts, lengths = train.pad_prompts(
      [run.tokenizer.encode(t)[-room:] for t in texts[:batch]])
  for name, fn in (
      ("greedy", lambda: blockdec.greedy_decode(
          run.params, run.cfg, prompts, lengths, max_new_tokens=new_tokens)),
      ("blockwise", lambda: blockdec.blockwise_decode(
          run.params, run.cfg, prompts, lengths, max_new_tokens=new_tokens,
          block_size=8))):
    result = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      result = jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
    tokens = int(np.asarray(result.lengths).sum())
    out[f"{name}_b{batch}"] = {
        "tokens_per_s": tokens / float(np.median(times)),
        "tokens": tokens, "calls": int(np.asarray(result.num_calls).sum()),
        "checksum": int(np.asarray(result.tokens).sum())}
print("RESULT " + json.dumps(out))
"""


def _child(tree: pathlib.Path, cache_dir: str, repeats: int, new_tokens: int):
  env = dict(os.environ, PYTHONPATH=str(tree))
  proc = subprocess.run(
      [sys.executable, "-c", CHILD, cache_dir, str(repeats), str(new_tokens)],
      cwd=tree, env=env, capture_output=True, text=True, check=False)
  line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")),
              None)
  if proc.returncode or line is None:
    raise RuntimeError(f"timing child in {tree} failed:\n{proc.stderr[-4000:]}")
  return json.loads(line[len("RESULT "):])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--baseline", default="HEAD~1")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--cache_dir", default=str(ROOT / "cache"))
  args = parser.parse_args()
  rev = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT,
                       capture_output=True, text=True, check=True).stdout.strip()
  with tempfile.TemporaryDirectory() as tmp:
    base_tree = pathlib.Path(tmp) / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), rev],
                   cwd=ROOT, check=True, capture_output=True)
    try:
      runs = {"baseline": [], "current": []}
      for r in range(args.rounds):
        for name, tree in (("baseline", base_tree), ("current", ROOT)):
          print(f"round {r + 1}/{args.rounds}: {name}", flush=True)
          runs[name].append(_child(tree, args.cache_dir, args.repeats,
                                   args.new_tokens))
    finally:
      subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)],
                     cwd=ROOT, check=False, capture_output=True)
  rows = []
  for key in ("greedy_b1", "blockwise_b1", "greedy_b8", "blockwise_b8"):
    base = statistics.median(x[key]["tokens_per_s"] for x in runs["baseline"])
    cur = statistics.median(x[key]["tokens_per_s"] for x in runs["current"])
    same = (runs["baseline"][0][key]["checksum"]
            == runs["current"][0][key]["checksum"]
            and runs["baseline"][0][key]["calls"]
            == runs["current"][0][key]["calls"])
    method, batch = key.split("_b")
    rows.append({"method": method, "batch": int(batch),
                 "baseline_tokens_per_s": base, "current_tokens_per_s": cur,
                 "ratio": cur / base, "same_tokens_and_calls": same})
  result = {"machine": metrics.machine_description(), "baseline": rev,
            "command": "python experiments/hot_path.py " + " ".join(sys.argv[1:]),
            "load_1min": os.getloadavg()[0], "rounds": args.rounds,
            "repeats": args.repeats, "new_tokens": args.new_tokens,
            "model": "configs/heads_frozen.py:demo", "rows": rows,
            "raw": runs}
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "hot_path.json").write_text(json.dumps(result, indent=2) + "\n")
  lines = [
      f"# Hot path: this tree vs {rev}", "",
      f"Machine: {result['machine']}; load {result['load_1min']:.1f} (1-min "
      f"average at the end); `{result['command']}`.", "",
      f"`make demo` model, held-out stdlib prompts, {args.new_tokens} new "
      f"tokens, k = 8 Exact. Each tree timed in {args.rounds} alternating "
      f"child processes, median of {args.repeats} runs each, median over "
      "rounds.", "",
      "| method | batch | baseline tokens/s | current tokens/s | current / "
      "baseline | same tokens and calls |", "|---|---|---|---|---|---|"]
  for row in rows:
    lines.append(f"| {row['method']} | {row['batch']} | "
                 f"{row['baseline_tokens_per_s']:.0f} | "
                 f"{row['current_tokens_per_s']:.0f} | {row['ratio']:.3f} | "
                 f"{row['same_tokens_and_calls']} |")
  (RESULTS / "hot_path.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
