r"""A small draft model for speculative decoding, distilled from a base LM.

The base LM of the same preset (configs/base_lm.py) greedily continues
`distill.num_sequences` prefixes of the training split (sequence-level
distillation, blockdec/training/distill.py; cached on disk next to the run);
a FRESH 1-2 layer model with the base's tokenizer, vocabulary and
max_seq_len learns those continuations on its next-token head (regime
"draft": all its parameters, head 1 only, loss on the continuation only).
The draft learns what the BASE says, not what the corpus says, which is what
speculative decoding accepts; `blockdec.DraftModel(cfg, params, block_size=k)`
then drafts k tokens per base call with it.

Launch (from the repository root):

  blockdec train --config configs/draft_model.py:demo
  blockdec train --config configs/draft_model.py:cpu --config.model.n_layers=2
  blockdec train --config configs/draft_model.py:demo --config.init_from=path/to/base_run
  blockdec train --config configs/draft_model.py:demo --config.distill.temperature=0.6

The last one distills the base's samples at temperature 0.6 instead of its
greedy text: a draft for decoding with `Sampling(temperature=0.6)`, whose
contexts are the base's samples (experiments/draft_policy.py
--draft_temperature=0.6 measures it).

With `init_from` empty, the base LM of the same preset is trained first or
reused from the cache (the `demo` preset drafts for the `make demo` base).
The summary reports `draft_agreement`: the share of held-out positions where
the draft's argmax is the base's next greedy token, and the tokens per base
call that exact speculative decoding would get at block sizes 4 and 8.

Presets (the argument after ":"):
  tiny  seconds; for tests and smoke runs.
  cpu   a few minutes on 2 CPU cores, for the cpu base.
  demo  the draft for the `make demo` base (minutes on 2 CPU cores).
  mid   the draft for the memory-bound configs/base_lm.py:mid base.
  gpu   (default) for the gpu base.

Every field is documented in blockdec/training/defaults.py; the ones set here
are commented where they are set.
"""

import pathlib

from blockdec.training.defaults import default_config
from blockdec.training.pipeline import load_config

_PRESETS = {
    "tiny": dict(d_model=16, n_layers=1, n_heads=2, num_sequences=8,
                 prefix_len=8, new_tokens=16, gen_batch=4, batch_size=4,
                 steps=3, lr=3e-3),
    "cpu": dict(d_model=128, n_layers=1, n_heads=4, num_sequences=512,
                prefix_len=32, new_tokens=96, gen_batch=128, batch_size=16,
                steps=600, lr=3e-3),
    "demo": dict(d_model=128, n_layers=1, n_heads=4, num_sequences=2048,
                 prefix_len=64, new_tokens=128, gen_batch=128, batch_size=16,
                 steps=1000, lr=3e-3),
    # The mid base costs ~3x the demo's per generated token: half the rows.
    "mid": dict(d_model=128, n_layers=1, n_heads=4, num_sequences=1024,
                prefix_len=64, new_tokens=128, gen_batch=128, batch_size=16,
                steps=1000, lr=3e-3),
    "gpu": dict(d_model=256, n_layers=2, n_heads=4, num_sequences=8192,
                prefix_len=64, new_tokens=256, gen_batch=256, batch_size=64,
                steps=5000, lr=1e-3),
}


def get_config(arg="gpu"):
  arg = arg or "gpu"
  if arg not in _PRESETS:
    raise ValueError(f"draft_model preset {arg!r} unknown; allowed: "
                     f"{tuple(_PRESETS)}.")
  p = _PRESETS[arg]
  base = load_config(pathlib.Path(__file__).with_name("base_lm.py"), arg)
  c = default_config()
  c.name = f"draft_model_{arg}"  # Run folder prefix.
  c.regime = "draft"           # Fresh model, head 1, on the base's greedy text.
  c.base = base                # The teacher: trained first (or reused).
  c.init_from = ""             # Or the base's checkpoint folder.
  c.model.vocab_size = 0       # 0: the base's (a draft must share it).
  c.model.max_seq_len = 0      # 0: the base's (decodes as far as the base).
  c.model.d_model = p["d_model"]  # Residual width.
  c.model.n_layers = p["n_layers"]  # Transformer blocks: few, for cheap drafts.
  c.model.n_heads = p["n_heads"]  # Attention heads.
  c.model.num_prediction_heads = 1  # A draft needs only its next-token head.
  c.data = base.data.copy_and_resolve_references()  # The base's corpus split.
  c.distill.num_sequences = p["num_sequences"]  # Base continuations (rows).
  c.distill.prefix_len = p["prefix_len"]  # Corpus tokens before each one.
  c.distill.new_tokens = p["new_tokens"]  # Base greedy tokens (the targets).
  c.distill.batch_size = p["gen_batch"]  # Rows per generation call.
  c.batch_size = p["batch_size"]  # Sequences per step.
  c.steps = p["steps"]         # Optimizer steps.
  c.optim.learning_rate = p["lr"]  # Peak AdamW learning rate.
  c.optim.warmup_steps = max(p["steps"] // 20, 1)  # Linear warmup.
  c.eval_every = max(p["steps"] // 4, 1)  # Four held-out evaluations.
  c.checkpoint_every = max(p["steps"] // 10, 1)  # Ten checkpoints.
  c.log_every = max(min(10, p["steps"] // 20), 1)  # ~20+ metric rows.
  c.diagnostics.num_prompts = 16  # Held-out prompts for draft_agreement...
  c.diagnostics.new_tokens = 64   # ... of 64 base greedy tokens each.
  if arg == "tiny":
    c.data.eval_batches = 1        # One held-out batch.
    c.diagnostics.num_prompts = 2  # Draft agreement on 2 prompts...
    c.diagnostics.new_tokens = 8   # ... of 8 greedy tokens each.
  return c
