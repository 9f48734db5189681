r"""An EAGLE-style drafter on a frozen base LM (Li et al. 2024).

One decoder layer (`model.eagle_layers`) learns to predict the trunk's next
final hidden state from the current one and the next token's embedding
(blockdec/training/eagle.py: feature loss plus the cross-entropy of the
base's own next-token distribution, inputs jittered with noise, and a
second pass on its own predictions). Only params["eagle"] trains: the trunk
and head 1 stay bit-for-bit the base's, so `blockdec.Eagle(block_size=k)`
decodes exactly the base's greedy text (and samples losslessly).

Launch (from the repository root):

  blockdec train --config configs/eagle.py:demo
  blockdec train --config configs/eagle.py:demo_distill   # on the base's greedy text
  blockdec train --config configs/eagle.py:demo --config.init_from=path/to/base_run
  blockdec decode --checkpoint cache/eagle_demo-<hash> --method=eagle --block_size=8

With `init_from` empty, the base LM of the same preset (configs/base_lm.py)
is trained first, or reused from the cache. The summary reports the
drafter's held-out top-1 agreement with the base per pass and greedy
tokens per call at k = 4 and 8 (`eagle_tokens_per_call`).

Presets (the argument after ":"; add "_distill", e.g. "demo_distill", to
train on the base's own greedy continuations of corpus prefixes, regime
"eagle_distill", instead of on the corpus text: the text the drafter will
draft when decoding greedily):
  tiny  seconds; for tests and smoke runs.
  cpu   minutes on 2 CPU cores, for the cpu base.
  demo  the drafter for the `make demo` base (~15 minutes on 2 CPU cores).
  mid   the drafter for the memory-bound configs/base_lm.py:mid base.
  gpt2_tiny  the drafter for the tiny GPT-2 (configs/gpt2_tiny.py, BPE).
  gpu   (default) for the gpu base.

Every field is documented in blockdec/training/defaults.py; the ones set here
are commented where they are set.
"""

import pathlib

import ml_collections

from blockdec.training.defaults import default_config
from blockdec.training.pipeline import load_config

# (steps, learning rate, batch size)
_PRESETS = {
    "tiny": (3, 3e-3, 4),
    "cpu": (300, 3e-3, 16),
    "demo": (600, 3e-3, 16),
    "mid": (300, 3e-3, 16),  # ~4.5 s a step alone on 2 cores.
    "gpt2_tiny": (600, 3e-3, 16),
    "gpu": (5000, 1e-3, 64),
}


def get_config(arg="gpu"):
  arg = arg or "gpu"
  distill = arg.endswith("_distill")
  preset = arg[:-len("_distill")] if distill else arg
  if preset not in _PRESETS:
    raise ValueError(f"eagle preset {arg!r} unknown; allowed: "
                     f"{tuple(_PRESETS)}, each optionally + '_distill'.")
  steps, lr, batch = _PRESETS[preset]
  here = pathlib.Path(__file__)
  base = (load_config(here.with_name("gpt2_tiny.py")) if preset == "gpt2_tiny"
          else load_config(here.with_name("base_lm.py"), preset))
  c = default_config()
  c.name = f"eagle_{arg}"      # Run folder prefix.
  # Only params["eagle"] trains; on corpus text, or the base's greedy text.
  c.regime = "eagle_distill" if distill else "eagle"
  c.base = base                # Trained first (or reused) when init_from is "".
  c.init_from = ""             # Or a base checkpoint folder.
  c.model = {"eagle_layers": 1}  # Decoder layers of the drafter.
  c.eagle = ml_collections.ConfigDict(dict(
      feature_weight=1.0,      # Feature (smooth L1) loss beside the token loss.
      noise=0.1,               # Half-width of the uniform input noise.
      unroll=2,                # 2: also train on its own first predictions.
  ))
  c.data = base.data.copy_and_resolve_references()  # Same corpus and seq_len.
  c.batch_size = batch         # Sequences per step.
  c.steps = steps              # Optimizer steps.
  c.optim.learning_rate = lr   # Peak AdamW learning rate.
  c.optim.warmup_steps = max(steps // 10, 1)  # Linear warmup.
  c.eval_every = max(steps // 3, 1)  # Three held-out evaluations.
  c.checkpoint_every = max(steps // 6, 1)  # Six checkpoints.
  c.log_every = max(min(10, steps // 20), 1)  # ~20+ metric rows.
  c.diagnostics.num_prompts = 16  # Held-out prompts for tokens per call...
  c.diagnostics.new_tokens = 64   # ... of 64 greedy tokens each.
  # "_distill": the defaults' distillation data (configs/heads_distill.py
  # uses the same, so the cached continuations are shared).
  if preset == "gpt2_tiny":
    # As for its heads (experiments/gpt2_tiny.py): on 512 continuations a
    # drafter this size memorises them.
    c.distill.num_sequences = 2048
  if preset == "tiny":
    c.data.eval_batches = 1        # One held-out batch.
    c.diagnostics.num_prompts = 2  # Tokens per call on 2 prompts...
    c.diagnostics.new_tokens = 8   # ... of 8 greedy tokens each.
    c.distill.num_sequences = 8    # Distillation rows ("_distill").
    c.distill.prefix_len = 8       # Corpus tokens before each continuation.
    c.distill.new_tokens = 16      # Generated target tokens per row.
    c.distill.batch_size = 4       # Rows per generation call.
  return c
