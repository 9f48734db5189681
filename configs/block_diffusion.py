r"""Adapt a trained base LM to block diffusion (regime "block_diffusion").

The base LM of the same preset (configs/base_lm.py) gets a [MASK] token and
is fine-tuned, all of it, on the block-diffusion loss (blocks of
`diffusion.block_size`: masked positions predicted from the position before
them, attending to the clean text before the block and to the block both
ways, complementary masks) plus the plain autoregressive loss, in one
forward pass (blockdec/training/diffusion.py). The held-out loss reported is
the autoregressive one, comparable with the base's. Decode the result with
`blockdec.BlockDiffusion(block_size, threshold)`: block diffusion proper, or
with `acceptance=blockdec.Exact()` verified by the model itself in
autoregressive mode (its greedy output, token for token).

Launch (from the repository root):

  blockdec train --config configs/block_diffusion.py:demo_distill
  blockdec train --config configs/block_diffusion.py:demo
  blockdec train --config configs/block_diffusion.py:cpu --config.diffusion.block_size=4
  blockdec train --config configs/block_diffusion.py:demo --config.init_from=path/to/base_run

With `init_from` empty, the base LM of the same preset is trained first or
reused from the cache (`demo` adapts the `make demo` base).

Presets (the argument after ":"):
  tiny  seconds; for tests and smoke runs.
  cpu   a few minutes on 2 CPU cores, from the cpu base.
  demo  from the `make demo` base (~20-25 minutes on 2 CPU cores).
  gpu   (default) from the gpu base.
  <preset>_distill  the same, but the denoising loss is taken on the base's
        own greedy continuations (regime "block_diffusion_distill",
        `distill.*` below): every block then has one right answer, the
        base's, which the denoiser can learn to fill in parallel (Stern's
        sequence-level distillation, applied to the diffusion drafter). The
        AR loss stays on corpus rows (on the greedy text alone the model
        sharpened into it: held-out 2.50 nats/byte after 100 steps).
        demo_distill: ~40 minutes on 2 CPU cores (3 of them generating);
        held-out AR loss 1.371 against the base's 1.464, and 3.98 tokens per
        call self-speculatively at b = 8 where `demo` drafts 1.71
        (experiments/results/block_diffusion.md).

Every field is documented in blockdec/training/defaults.py, except
`diffusion`, documented here where it is set.
"""

import pathlib

import ml_collections

from blockdec.training.defaults import default_config
from blockdec.training.pipeline import load_config

# preset: (block_size, seq_len, batch_size, steps, lr); seq_len None: the
# base's. Each row is fed three times (clean + two noisy streams), so the
# demo preset trains on 128-token rows to keep a step near the base's cost.
_PRESETS = {
    "tiny": (4, None, 4, 3, 1e-3),
    "cpu": (8, None, 16, 300, 1e-3),
    "demo": (8, 128, 16, 300, 1e-3),
    "gpu": (16, None, 64, 5000, 3e-4),
}
# <preset>_distill: (distilled continuations, batch, steps); rows are the
# distill rows (prefix_len + new_tokens tokens), so demo_distill feeds 8 rows
# of 256 where demo feeds 16 of 128.
_DISTILL = {
    "tiny": (8, 4, 3),
    "cpu": (512, 16, 300),
    "demo": (2048, 8, 800),
    "gpu": (16384, 64, 5000),
}


def get_config(arg="gpu"):
  arg = arg or "gpu"
  distill = arg.endswith("_distill")
  preset = arg[:-len("_distill")] if distill else arg
  if preset not in _PRESETS:
    allowed = tuple(_PRESETS) + tuple(f"{p}_distill" for p in _PRESETS)
    raise ValueError(f"block_diffusion preset {arg!r} unknown; allowed: "
                     f"{allowed}.")
  block_size, seq_len, batch, steps, lr = _PRESETS[preset]
  base = load_config(pathlib.Path(__file__).with_name("base_lm.py"), preset)
  c = default_config()
  c.name = f"block_diffusion_{arg}"  # Run folder prefix.
  c.regime = "block_diffusion"  # Base + [MASK], all weights, both losses.
  if distill:
    c.regime = "block_diffusion_distill"  # ... on the base's greedy text.
    c.distill.num_sequences, batch, steps = _DISTILL[preset]
    if preset == "tiny":
      c.distill.prefix_len = 8   # Corpus tokens before each continuation.
      c.distill.new_tokens = 16  # Generated target tokens per row.
      c.distill.batch_size = 4   # Rows per generation call.
  c.base = base                 # Trained first (or reused) from base_lm.py.
  c.init_from = ""              # Or the base's checkpoint folder.
  c.data = base.data.copy_and_resolve_references()  # The base's corpus split.
  if seq_len:
    c.data.seq_len = seq_len  # Tokens per training row (inputs).
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.block_size = block_size  # Tokens per training block.
  c.diffusion.ar_weight = 1.0  # Autoregressive loss weight (keeps it an LM).
  c.batch_size = batch          # Sequences per step (each fed 3 times).
  c.steps = steps               # Optimizer steps.
  c.optim.learning_rate = lr    # Peak AdamW learning rate (fine-tuning).
  c.optim.warmup_steps = max(steps // 20, 1)  # Linear warmup.
  c.eval_every = max(steps // 4, 1)  # Four held-out evaluations.
  c.checkpoint_every = max(steps // 10, 1)  # Ten checkpoints.
  c.log_every = max(min(10, steps // 20), 1)  # ~20+ metric rows.
  c.diagnostics.num_prompts = 0  # No head diagnostics (one head).
  if preset == "tiny":
    c.data.eval_batches = 1  # One held-out batch.
  return c
