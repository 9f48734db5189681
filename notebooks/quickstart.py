# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # blockdec quickstart: blockwise parallel decoding in one notebook
#
# blockdec makes greedy decoding faster without changing what the model says:
# extra heads propose a block of the next k tokens, one model call verifies
# the whole block, and the longest prefix the model agrees with is kept
# (Stern, Shazeer & Uszkoreit, NeurIPS 2018).
#
# This notebook trains a small byte-level language model with frozen proposal
# heads on the Python standard library (or reuses the `make demo` model when
# `cache/` has it), decodes a prompt greedily and blockwise, compares speed and
# block efficiency, and plots how many tokens each model call accepted.
#
# The source of truth is `notebooks/quickstart.py` (jupytext, percent format);
# `notebooks/quickstart.ipynb` is generated from it and `make test` executes it.

# %% [markdown]
# ## Install
#
# In Colab: the cell below clones the repository (set `REPO_URL` to your
# clone's address) and installs it with `pip install -e .`. On a machine where
# blockdec is already importable (a local `.venv`, CI) it does nothing.
#
# **Colab TPU runtime** (Runtime > Change runtime type > TPU): Colab's TPU
# image usually ships a TPU-enabled jax. If `jax.devices()` below lists only
# CPU devices, set `INSTALL_JAX_TPU = True`, rerun the cell, then restart the
# runtime (`pip install "jax[tpu]"`). GPU runtimes need `jax[cuda12]` instead;
# on CPU nothing extra is needed. If pip reports that it changed a package
# Colab had already imported (numpy, say), restart the runtime and run the
# notebook again: the cell then finds blockdec installed and skips the install.

# %%
import importlib.util
import os
import subprocess
import sys

REPO_URL = os.environ.get("BLOCKDEC_REPO_URL", "")  # e.g. your fork's git URL.
CLONE_DIR = "/content/blockdec"                      # Where Colab clones it.
INSTALL_JAX_TPU = False                              # See the note above.

if importlib.util.find_spec("blockdec") is None:
  if not os.path.isdir(CLONE_DIR):
    if not REPO_URL:
      raise RuntimeError("blockdec is not installed: set REPO_URL to the git "
                         "URL of a blockdec clone (or upload the repository to "
                         f"{CLONE_DIR}) and rerun this cell.")
    subprocess.run(["git", "clone", "-q", REPO_URL, CLONE_DIR], check=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", CLONE_DIR],
                 check=True)
  sys.path.insert(0, CLONE_DIR)  # The editable install is seen after a restart.
if INSTALL_JAX_TPU:  # blockdec supports jax < 0.13.
  subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                  "jax[tpu]>=0.7,<0.13"], check=True)
if os.path.isdir(CLONE_DIR):
  os.chdir(CLONE_DIR)            # cache/ (the demo model) is in the clone.
print("blockdec from", os.path.dirname(importlib.util.find_spec("blockdec").origin))

# %% [markdown]
# ## Parameters
#
# `QUICK` (environment variable `BLOCKDEC_NOTEBOOK_QUICK=1`, set by the tests)
# picks the `tiny` presets so the whole notebook runs in seconds; the default
# trains the `cpu` presets (a few minutes on two CPU cores). Either way, a
# finished `make demo` model in `CACHE_DIR` is reused instead. The cell is
# tagged `parameters`, so papermill can override it too.

# %% tags=["parameters"]
QUICK = os.environ.get("BLOCKDEC_NOTEBOOK_QUICK", "0") == "1"
CACHE_DIR = os.environ.get("BLOCKDEC_CACHE", "cache")  # Trained runs live here.
PRESET = "tiny" if QUICK else "cpu"  # configs/heads_frozen.py preset to train.
NUM_PROMPTS = 4 if QUICK else 16     # Held-out prompts decoded in one batch.
NEW_TOKENS = 16 if QUICK else 64     # Tokens generated per prompt.
REPEATS = 1 if QUICK else 3          # Timed runs after one warm-up (median).
PROMPT = "def fibonacci(n):\n"       # The prompt shown side by side.

# %%
import time

import jax
import matplotlib.pyplot as plt
import numpy as np

import blockdec
from blockdec import metrics
from blockdec.training import data, pipeline

print("jax", jax.__version__, "devices:", jax.devices())

# %% [markdown]
# ## Train, or load the demo model
#
# `pipeline.train_or_load` trains a config unless `CACHE_DIR` already holds a
# finished run of exactly that config. A head config (here: k proposal heads
# trained on a frozen base LM) first trains or reuses its base LM. The same
# runs come from the command line:
# `blockdec train --config configs/heads_frozen.py:cpu`.

# %%
demo_config = pipeline.load_config("configs/heads_frozen.py:demo")
if pipeline.is_finished(pipeline.run_dir(demo_config, CACHE_DIR)):
  config = demo_config  # `make demo` already trained it: only load.
else:
  config = pipeline.load_config(f"configs/heads_frozen.py:{PRESET}")
run = pipeline.train_or_load(config, CACHE_DIR, progress=not QUICK)
cfg, params, tokenizer = run.cfg, run.params, run.tokenizer
k = cfg.num_prediction_heads
print(f"{config.name}: {cfg.n_layers} layers, d_model={cfg.d_model}, "
      f"k={k} heads (head 1 = the base LM), vocabulary {cfg.vocab_size}")
print(f"held-out loss {run.summary['valid']['nats_per_byte']:.3f} nats/byte")
if "head_agreement" in run.summary:
  print("head agreement with greedy (heads 1..k):",
        " ".join(f"{a:.2f}" for a in run.summary["head_agreement"]))

# %% [markdown]
# Any model works the same way: `blockdec.load_checkpoint(run.workdir)` reloads
# this one, and `blockdec.load_hf_checkpoint(path)` imports a GPT-2 or Llama
# family safetensors checkpoint.
#
# ## Decode: greedy and blockwise
#
# One batch: `PROMPT` plus prompts cut from the corpus's held-out test split,
# right-padded into `prompts` int32 [B, P] with `lengths` int32 [B]. Exact
# blockwise decoding returns the same tokens as greedy decoding; it only needs
# fewer model calls when the heads guess right. Each decode runs once to
# compile, then `REPEATS` timed times.

# %%
def encode_batch(texts, room):
  """Texts -> right-padded prompts int32 [B, P] and lengths int32 [B].

  Each prompt keeps its last `room` tokens, so prompt + continuation fits in
  the model's max_seq_len.
  """
  ids = [tokenizer.encode(t)[-room:] for t in texts]
  lengths = np.array([len(x) for x in ids], np.int32)
  prompts = np.zeros((len(ids), lengths.max()), np.int32)
  for row, x in enumerate(ids):
    prompts[row, :len(x)] = x
  return prompts, lengths


def continuations(out):
  """DecodeOutput -> one decoded string per row."""
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  return [tokenizer.decode(row[:n]) for row, n in zip(tokens, lengths)]


def timed(decode):
  """(output, median seconds): one warm-up call compiles, then REPEATS runs."""
  out = jax.block_until_ready(decode())
  seconds = []
  for _ in range(REPEATS):
    start = time.perf_counter()
    out = jax.block_until_ready(decode())
    seconds.append(time.perf_counter() - start)
  return out, float(np.median(seconds))


room = cfg.max_seq_len - NEW_TOKENS
splits = data.split_corpus(data.load_corpus(config.data.corpus))
texts = [PROMPT] + data.heldout_prompts(
    splits["test"] or splits["valid"], NUM_PROMPTS - 1,
    min_bytes=min(64, room), max_bytes=max(room, 128))
prompts, lengths = encode_batch(texts, room)

greedy, t_greedy = timed(lambda: blockdec.greedy_decode(
    params, cfg, prompts, lengths, max_new_tokens=NEW_TOKENS))
block, t_block = timed(lambda: blockdec.blockwise_decode(
    params, cfg, prompts, lengths, max_new_tokens=NEW_TOKENS, block_size=k,
    acceptance=blockdec.Exact()))

print("greedy:   ", repr(PROMPT + continuations(greedy)[0]))
print("blockwise:", repr(PROMPT + continuations(block)[0]))
print(f"model calls after prefill for this prompt: greedy "
      f"{int(greedy.num_calls[0])}, blockwise {int(block.num_calls[0])}")
print("identical to greedy:", np.array_equal(greedy.tokens, block.tokens))

# %% [markdown]
# ## Speed and block efficiency
#
# Block efficiency (Stern's mean accepted block size) is tokens per model
# call. A weak model's output often degenerates into whitespace runs and loops
# that every head predicts, which inflates block efficiency, so it is also
# given over the non-degenerate rows (`blockdec.metrics.is_degenerate`).

# %%
degenerate = np.array([metrics.is_degenerate(t) for t in continuations(block)])
n_greedy, n_block = int(np.sum(greedy.lengths)), int(np.sum(block.lengths))
print(f"{len(texts)} prompts x {NEW_TOKENS} new tokens, block size k={k}")
print(f"greedy     {n_greedy / t_greedy:8.0f} tokens/s")
print(f"blockwise  {n_block / t_block:8.0f} tokens/s   "
      f"speedup {t_greedy / t_block:.2f}x")
print(f"block efficiency {float(block.block_efficiency):.2f} over all rows; "
      f"degenerate share {degenerate.mean():.0%}")
if not degenerate.all():
  print("block efficiency over non-degenerate rows: "
        f"{metrics.block_efficiency(block.lengths, block.num_calls, ~degenerate):.2f}")

# %% [markdown]
# ## Accepted block lengths
#
# `out.accepted_hist[b, a - 1]` counts the model calls of row b that accepted
# a tokens. Calls accepting 1 token did no better than greedy; calls accepting
# k saved k - 1 calls.

# %%
# %matplotlib inline
hist = np.asarray(block.accepted_hist)  # [B, k]
sizes = np.arange(1, k + 1)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.bar(sizes, hist[~degenerate].sum(0), label="non-degenerate rows")
ax.bar(sizes, hist[degenerate].sum(0), bottom=hist[~degenerate].sum(0),
       label="degenerate rows", color="lightgray")
ax.set_xticks(sizes)
ax.set_xlabel("tokens accepted per model call")
ax.set_ylabel("model calls")
ax.set_title(f"{config.name}: block efficiency "
             f"{float(block.block_efficiency):.2f} with k={k}")
ax.legend()
plt.show()

# %% [markdown]
# ## Where next
#
# - Approximate acceptance trades exactness for longer blocks:
#   `acceptance=blockdec.TopK(2)`, `blockdec.Distance(eps)`,
#   `blockdec.MinBlock(l)` (Stern sec. 5).
# - Bigger runs: `blockdec train --config configs/heads_frozen.py:gpu`; other
#   head regimes in `configs/heads_finetune.py` and `configs/heads_distill.py`.
# - The README maps the library and shows how to add an acceptance rule or a
#   draft source.
