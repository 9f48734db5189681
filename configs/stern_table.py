r"""Reproducing Stern et al. (2018) Table 1 on the embedded corpus.

Trains (or reuses from the cache) one base LM and, on top of it, one k = 10
model per head regime of Stern's table; block sizes k = 2..10 use the first
k heads of that model (Stern trained one model per k). Then measures block
size, quality and wall-clock on held-out stdlib prompts.

Launch (from the repository root):

  python experiments/stern_table.py                       # preset cpu
  python experiments/stern_table.py --config=configs/stern_table.py:demo
  python experiments/stern_table.py --only=timing         # reuse checkpoints
  python experiments/stern_table.py --config.eval.num_prompts=16

Presets (the argument after ":"):
  cpu    (default; the published results) the cpu base LM (configs/
         base_lm.py:cpu: 2 layers, d=128) trained on 256-token windows, and
         k = 10 heads per regime at the cpu head presets: ~30 minutes on the
         shared 2-core CPU the first time, minutes once cached.
  demo   the `make demo` base LM (4 layers, d=256) and the demo head
         presets: the intended setting, ~2-3 hours of training on 2 busy
         CPU cores (fine for an idle machine or an accelerator).
  quick  tiny k = 4 models (k = 2, 4) and a few prompts: checks that every
         row is produced (CI, tests/test_stern_table.py).
"""

import pathlib

import ml_collections

from blockdec.training.pipeline import load_config

_CONFIGS = pathlib.Path(__file__).resolve().parent

# Stern's regime names -> (head config file, training regime).
# "both" = sequence-level distillation + fine-tuning: the fine-tuning config
# (its gentler learning rate) trained on the distillation data.
# The two fine-tuned regimes start from the trained heads of their frozen-trunk
# counterpart (FINETUNE_FROM) and move the trunk gently (FINETUNE_TRUNK_LR_SCALE,
# head 1 weighted to half of the loss). Fine-tuning all parameters from fresh
# heads at one learning rate wrecked head 1 on the demo model (held-out
# 1.46 -> 2.4 nats/byte in 60 steps) and with it every block.
REGIMES = {
    "regular": ("heads_frozen.py", "frozen"),
    "distillation": ("heads_distill.py", "distill"),
    "fine-tuning": ("heads_finetune.py", "finetune"),
    "both": ("heads_finetune.py", "distill_finetune"),
}

FINETUNE_FROM = {"fine-tuning": "regular", "both": "distillation"}
FINETUNE_TRUNK_LR_SCALE = 0.1

# Head training steps per regime for the "demo" preset.
_DEMO_HEAD_STEPS = {"regular": 100, "distillation": 100, "fine-tuning": 60,
                    "both": 60}

# preset: (model preset, k, prompts, prompt bytes, new tokens, timing prompts,
#          timing repeats)
_PRESETS = {
    "demo": ("demo", 10, 32, (128, 192), 128, 4, 3),
    "cpu": ("cpu", 10, 32, (128, 192), 128, 8, 3),
    "quick": ("tiny", 4, 8, (16, 32), 16, 1, 1),
}


def regime_config(preset: str, regime: str, k: int):
  """The training config of one regime's k-head model (base included)."""
  file, train_regime = REGIMES[regime]
  c = load_config(_CONFIGS / file, preset)
  c.regime = train_regime
  c.name = f"stern_{train_regime}_{preset}_k{k}"  # Run folder prefix.
  c.model.num_prediction_heads = k  # k heads, head 1 included.
  if regime in FINETUNE_FROM:
    # Initialised from that regime's run (trained or reused first): its base
    # trunk and trained heads.
    c.base = regime_config(preset, FINETUNE_FROM[regime], k)
    c.optim.trunk_lr_scale = FINETUNE_TRUNK_LR_SCALE
    c.first_head_weight = float(k - 1)  # Head 1 is half of the loss.
  if preset == "cpu":
    # The cpu base LM trained on 256-token windows, so that 192-byte prompts
    # + 128 new tokens stay inside the context it has seen.
    c.data.seq_len = 256
    if regime not in FINETUNE_FROM:  # Else c.base is a head run, set already.
      c.base.name = "base_lm_cpu_seq256"
      c.base.data.seq_len = 256
      c.base.model.max_seq_len = 512
  if preset == "demo":
    # Head training shortened to fit ~20 minutes on the shared 2-core CPU
    # (the demo head presets take 250 steps; fine-tuning costs ~3x a frozen
    # step because it back-propagates through the trunk).
    c.steps = _DEMO_HEAD_STEPS[regime]
    c.optim.warmup_steps = max(c.steps // 10, 1)
    c.eval_every = c.checkpoint_every = c.steps
    c.distill.num_sequences = 128  # Greedy continuations of the base model...
    c.distill.new_tokens = 128     # ... of 128 tokens after 64-token prefixes.
  if preset == "tiny":
    # CI: no intermediate checkpoints or head diagnostics, two steps.
    for run in (c, c.base):
      run.steps = run.checkpoint_every = run.eval_every = 2
      run.diagnostics.num_prompts = 0
  return c


def get_config(arg="cpu"):
  arg = arg or "cpu"
  if arg not in _PRESETS:
    raise ValueError(f"stern_table preset {arg!r} unknown; allowed: "
                     f"{tuple(_PRESETS)}.")
  model, k, prompts, prompt_bytes, new_tokens, t_prompts, repeats = \
      _PRESETS[arg]
  c = ml_collections.ConfigDict()
  c.preset = arg
  # One training config per regime; each holds the shared base LM config in
  # `.base`, so the base trains once (for "demo" it is the `make demo` one).
  c.train = ml_collections.ConfigDict(
      {name.replace("-", "_"): regime_config(model, name, k)
       for name in REGIMES})

  c.eval = ml_collections.ConfigDict()
  # k values: prefixes of the k-head model (CI: fewer, fewer compilations).
  c.eval.block_sizes = (2, 4, 6, 8, 10) if arg != "quick" else (2, 4)
  # Approximate acceptance rules (Stern sec. 5) measured at the largest k.
  c.eval.approximate = ("top2", "top3", "minblock2", "minblock3")
  c.eval.num_prompts = prompts     # Held-out stdlib prompts (test split).
  c.eval.prompt_min_bytes, c.eval.prompt_max_bytes = prompt_bytes  # Cut at lines.
  c.eval.max_new_tokens = new_tokens  # Generated tokens per prompt.
  c.eval.batch_size = 8            # Rows per decoding call (shared with timing).
  c.eval.seed = 0                  # Chooses the prompts.

  c.timing = ml_collections.ConfigDict()
  c.timing.regimes = ("regular", "both")  # Regimes timed against greedy.
  c.timing.block_sizes = c.eval.block_sizes  # k values timed (exact).
  c.timing.num_prompts = t_prompts  # Prompts timed at batch 1 (one call each).
  c.timing.repeats = repeats        # Timed repeats after a warm-up; median.
  # Clear JAX's compilation caches before timing, so that compile time can be
  # measured (first call - median call) for every timed setting.
  c.timing.fresh_compile = True
  c.timing.profile = True           # Profile one k = 8 step (trunk, heads, loop).
  if arg == "quick":
    # CI checks the machinery, not speed: reuse the quality run's compiled
    # batch-8 functions and compile only one batch-1 k.
    c.timing.regimes = ("both",)
    c.timing.block_sizes = (k,)
    c.timing.fresh_compile = False
    c.timing.profile = False
  return c
