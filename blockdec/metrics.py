"""Decoding metrics shared by the demo, the CLI and the benchmarks.

Degenerate continuations. A weakly trained model's greedy output often falls
into whitespace runs or short loops ("        \\n        \\n..." or
"self.self.self."), which every proposal head predicts easily and which
therefore inflate block efficiency. We call a continuation DEGENERATE when,
over its UTF-8 bytes,

  * the distinct-4-gram ratio (distinct byte 4-grams / all byte 4-grams) is
    below 0.5 (loops repeat the same 4-grams), or
  * more than 50% of the bytes are whitespace (space, tab, newline, CR, FF, VT).

Ordinary code mostly passes: 128-byte windows of held-out stdlib code have a
median distinct-4-gram ratio of 0.77 and 25% whitespace, and about 11% of them
are flagged (codec tables, deeply indented blocks), so report the share of the
reference text beside the model's. Continuations shorter than 8 bytes are
judged by the whitespace rule alone.

Every block-efficiency figure should be reported over all rows and over the
non-degenerate rows, with the degenerate share beside it.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import sys
from typing import Callable

import numpy as np

MIN_DISTINCT_4GRAM_RATIO = 0.5
MAX_WHITESPACE_SHARE = 0.5
_WHITESPACE = np.array([ord(c) for c in " \t\n\r\x0b\x0c"], np.int64)


def _as_bytes(data) -> np.ndarray:
  if isinstance(data, str):
    data = data.encode("utf-8")
  if isinstance(data, (bytes, bytearray)):
    return np.frombuffer(bytes(data), np.uint8).astype(np.int64)
  return np.asarray(data, np.int64).reshape(-1)


def distinct_ngram_ratio(data, n: int = 4) -> float:
  """Distinct n-grams / n-grams of a byte sequence (1.0 when shorter than n)."""
  x = _as_bytes(data)
  if len(x) < n:
    return 1.0
  grams = np.lib.stride_tricks.sliding_window_view(x, n)
  keys = grams @ (256 ** np.arange(n, dtype=np.int64))
  return len(np.unique(keys)) / len(keys)


def whitespace_share(data) -> float:
  x = _as_bytes(data)
  return float(np.isin(x, _WHITESPACE).mean()) if len(x) else 0.0


def is_degenerate(data) -> bool:
  """True if a continuation is degenerate (module docstring).

  Args:
    data: the continuation as str, bytes, or byte values (e.g. the tokens of
      a byte-level model); decode other tokenizers' ids to text first.
  """
  x = _as_bytes(data)
  if whitespace_share(x) > MAX_WHITESPACE_SHARE:
    return True
  return len(x) >= 8 and distinct_ngram_ratio(x) < MIN_DISTINCT_4GRAM_RATIO


def block_efficiency(lengths, num_calls, rows=None) -> float:
  """Tokens per model call summed over `rows` (a bool mask; default all).

  NaN when the selected rows made no calls (e.g. no row selected).
  """
  lengths = np.asarray(lengths, np.float64)
  num_calls = np.asarray(num_calls, np.float64)
  if rows is not None:
    rows = np.asarray(rows, bool)
    lengths, num_calls = lengths[rows], num_calls[rows]
  calls = num_calls.sum()
  return float(lengths.sum() / calls) if calls else float("nan")


def machine_description(extra: str = "") -> str:
  """One line naming the machine for benchmark results: CPU model (from
  `lscpu` where available), core count, OS, jax version and backend."""
  import platform
  import subprocess

  import jax
  name = platform.processor() or platform.machine()
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True,
                         check=False).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        name = line.split(":", 1)[1].strip()
  except OSError:
    pass
  line = (f"{name}, {os.cpu_count()} cores, {platform.system()}, "
          f"jax {jax.__version__} backend={jax.default_backend()}")
  return f"{line}, {extra}" if extra else line


def write_results(out, result: dict, markdown: Callable[[dict], str], *,
                  script: str, argv, load_before: float) -> pathlib.Path:
  """Writes `result` plus the machine (with the 1-minute load average before
  and now) and the command (`script` and `argv`, sys.argv[1:] when None)
  to <out>.json, and `markdown` (a function of that dict) to <out>.md;
  returns the output prefix."""
  result.update(
      machine=machine_description(f"load average {load_before:.1f} before, "
                                  f"{os.getloadavg()[0]:.1f} after"),
      command=f"python {script} " + shlex.join(
          sys.argv[1:] if argv is None else argv))
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
  out.with_suffix(".md").write_text(markdown(result))
  return out
