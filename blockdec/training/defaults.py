"""The training config schema: every field, its default and what it means.

The files in `configs/` start from `default_config()` and change what their
experiment needs; the trainer validates the result (`check_config`) before it
touches data, so a typo in an override fails at once with the field's name.
"""

from __future__ import annotations

import ml_collections

from blockdec import sharding
from blockdec.training.losses import REGIMES, is_diffusion
from blockdec.training.tokenizers import KINDS

# config.cpu_ynn_dots_only's values (train.cpu_compiler_options).
CPU_YNN_DOTS_ONLY = ("auto", "on", "off")


def default_model() -> ml_collections.ConfigDict:
  """ModelConfig fields for a base LM (0 means "the ModelConfig default")."""
  return ml_collections.ConfigDict(dict(
      vocab_size=0,          # 0: the tokenizer's vocabulary size.
      d_model=256,           # Residual width.
      n_layers=4,            # Transformer blocks.
      n_heads=4,             # Attention heads.
      n_kv_heads=0,          # Key/value heads (GQA); 0: n_heads.
      d_ff=0,                # MLP width; 0: 4 * d_model.
      max_seq_len=512,       # Longest position the model is used at (decoding too).
      num_prediction_heads=1,  # k, head 1 included; a base LM needs only 1.
      head_hidden=0,         # Proposal-head FFN width; 0: d_model.
      tie_embeddings=True,   # Share the input embedding with the output projection.
      norm="rmsnorm",        # "rmsnorm" or "layernorm".
      mlp="swiglu",          # "swiglu" or "gelu".
      position="rope",       # "rope" or "learned".
      dtype="float32",       # Activations: "float32" or "bfloat16".
      param_dtype="float32",  # Parameters: "float32" or "bfloat16".
  ))


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "run"             # Prefix of the run folder under the cache.
  # "base" (train a LM, head 1), "frozen" (heads 2..k on a frozen base),
  # "finetune" (all parameters on the mean of the k head losses), "distill"
  # (frozen base, heads on the base's own greedy continuations),
  # "distill_finetune" (both), or "draft" (a fresh small model on the base's
  # greedy continuations: a speculative-decoding draft, configs/draft_model.py).
  c.regime = "base"
  c.seed = 0                 # Parameter init and data order.
  c.workdir = ""             # Run folder; "" = <cache_dir>/<name>-<config hash>.

  # The model. For "base" and "draft": a full ModelConfig (see default_model;
  # a draft's vocab_size and max_seq_len 0 = the base's). For the head
  # regimes: changes applied to the base checkpoint's ModelConfig, e.g.
  # {"num_prediction_heads": 8}; trunk fields must match the checkpoint.
  c.model = default_model()

  c.data = ml_collections.ConfigDict()
  c.data.corpus = "stdlib"   # "stdlib" and/or comma-separated files, folders, globs.
  c.data.pattern = "*.py"    # File pattern inside named folders.
  c.data.tokenizer = "bytes"  # "bytes" (vocab 256) or "bpe" (trained on train split).
  c.data.bpe_vocab_size = 1024  # BPE vocabulary size (>= 257).
  c.data.seq_len = 256       # Tokens per training sequence (inputs).
  c.data.valid_fraction = 0.02  # Share of files held out for evaluation.
  c.data.test_fraction = 0.02   # Share of files held out for decoding prompts.
  c.data.eval_batches = 8    # Held-out batches per evaluation.

  c.batch_size = 16          # Sequences per step.
  c.steps = 1000             # Optimizer steps in total.

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-3  # Peak learning rate (AdamW).
  c.optim.warmup_steps = 50  # Linear warmup from 0 to the peak.
  c.optim.end_lr_fraction = 0.1  # Cosine decay ends at peak * this.
  c.optim.weight_decay = 0.1  # Decoupled weight decay on matrices (ndim >= 2).
  c.optim.b1 = 0.9           # Adam beta1.
  c.optim.b2 = 0.95          # Adam beta2.
  c.optim.grad_clip = 1.0    # Global-norm clipping; 0 disables.
  # Optional, set only where used (absent = 1.0; adding them here would
  # change every cached run's config hash):
  # c.optim.trunk_lr_scale: learning-rate factor of everything outside
  #   proposal_heads in the regimes that train all parameters (> 0).
  # c.first_head_weight: head 1's weight against each proposal head in
  #   those regimes' loss (losses.regime_loss; > 0).

  c.log_every = 10           # Steps between metric rows in metrics.jsonl.
  c.eval_every = 200         # Steps between held-out evaluations (and at the end).
  c.checkpoint_every = 100   # Steps between orbax checkpoints (and at the end).
  c.keep_checkpoints = 2     # Orbax checkpoints kept (the latest ones).
  c.progress = True          # tqdm progress bars.
  # XLA:CPU (jaxlib 0.10) hands dots and the elementwise work around them
  # to its YNNPACK library; limiting it to dots made the backward pass skip
  # transposed copies of the MLP activations (train.cpu_compiler_options).
  # "auto": limit it for the regimes that backpropagate through a model
  # (steps 1.2-1.5x faster on 2 CPU cores), not for the frozen-trunk head
  # regimes (0.96-1.01x there); "on"; "off" (XLA's default). Ignored on other
  # backends and jaxlib versions. Same math up to float rounding; not part
  # of the run's cache key.
  c.cpu_ynn_dots_only = "auto"

  # Head regimes start from this checkpoint folder; "" = train (or reuse from
  # the cache) the run described by `base`.
  c.init_from = ""
  c.base = None              # The base LM's config (head and draft regimes).

  c.distill = ml_collections.ConfigDict()
  c.distill.num_sequences = 512  # Greedy continuations generated (cached on disk).
  c.distill.prefix_len = 64  # Corpus tokens before each continuation.
  c.distill.new_tokens = 192  # Generated tokens per sequence (the targets).
  c.distill.batch_size = 64  # Rows per generation call.
  c.distill.cache_dir = ""   # "" = <workdir>/../distill.
  # 0: the teacher's greedy continuations; > 0: continuations sampled at
  # this temperature (a draft for sampled decoding then learns the contexts
  # sampling reaches; decoder-only teachers).
  c.distill.temperature = 0.0

  c.diagnostics = ml_collections.ConfigDict()
  c.diagnostics.num_prompts = 8  # Held-out prompts for per-head agreement; 0 = off.
  c.diagnostics.new_tokens = 64  # Greedy tokens generated per prompt.

  # Sharding over a ("data", "model") device mesh (blockdec.sharding,
  # docs/sharding.md). Not part of the run's cache key: it changes where the
  # numbers are computed, not what they are (up to float rounding).
  c.sharding = sharding.config_dict()
  # c.sharding.mesh_shape: None = one device; (data, model), one entry may
  #   be -1 = all remaining devices, e.g. --config.sharding.mesh_shape="(4,2)".
  # c.sharding.rules: logical axis -> mesh axis pairs (sharding.DEFAULT_RULES:
  #   batch over data; heads, kv heads, MLP and vocabulary over model).
  # c.sharding.fsdp: also shard parameters and optimizer state over data
  #   along d_model (fully sharded data parallel).
  return c


def _positive_int(path, value, allow_zero=False):
  if isinstance(value, bool) or not isinstance(value, int) or \
      value < (0 if allow_zero else 1):
    raise ValueError(f"config.{path}={value!r} must be a "
                     f"{'non-negative' if allow_zero else 'positive'} integer.")


def check_config(c) -> None:
  """Raises ValueError naming the first bad field of a training config."""
  if c.regime not in REGIMES:
    raise ValueError(f"config.regime={c.regime!r} is not supported; allowed: "
                     f"{tuple(REGIMES)}.")
  for path in ("batch_size", "steps", "log_every", "eval_every",
               "checkpoint_every", "keep_checkpoints", "data.seq_len",
               "data.eval_batches"):
    value = c
    for part in path.split("."):
      value = value[part]
    _positive_int(path, value)
  _positive_int("optim.warmup_steps", c.optim.warmup_steps, allow_zero=True)
  dots_only = c.get("cpu_ynn_dots_only", "auto")
  if dots_only not in CPU_YNN_DOTS_ONLY:
    raise ValueError(f"config.cpu_ynn_dots_only={dots_only!r} is not "
                     f"supported; allowed: {CPU_YNN_DOTS_ONLY}.")
  kind = c.data.get("kind", "lm")
  if kind not in ("lm", "translation"):
    raise ValueError(f"config.data.kind={kind!r} is not supported; allowed: "
                     "('lm', 'translation').")
  if kind == "translation":  # Set by configs/translation.py only.
    for path in ("max_source_len", "max_target_len", "bpe_vocab_size"):
      _positive_int(f"data.{path}", c.data[path])
  if c.data.tokenizer not in KINDS:
    raise ValueError(f"config.data.tokenizer={c.data.tokenizer!r} is not "
                     f"supported; allowed: {KINDS}.")
  if not c.optim.learning_rate > 0:
    raise ValueError(
        f"config.optim.learning_rate={c.optim.learning_rate!r} must be > 0.")
  if not 0 <= c.optim.end_lr_fraction <= 1:
    raise ValueError(f"config.optim.end_lr_fraction="
                     f"{c.optim.end_lr_fraction!r} must be in [0, 1].")
  if c.optim.weight_decay < 0 or c.optim.grad_clip < 0:
    raise ValueError("config.optim.weight_decay and grad_clip must be >= 0, "
                     f"got {c.optim.weight_decay!r}, {c.optim.grad_clip!r}.")
  for path, value in (("optim.trunk_lr_scale", c.optim.get("trunk_lr_scale")),
                      ("first_head_weight", c.get("first_head_weight"))):
    if value is not None and not (isinstance(value, (int, float))
                                  and not isinstance(value, bool) and value > 0):
      raise ValueError(f"config.{path}={value!r} must be a number > 0.")
  if c.regime != "base" and not c.init_from and c.base is None:
    raise ValueError(f"config.regime={c.regime!r} needs a base model (to "
                     "train heads on, or to distill a draft from): set "
                     "config.init_from to a checkpoint folder or config.base "
                     "to the base LM's config.")
  if REGIMES[c.regime]["distill"]:
    for path in ("num_sequences", "prefix_len", "new_tokens", "batch_size"):
      _positive_int(f"distill.{path}", c.distill[path])
  t = c.distill.get("temperature", 0.0)
  if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
    raise ValueError(f"config.distill.temperature={t!r} must be a number >= "
                     "0 (0: greedy continuations).")
  if t and kind == "translation":
    raise ValueError(f"config.distill.temperature={t!r}: sampled "
                     "distillation data is for decoder-only teachers; the "
                     "translation task distills greedy translations (set it "
                     "to 0).")
  if is_diffusion(c.regime):
    # Set by configs/block_diffusion.py (not a default: adding a field to
    # every config would change every cached run's hash).
    if c.get("diffusion") is None:
      raise ValueError(f"config.regime={c.regime!r} needs "
                       "config.diffusion.block_size and .ar_weight (see "
                       "configs/block_diffusion.py).")
    _positive_int("diffusion.block_size", c.diffusion.block_size)
    w = c.diffusion.ar_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
      raise ValueError(f"config.diffusion.ar_weight={w!r} must be a number "
                       ">= 0.")
  if REGIMES[c.regime]["trains"] == "eagle":
    # Set by configs/eagle.py (not a default, as `diffusion` above).
    if c.get("eagle") is None:
      raise ValueError(f"config.regime={c.regime!r} needs config.eagle."
                       "feature_weight, .noise and .unroll (see "
                       "configs/eagle.py).")
    for name in ("feature_weight", "noise"):
      w = c.eagle[name]
      if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
        raise ValueError(f"config.eagle.{name}={w!r} must be a number >= 0.")
    if c.eagle.unroll not in (1, 2):
      raise ValueError(f"config.eagle.unroll={c.eagle.unroll!r} must be 1 "
                       "or 2.")
    if not c.model.get("eagle_layers"):
      raise ValueError(f"config.regime={c.regime!r} needs "
                       "config.model.eagle_layers >= 1.")
  _positive_int("diagnostics.num_prompts", c.diagnostics.num_prompts,
                allow_zero=True)
  _positive_int("diagnostics.new_tokens", c.diagnostics.new_tokens)
  if c.get("sharding") is not None:
    try:
      s = sharding.ShardingConfig.from_config(c.sharding)
      if s.mesh_shape is not None:
        sharding.check_mesh_shape(s.mesh_shape)
    except (TypeError, ValueError) as e:
      raise ValueError(f"config.sharding: {e}") from None
