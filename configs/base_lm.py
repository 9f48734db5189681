r"""Base language model on the embedded corpus (head 1 only).

Launch (from the repository root):

  blockdec train --config configs/base_lm.py:cpu
  blockdec train --config configs/base_lm.py:demo --config.steps=800
  python -m blockdec.cli train --config configs/base_lm.py --config.data.corpus=stdlib,~/src

Presets (the argument after ":"):
  tiny  seconds; for tests and smoke runs.
  cpu   a few minutes on 2 CPU cores: a small byte model.
  demo  the `make demo` base model (~9 minutes on 2 CPU cores).
  mid   d = 384, 6 layers: more weights than a CPU's last-level cache
        (under an hour on 2 CPU cores).
  gpu   (default) a larger byte model for one accelerator.

Every field is documented in blockdec/training/defaults.py; the ones set here
are commented where they are set. The run lands in
cache/<name>-<config hash>/ unless --config.workdir is given.
"""

from blockdec.training.defaults import default_config

# preset: (d_model, n_layers, n_heads, seq_len, batch_size, steps, lr, warmup)
_PRESETS = {
    "tiny": (32, 1, 2, 32, 4, 4, 3e-3, 1),
    "cpu": (128, 2, 4, 128, 16, 300, 3e-3, 30),
    "demo": (256, 4, 4, 256, 16, 400, 2e-3, 40),
    # 54 MB of float32 weights: past a 32 MB last-level cache, so a greedy
    # step is memory-bound on CPU as on accelerators (experiments/
    # step_costs.py); under an hour on 2 CPU cores.
    "mid": (384, 6, 6, 256, 16, 600, 1.5e-3, 60),
    "gpu": (512, 8, 8, 512, 64, 20000, 1e-3, 1000),
}


def get_config(arg="gpu"):
  arg = arg or "gpu"
  if arg not in _PRESETS:
    raise ValueError(f"base_lm preset {arg!r} unknown; allowed: {tuple(_PRESETS)}.")
  d, layers, heads, seq_len, batch, steps, lr, warmup = _PRESETS[arg]
  c = default_config()
  c.name = f"base_lm_{arg}"  # Run folder prefix.
  c.regime = "base"          # Train the whole model on the next-token loss.
  c.model.vocab_size = 0     # From the tokenizer (256 for bytes).
  c.model.d_model = d        # Residual width.
  c.model.n_layers = layers  # Transformer blocks.
  c.model.n_heads = heads    # Attention heads.
  c.model.max_seq_len = 2 * seq_len  # Room for prompt + continuation when decoding.
  c.model.num_prediction_heads = 1   # Heads are added by the head configs.
  c.data.corpus = "stdlib"   # The interpreter's standard library.
  c.data.tokenizer = "bytes"  # Byte-level: vocab 256, no training needed.
  c.data.seq_len = seq_len   # Training context.
  c.batch_size = batch       # Sequences per step.
  c.steps = steps            # Optimizer steps.
  c.optim.learning_rate = lr  # Peak AdamW learning rate.
  c.optim.warmup_steps = warmup  # Linear warmup steps.
  c.eval_every = max(steps // 4, 1)  # Four held-out evaluations per run.
  c.checkpoint_every = max(steps // 10, 1)  # Ten checkpoints per run.
  c.log_every = max(min(10, steps // 20), 1)  # ~20+ metric rows per run.
  if arg == "tiny":
    c.data.eval_batches = 1  # One held-out batch.
    c.diagnostics.num_prompts = 0  # No per-head diagnostics.
  return c
