r"""Proposal heads 2..k on a frozen base LM (Stern sec. 4, "frozen").

Only params["proposal_heads"] train, on the mean of the heads' losses; the
trunk and head 1 stay bit-for-bit unchanged, so exact blockwise decoding
reproduces the base model's greedy output.

Launch (from the repository root):

  blockdec train --config configs/heads_frozen.py:cpu
  blockdec train --config configs/heads_frozen.py:demo --config.init_from=path/to/base_run

With `init_from` empty, the base LM of the same preset (configs/base_lm.py)
is trained first, or reused from the cache. Presets: tiny, cpu, demo, mid,
gpu.
"""

import pathlib

from blockdec.training.defaults import default_config
from blockdec.training.pipeline import load_config

# preset: (k, steps, lr, batch_size)
_PRESETS = {
    "tiny": (4, 3, 3e-3, 4),
    "cpu": (8, 150, 3e-3, 16),
    "demo": (8, 250, 3e-3, 16),
    "mid": (8, 250, 3e-3, 16),
    "gpu": (8, 5000, 1e-3, 64),
}


def heads_config(arg, regime):
  """Shared by the head configs: a base LM preset plus a head regime."""
  arg = arg or "gpu"
  if arg not in _PRESETS:
    raise ValueError(f"heads preset {arg!r} unknown; allowed: {tuple(_PRESETS)}.")
  k, steps, lr, batch = _PRESETS[arg]
  base = load_config(pathlib.Path(__file__).with_name("base_lm.py"), arg)
  c = default_config()
  c.name = f"heads_{regime}_{arg}"  # Run folder prefix.
  c.regime = regime            # Which parameters train, on which targets.
  c.base = base                # Trained first (or reused) when init_from is "".
  c.init_from = ""             # Or a base checkpoint folder.
  c.model = {"num_prediction_heads": k,  # k, head 1 included.
             "head_hidden": 0}  # Head FFN width; 0: d_model.
  c.data = base.data.copy_and_resolve_references()  # Same corpus and seq_len.
  c.batch_size = batch         # Sequences per step.
  c.steps = steps              # Optimizer steps.
  c.optim.learning_rate = lr   # Peak AdamW learning rate.
  c.optim.warmup_steps = max(steps // 10, 1)  # Linear warmup.
  c.eval_every = max(steps // 2, 1)  # Two held-out evaluations.
  c.checkpoint_every = max(steps // 5, 1)  # Five checkpoints.
  c.log_every = max(min(10, steps // 20), 1)  # ~20+ metric rows.
  if arg == "tiny":
    c.data.eval_batches = 1        # One held-out batch.
    c.diagnostics.num_prompts = 2  # Per-head agreement on 2 prompts...
    c.diagnostics.new_tokens = 8   # ... of 8 greedy tokens each.
    c.distill.num_sequences = 8    # Distillation rows (distill regimes).
    c.distill.prefix_len = 8       # Corpus tokens before each continuation.
    c.distill.new_tokens = 16      # Generated target tokens per row.
    c.distill.batch_size = 4       # Rows per generation call.
  elif arg == "cpu":
    c.distill.num_sequences = 256  # Distillation rows (distill regimes).
    c.distill.prefix_len = 64      # Corpus tokens before each continuation.
    c.distill.new_tokens = 64      # Generated target tokens per row.
  return c


def get_config(arg="gpu"):
  return heads_config(arg, "frozen")
