"""The train step and the trainer loop.

`make_train_step` returns ONE pure function `train_step(state, batch) ->
(state, metrics)` over a `TrainState` pytree; `Trainer` jits it in exactly one
place (`Trainer.__init__`), which is where sharding (`jax.jit(...,
in_shardings=..., out_shardings=...)` over a mesh) will be added.

Regimes (losses.REGIMES): "base" trains everything on head 1; "frozen" and
"distill" train only `params["proposal_heads"]` — the optimizer state covers
only that subtree and the trunk's hidden states are computed under
`stop_gradient`, so nothing is differentiated through the trunk and the base
parameters come out bit-for-bit unchanged; "finetune" and "distill_finetune"
train everything on the mean of the k head losses; "block_diffusion"
adapts the base (plus a [MASK] token) to denoise blocks (training/
diffusion.py), "block_diffusion_distill" the same with the denoising loss
on the base's greedy continuations (the AR loss stays on the corpus);
"eagle" trains only `params["eagle"]`, an EAGLE-style drafter
on the frozen trunk's features (training/eagle.py), and "eagle_distill" the
same on the base's greedy continuations; "draft" trains a FRESH
small model (config.model, with the base's vocabulary, tokenizer and
max_seq_len) on head 1 over the base's greedy continuations: a draft model
for speculative decoding.

Resume is exact: batch i is a pure function of (seed, i) (data.py), there is
no other randomness, and the full state (params, optimizer state, step) is in
each orbax checkpoint. A run killed and restarted continues from its last
checkpoint and reproduces the uninterrupted run's losses and parameters.

Run folder:
  model_config.json, tokenizer files   written at start
  checkpoints/<step>/                  orbax TrainState
  metrics.jsonl                        {"split": "train"|"valid", "step", ...}
  params.safetensors                   final parameters (blockdec.load_checkpoint)
  summary.json, loss_curve.png         at the end
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from blockdec import api, checkpointing, methods, sharding
from blockdec.metrics import block_efficiency
from blockdec.config import ModelConfig
from blockdec.models import transformer
from blockdec.training import data as data_lib
from blockdec.training import diagnostics, diffusion, distill, eagle, losses
from blockdec.training import translation
from blockdec.training.defaults import CPU_YNN_DOTS_ONLY, check_config
from blockdec.training.tokenizers import load_tokenizer, make_tokenizer


@flax.struct.dataclass
class TrainState:
  """step: [] int32 updates done; params: the full model; opt_state: optax
  state of the trainable subtree (all params, or params["proposal_heads"])."""
  step: jax.Array
  params: Any
  opt_state: Any


# The subtree each partial regime optimises (the rest is frozen).
_SUBTREES = {"heads": "proposal_heads", "eagle": "eagle"}

# The most host memory the frozen trunk's states of distilled rows may take
# (`Trainer.frozen_trunk_features`; the demo's: 134 MB).
TRUNK_FEATURE_BYTES = 1 << 30


def trainable(params, regime: str):
  """The subtree a regime optimises."""
  name = _SUBTREES.get(losses.REGIMES[regime]["trains"])
  return params if name is None else params[name]


def with_trainable(params, sub, regime: str):
  """`params` with the trainable subtree replaced by `sub`."""
  name = _SUBTREES.get(losses.REGIMES[regime]["trains"])
  return sub if name is None else {**params, name: sub}


# XLA:CPU's compile option limiting its YNNPACK library fusions to dots
# (config.cpu_ynn_dots_only), and the jaxlib minor versions it was measured
# on: XLA rejects an option it does not know, and this one is marked
# experimental, so elsewhere the step compiles with XLA's defaults.
_YNN_DOTS_ONLY = {"xla_cpu_experimental_ynn_fusion_type":
                  "LIBRARY_FUSION_TYPE_DOT"}
_YNN_DOTS_ONLY_JAXLIB = ((0, 10),)


def _jaxlib_minor() -> tuple[int, int] | None:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return tuple(int(v) for v in metadata.version("jaxlib").split(".")[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return None


def cpu_compiler_options(regime: str, setting: str = "auto", *,
                         backend: str | None = None,
                         jaxlib: tuple[int, int] | None = None) -> dict:
  """The train step's XLA compile options for `regime` (empty: defaults).

  On XLA:CPU (jaxlib 0.10) the dots of a step and the elementwise work
  around them go to the YNNPACK library. In a backward pass through the
  trunk that had XLA write the MLP's activation gradients transposed
  ([tokens, ff] -> [ff, tokens], a fifth of the demo base's 1.6 s step);
  with the library limited to dots they are not, and the steps of the
  regimes that backpropagate through a model ran 1.21-1.49x faster on 2 CPU
  cores (experiments/results/train_step.md; docs/architecture.md, "Training
  speed on CPU"). The head regimes on a frozen trunk ("frozen", "distill")
  ran 0.96-1.01x, so "auto" leaves them at XLA's default.

  Args:
    regime: the training regime (losses.REGIMES).
    setting: config.cpu_ynn_dots_only: "auto", "on" or "off".
    backend: default `jax.default_backend()`.
    jaxlib: (major, minor); default the installed jaxlib's.
  """
  if setting not in CPU_YNN_DOTS_ONLY:
    raise ValueError(f"cpu_ynn_dots_only={setting!r} is not supported; "
                     f"allowed: {CPU_YNN_DOTS_ONLY}.")
  backend = jax.default_backend() if backend is None else backend
  jaxlib = _jaxlib_minor() if jaxlib is None else jaxlib
  if (setting == "off" or backend != "cpu"
      or jaxlib not in _YNN_DOTS_ONLY_JAXLIB):
    return {}
  if setting == "auto" and losses.REGIMES[regime]["trains"] == "heads":
    return {}
  return dict(_YNN_DOTS_ONLY)


def make_optimizer(optim, total_steps: int):
  """AdamW with linear warmup and cosine decay; returns (optimizer, schedule)."""
  warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=optim.learning_rate * optim.end_lr_fraction)
  decay_mask = lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)
  parts = []
  if optim.grad_clip:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2,
                           weight_decay=optim.weight_decay, mask=decay_mask))
  trunk_scale = optim.get("trunk_lr_scale", 1.0)
  if trunk_scale != 1.0:
    # Everything outside proposal_heads (trunk and head 1) moves at
    # trunk_scale x the schedule; only regimes that train all parameters
    # see these leaves (the others optimise proposal_heads alone).
    is_trunk = lambda p: {k: jax.tree_util.tree_map(
        lambda _: k != "proposal_heads", v) for k, v in p.items()}
    parts.append(optax.masked(optax.scale(trunk_scale), is_trunk))
  return optax.chain(*parts), schedule


def trunk_states(params, cfg: ModelConfig, inputs, memory=None):
  """The trunk's final hidden states [B, T, d] on inputs [B, T] at
  positions 0..T-1 (memory: an encoder-decoder's encoded source)."""
  positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32),
                               inputs.shape)
  h, _ = transformer.Transformer(cfg).apply(
      {"params": params}, inputs, positions, memory=memory, method="trunk")
  return h


def _head_logits(params, cfg: ModelConfig, batch, frozen_trunk: bool,
                 hydra_slots: bool | None = None):
  """Every head's logits [B, T, k, V] on batch rows, with targets and
  weights [B, T, k] (`losses.head_targets`).

  With a frozen trunk, batch["hidden"] (when the batches carry it:
  `Trainer.frozen_trunk_features`) stands in for the trunk's states.
  `hydra_slots`: run Hydra heads through slot tables
  (`transformer.hydra_logits_from_slots`; same result up to float
  rounding) or through their own join; None: where the tables cost less
  (`transformer.hydra_slots_pay_off`).
  """
  k = cfg.num_prediction_heads
  inputs, targets, weights = losses.head_targets(batch["tokens"], batch["mask"], k)
  model = transformer.Transformer(cfg)
  if frozen_trunk and "hidden" in batch:
    h = batch["hidden"]
  else:
    memory = None
    if "source" in batch:  # An encoder-decoder (translation): its source.
      memory = model.apply({"params": params}, batch["source"],
                           batch["source_lengths"], method="encode")
    h = trunk_states(params, cfg, inputs, memory)
  if frozen_trunk:
    h = jax.lax.stop_gradient(h)  # [B, T, d] a constant: no trunk backward.
  # Hydra heads read the tokens before their targets: teacher forcing.
  following = targets if cfg.head_type == "hydra" else None
  if hydra_slots is None:
    hydra_slots = transformer.hydra_slots_pay_off(cfg, k, inputs.size)
  if following is not None and hydra_slots:
    logits = transformer.hydra_logits_from_slots(params, cfg, h, following)
  else:
    logits = model.apply({"params": params}, h, None, following,
                         method="head_logits")
  return logits, targets, weights


def head_losses(params, cfg: ModelConfig, batch, regime: str,
                hydra_slots: bool | None = None) -> jax.Array:
  """Per-head mean cross-entropy [k] on batch {"tokens", "mask"} [B, S]
  (`hydra_slots`: see `_head_logits`)."""
  return losses.per_head_losses(*_head_logits(
      params, cfg, batch, losses.REGIMES[regime]["trains"] == "heads",
      hydra_slots))


def make_train_step(cfg: ModelConfig, regime: str, optimizer, schedule,
                    first_head_weight: float = 1.0, diffusion_cfg=None,
                    seed: int = 0, eagle_cfg=None,
                    hydra_slots: bool | None = None):
  """The pure step of `regime`: (TrainState, batch) -> (TrainState, metrics).

  `first_head_weight`: see `losses.regime_loss`. `diffusion_cfg` (regime
  "block_diffusion"): `block_size` and `ar_weight`; the step's masks are
  drawn from (seed, step), so a resumed run draws the same ones.
  `eagle_cfg` (regimes "eagle*"): `feature_weight`, `noise` and `unroll`
  (training/eagle.py); its noise is drawn from (seed, step) too.
  `hydra_slots`: how Hydra heads run (`_head_logits`; None: the cheaper
  way, which the Trainer uses).
  """
  losses.check_regime(regime, cfg.num_prediction_heads)
  if losses.is_diffusion(regime) and cfg.mask_token_id is None:
    raise ValueError(f"regime {regime!r} needs a model with a [MASK] token "
                     "(diffusion.adapt_model).")
  trains_eagle = losses.REGIMES[regime]["trains"] == "eagle"
  if trains_eagle and not cfg.eagle_layers:
    raise ValueError(f"regime {regime!r} needs a model with eagle_layers "
                     ">= 1.")

  def loss_fn(sub, state, batch):
    params = with_trainable(state.params, sub, regime)
    if losses.is_diffusion(regime):
      key = jax.random.fold_in(jax.random.key(seed), state.step)
      ar, diff = diffusion.losses(params, cfg, batch, key,
                                  diffusion_cfg.block_size)
      return (diff + diffusion_cfg.ar_weight * ar,
              (ar[None], {"diffusion_loss": diff}))
    if trains_eagle:
      key = jax.random.fold_in(jax.random.key(seed), state.step)
      loss, parts = eagle.losses(
          params, cfg, batch, key, feature_weight=eagle_cfg.feature_weight,
          noise=eagle_cfg.noise, unroll=eagle_cfg.unroll)
      return loss, (parts["token_loss"], {
          "eagle_feature_loss": parts["feature_loss"],
          "eagle_top1": parts["top1"]})
    per_head = head_losses(params, cfg, batch, regime, hydra_slots)
    return (losses.regime_loss(regime, per_head, first_head_weight),
            (per_head, {}))

  def train_step(state: TrainState, batch):
    sub = trainable(state.params, regime)
    (loss, (per_head, extra)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(sub, state, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, sub)
    params = with_trainable(state.params, optax.apply_updates(sub, updates),
                            regime)
    metrics = {"loss": loss, "head_losses": per_head,
               "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step)}
    metrics.update(extra)
    return TrainState(step=state.step + 1, params=params,
                      opt_state=opt_state), metrics

  return train_step


# Regime-specific training metrics logged beside the loss.
_EXTRA_METRICS = ("diffusion_loss", "eagle_feature_loss", "eagle_top1")


def make_eval_step(cfg: ModelConfig):
  """(params, batch) -> (summed cross-entropy [k], summed weights [k])."""

  def eval_step(params, batch):
    return losses.per_head_sums(*_head_logits(params, cfg, batch, True))

  return eval_step


# ------------------------------------------------------------------ the run


def model_config_from(model, vocab_size: int) -> ModelConfig:
  """ModelConfig from a config's `model` block (0 = the ModelConfig default)."""
  d = dict(model)
  if not d.get("vocab_size"):
    d["vocab_size"] = vocab_size
  for name in ("n_kv_heads", "d_ff", "head_dim", "head_hidden"):
    if d.get(name) == 0:
      d[name] = None
  try:
    return ModelConfig.from_dict(d)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model: {e}") from None


def draft_model_config(model, base_cfg: ModelConfig) -> ModelConfig:
  """The draft regime's ModelConfig: `config.model` on the base's vocabulary.

  vocab_size and max_seq_len 0 take the base's; a draft must share the
  base's vocabulary (its tokens are verified by the base) and has one head.
  """
  d = dict(model)
  if d.get("vocab_size", 0) not in (0, base_cfg.vocab_size):
    raise ValueError(f"config.model.vocab_size={d['vocab_size']} differs from "
                     f"the base's {base_cfg.vocab_size}: a draft model must "
                     "share its base's vocabulary; set it to 0 (= the base's).")
  d["vocab_size"] = base_cfg.vocab_size
  if not d.get("max_seq_len"):
    d["max_seq_len"] = base_cfg.max_seq_len
  cfg = model_config_from(d, base_cfg.vocab_size)
  if cfg.num_prediction_heads != 1:
    raise ValueError(f"config.model.num_prediction_heads="
                     f"{cfg.num_prediction_heads}: the draft regime trains "
                     "head 1 only; set it to 1.")
  return cfg


def heads_model(base_cfg: ModelConfig, base_params, overrides, seed: int):
  """The head-regime model: base config + overrides, base weights + new heads.

  Every parameter the base has (trunk, head 1, and heads it already has) is
  copied; heads (or an EAGLE drafter) it lacks are initialised from `seed`.
  """
  changes = {k: (None if v == 0 and k in ("head_hidden",) else v)
             for k, v in dict(overrides).items()}
  try:
    cfg = base_cfg.replace(**changes)
  except TypeError as e:
    raise ValueError(f"config.model has a field ModelConfig lacks: {e}") from None
  fresh = jax.device_get(api.init_params(cfg, jax.random.key(seed)))
  base_params = jax.device_get(base_params)
  if cfg.head_type != base_cfg.head_type:  # Other heads: start them fresh.
    base_params = {k: v for k, v in base_params.items()
                   if k != "proposal_heads"}

  def merge(new, old, path):
    if isinstance(new, dict):
      return {k: merge(v, old.get(k) if isinstance(old, dict) else None,
                       f"{path}/{k}") for k, v in new.items()}
    if old is None:
      if not path.startswith(("/proposal_heads", "/eagle")):
        raise ValueError(f"the base checkpoint lacks parameter {path}.")
      return new
    if np.shape(old) != np.shape(new):
      raise ValueError(
          f"parameter {path} has shape {np.shape(old)} in the base checkpoint "
          f"but {np.shape(new)} under the head config; config.model may only "
          "change head fields (num_prediction_heads, head_hidden, "
          "head_type, eagle_layers).")
    return np.asarray(old)

  # On the device: the distillation data and diagnostics decode with them.
  return cfg, jax.device_put(merge(fresh, base_params, ""))


def greedy_teacher(cfg: ModelConfig, params) -> tuple[ModelConfig, Any]:
  """The part of a model its greedy outputs depend on: head 1, no drafters.

  Distillation data is cached under a digest of the teacher: a teacher that
  carries trained heads (the distillation run that "both" starts from)
  writes the same greedy outputs as its base, and now reuses them.
  """
  drafters = ("proposal_heads", "eagle")
  if (cfg.num_prediction_heads == 1 and not cfg.eagle_layers
      and not any(name in params for name in drafters)):
    return cfg, params
  cfg = cfg.replace(num_prediction_heads=1, eagle_layers=0, head_type="stern",
                    head_hidden=None)
  return cfg, {k: v for k, v in params.items() if k not in drafters}


class Trainer:
  """Trains one config in one run folder; `run()` resumes if it can.

  Args:
    config: a training ConfigDict (defaults.default_config()).
    workdir: the run folder.
    init: (cfg, params, tokenizer) of the base model for the head and draft
      regimes (the starting point or the teacher); by default loaded from
      `config.init_from`.
    docs: the corpus documents (default: loaded from config.data.corpus).
  """

  def __init__(self, config, workdir, *, init=None, docs=None):
    check_config(config)
    self.config = config
    self.regime = config.regime
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    c = config
    # data.kind "translation" (configs/translation.py): sentence pairs of an
    # encoder-decoder instead of an LM's token stream.
    self.task = None
    translating = c.data.get("kind", "lm") == "translation"
    if not translating:
      docs = data_lib.load_corpus(c.data.corpus, pattern=c.data.pattern) \
          if docs is None else docs
      self.splits = data_lib.split_corpus(docs, c.data.valid_fraction,
                                          c.data.test_fraction)

    if self.regime == "base":
      if (self.workdir / checkpointing.CONFIG_FILE).exists():
        self.tokenizer = load_tokenizer(self.workdir)  # Resume: same tokenizer.
      elif translating:  # The task trains the shared BPE vocabulary.
        self.task = translation.TranslationTask(c.data)
        self.tokenizer = self.task.tokenizer
      else:
        self.tokenizer = make_tokenizer(
            c.data.tokenizer, (d.text for d in self.splits["train"]),
            c.data.bpe_vocab_size)
      self.cfg = model_config_from(c.model, self.tokenizer.vocab_size)
      params = api.init_params(self.cfg, jax.random.key(c.seed))
      self.teacher = None
    else:
      if init is None:
        init = checkpointing.load_checkpoint(c.init_from)
      base_cfg, base_params, self.tokenizer = init
      if losses.REGIMES[self.regime]["model"] == "fresh":  # A draft model.
        self.cfg = draft_model_config(c.model, base_cfg)
        params = api.init_params(self.cfg, jax.random.key(c.seed))
      elif losses.is_diffusion(self.regime):
        self.cfg, params = diffusion.adapt_model(base_cfg, base_params, c.seed)
      else:
        self.cfg, params = heads_model(base_cfg, base_params, c.model, c.seed)
      self.teacher = greedy_teacher(base_cfg, jax.device_put(base_params))
    if translating and self.task is None:
      self.task = translation.TranslationTask(c.data, self.tokenizer)
    if self.tokenizer.vocab_size > self.cfg.vocab_size:
      raise ValueError(f"config.model.vocab_size={self.cfg.vocab_size} is "
                       f"smaller than the tokenizer's {self.tokenizer.vocab_size}.")
    if self.task is None and c.data.seq_len > self.cfg.max_seq_len:
      raise ValueError(f"config.data.seq_len={c.data.seq_len} exceeds "
                       f"model max_seq_len={self.cfg.max_seq_len}.")
    losses.check_regime(self.regime, self.cfg.num_prediction_heads)
    self._check_or_write_run_files()

    if self.task is not None:
      if not self.cfg.encoder_layers:
        raise ValueError("config.data.kind='translation' needs an encoder-"
                         "decoder: set config.model.encoder_layers >= 1.")
      if self.task.seq_len > self.cfg.max_seq_len:
        raise ValueError(f"config.data.max_target_len + 1 = "
                         f"{self.task.seq_len} exceeds model max_seq_len="
                         f"{self.cfg.max_seq_len}.")
      self.bytes_per_token = self.task.bytes_per_token
      self.eval_data = self.task.eval_batches(c.batch_size,
                                              c.data.eval_batches)
    else:
      self.train_stream = data_lib.token_stream(self.splits["train"],
                                                self.tokenizer)
      valid_stream = data_lib.token_stream(self.splits["valid"],
                                           self.tokenizer)
      valid_bytes = sum(len(d.text.encode("utf-8"))
                        for d in self.splits["valid"])
      self.bytes_per_token = valid_bytes / max(len(valid_stream), 1)
      self.eval_data = data_lib.eval_batches(valid_stream, c.data.seq_len,
                                             c.batch_size, c.data.eval_batches)

    self.optimizer, self.schedule = make_optimizer(c.optim, c.steps)
    params = jax.device_put(params)
    self.initial_state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state=self.optimizer.init(trainable(params, self.regime)))
    # The one place the step is jitted: on one device, or sharded over the
    # mesh of config.sharding (blockdec.sharding; same step, same results up
    # to float rounding). Resume restores onto the state's shardings.
    self.first_head_weight = c.get("first_head_weight", 1.0)
    step_fn = make_train_step(self.cfg, self.regime, self.optimizer,
                              self.schedule, self.first_head_weight,
                              c.get("diffusion"), c.seed, c.get("eagle"))
    eval_fn = make_eval_step(self.cfg)
    sharding_cfg = sharding.ShardingConfig.from_config(c.get("sharding"))
    self.mesh = sharding_cfg.make_mesh()
    if self.mesh is not None and self.task is not None:
      raise ValueError("training a translation model on a mesh is not "
                       "supported; unset config.sharding.")
    # The pure step, unjitted (experiments/train_step.py compiles it both
    # ways); jitted below with the compile options of cpu_ynn_dots_only.
    self.step_fn = step_fn
    options = cpu_compiler_options(self.regime,
                                   c.get("cpu_ynn_dots_only", "auto"))
    if self.mesh is None:
      self.train_step = jax.jit(step_fn, compiler_options=options or None)
      self.eval_step = jax.jit(eval_fn)
      self._put_batch = lambda batch: batch
    else:
      self.train_step, state_sh, batch_sh, self.eval_step = \
          sharding.shard_train_step(step_fn, self.initial_state, self.mesh,
                                    sharding_cfg, batch_size=c.batch_size,
                                    eval_step=eval_fn,
                                    compiler_options=options or None)
      self.initial_state = jax.device_put(self.initial_state, state_sh)
      self._put_batch = lambda batch: sharding.put_batch(batch, batch_sh)
    self._batches = None
    self._eagle_eval = None

  def _check_or_write_run_files(self):
    path = self.workdir / checkpointing.CONFIG_FILE
    if path.exists():
      saved = checkpointing.load_model_config(self.workdir)
      if saved != self.cfg:
        raise ValueError(
            f"{self.workdir} holds a run of another model ({saved}); this "
            f"config describes {self.cfg}. Use a fresh workdir.")
    checkpointing.save_model_config(self.workdir, self.cfg)
    self.tokenizer.save(self.workdir)
    (self.workdir / "train_config.json").write_text(self.config.to_json(indent=2))

  @property
  def batches(self):
    """Training batches (distillation data is generated on first use)."""
    if self._batches is None:
      c = self.config
      d = c.distill
      cache = d.cache_dir or (self.workdir.parent / "distill")
      distilling = losses.REGIMES[self.regime]["distill"]
      if self.task is not None:
        encoded = None
        if distilling:
          t_cfg, t_params = self.teacher
          encoded = self.task.distill(
              t_params, t_cfg, num_sequences=d.num_sequences,
              batch_size=d.batch_size, seed=c.seed, cache_dir=cache,
              progress=c.progress)
        self._batches = self.task.train_batches(c.batch_size, c.seed, encoded)
      elif distilling:
        t_cfg, t_params = self.teacher
        tokens, mask = distill.generate(
            t_params, t_cfg, self.train_stream, num_sequences=d.num_sequences,
            prefix_len=d.prefix_len, new_tokens=d.new_tokens,
            batch_size=d.batch_size, seed=c.seed, cache_dir=cache,
            progress=c.progress, temperature=d.get("temperature", 0.0))
        self._batches = data_lib.ArrayBatches(
            tokens, mask, c.batch_size, c.seed,
            extra=self.frozen_trunk_features(tokens))
        if losses.is_diffusion(self.regime):
          # The autoregressive loss stays on the corpus (diffusion.losses):
          # the base's greedy text alone would sharpen the model into it.
          self._batches = data_lib.ZippedBatches(
              self._batches, data_lib.CorpusBatches(
                  self.train_stream, c.data.seq_len, c.batch_size, c.seed),
              diffusion.CORPUS_PREFIX)
      else:
        self._batches = data_lib.CorpusBatches(
            self.train_stream, c.data.seq_len, c.batch_size, c.seed)
    return self._batches

  def frozen_trunk_features(self, tokens: np.ndarray) -> dict:
    """{"hidden": the frozen trunk's states} on distilled rows tokens
    [N, S], or {}.

    For the regimes that train on a frozen trunk over distilled rows:
    heads ("distill"; the states of the inputs tokens[:, :-1],
    [N, S - 1, d], which `_head_logits` reads) and the EAGLE drafter
    ("eagle_distill"; of the whole rows, [N, S, d], which `eagle.losses`
    reads). The trunk never changes there, and the steps visit each row
    steps x batch_size / N times (the demo's Hydra heads: 7.8 times), so
    computing its states once, in batches of the step's shape, replaces a
    trunk forward in every step. {} for other regimes, when no row is
    visited twice, or when the states would take more than
    `TRUNK_FEATURE_BYTES` of host memory.
    """
    c = self.config
    trains = losses.REGIMES[self.regime]["trains"]
    rows = tokens if trains == "eagle" else tokens[:, :-1]
    n, t = rows.shape
    itemsize = jnp.dtype(self.cfg.dtype).itemsize
    if (trains not in ("heads", "eagle")
        or c.steps * c.batch_size <= n
        or n * t * self.cfg.d_model * itemsize > TRUNK_FEATURE_BYTES):
      return {}
    b = c.batch_size
    fn = jax.jit(lambda params, x: trunk_states(params, self.cfg, x))
    params = self.initial_state.params
    padded = np.pad(rows, ((0, -n % b), (0, 0)))
    parts = [np.asarray(sharding.to_host(fn(params, padded[i:i + b])))
             for i in tqdm(range(0, len(padded), b), disable=not c.progress,
                           desc="frozen trunk states", unit="batch",
                           dynamic_ncols=True)]
    return {"hidden": np.concatenate(parts)[:n]}

  def evaluate(self, params) -> dict:
    """Held-out per-head losses (nats per token) and head-1 nats per byte."""
    ce = np.zeros(self.cfg.num_prediction_heads)
    w = np.zeros(self.cfg.num_prediction_heads)
    for batch in self.eval_data:
      c_sum, w_sum = self.eval_step(params, self._put_batch(batch))
      ce += np.asarray(c_sum)
      w += np.asarray(w_sum)
    per_head = ce / np.maximum(w, 1)
    row = {"loss": float(per_head[0]), "head_losses": per_head.tolist(),
           "regime_loss": float(losses.regime_loss(
               self.regime, per_head, self.first_head_weight)),
           "nats_per_byte": float(per_head[0] / self.bytes_per_token)}
    if losses.REGIMES[self.regime]["trains"] == "eagle":
      row.update(self._evaluate_eagle(params))
    return row

  def _evaluate_eagle(self, params) -> dict:
    """The drafter's held-out token loss, feature loss and top-1 agreement
    with the target (no input noise; per pass of training/eagle.py)."""
    if self._eagle_eval is None:
      e = self.config.eagle
      self._eagle_eval = jax.jit(lambda p, b: eagle.losses(
          p, self.cfg, b, jax.random.key(0), feature_weight=e.feature_weight,
          noise=0.0, unroll=e.unroll)[1])
    parts = [jax.device_get(self._eagle_eval(params, self._put_batch(b)))
             for b in self.eval_data]
    mean = lambda name: np.mean([p[name] for p in parts], axis=0).tolist()
    token = mean("token_loss")
    return {"regime_loss": float(token[0]), "eagle_token_loss": token,
            "eagle_feature_loss": mean("feature_loss"),
            "eagle_top1": mean("top1")}

  def run(self, stop_at_step: int | None = None):
    """Trains to `config.steps` (resuming from the latest checkpoint).

    Args:
      stop_at_step: stop once this many steps are done, without saving, as if
        the process were killed there (for tests and time-sliced jobs).

    Returns:
      (final TrainState, summary dict or None when stopped early).
    """
    c = self.config
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=c.checkpoint_every, max_to_keep=c.keep_checkpoints,
        enable_async_checkpointing=False, create=True)
    metrics_path = self.workdir / "metrics.jsonl"
    # The explicit handler keeps a damaged step from making orbax guess a
    # multi-item layout (checkpointing.restore_newest skips such steps).
    with ocp.CheckpointManager((self.workdir / checkpointing.ORBAX_DIR).resolve(),
                               options=options,
                               item_handlers=ocp.StandardCheckpointHandler()
                               ) as mngr:
      state = self.initial_state
      abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                        _as_dict(state))
      # The newest step that restores; damaged newer ones are moved aside.
      _, restored = checkpointing.restore_newest(
          mngr, lambda step: mngr.restore(
              step, args=ocp.args.StandardRestore(abstract)),
          set_damaged_aside=True, log=lambda m: print(f"[resume] {m}"))
      if restored is not None:
        state = _from_dict(restored)
      start = int(state.step)
      _truncate_metrics(metrics_path, start)
      end = c.steps if stop_at_step is None else min(stop_at_step, c.steps)
      batches = self.batches if start < end else None
      tokens_per_step = c.batch_size * (
          batches.batch(0)["tokens"].shape[1] - 1 if batches else 0)

      bar = tqdm(total=c.steps, initial=start, disable=not c.progress,
                 desc=f"train {c.name} ({self.regime})", unit="step",
                 dynamic_ncols=True)
      t0, t_last, n_since = time.perf_counter(), time.perf_counter(), 0
      postfix = {}
      with open(metrics_path, "a") as log:
        for step in range(start, end):
          state, metrics = self.train_step(
              state, self._put_batch(batches.batch(step)))
          done = step + 1
          n_since += 1
          if done % c.log_every == 0 or done == c.steps:
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            tps = n_since * tokens_per_step / max(now - t_last, 1e-9)
            t_last, n_since = now, 0
            row = {"split": "train", "step": done,
                   "loss": float(metrics["loss"]),
                   **{name: np.asarray(metrics[name]).tolist()
                      for name in _EXTRA_METRICS if name in metrics},
                   "head_losses": np.asarray(metrics["head_losses"]).tolist(),
                   "grad_norm": float(metrics["grad_norm"]),
                   "lr": float(metrics["lr"]), "tokens_per_s": tps,
                   "elapsed_s": now - t0}
            log.write(json.dumps(row) + "\n")
            log.flush()
            postfix.update(loss=f"{row['loss']:.3f}", tok_s=f"{tps:.0f}")
            bar.set_postfix(postfix)
          if done % c.eval_every == 0 or done == c.steps:
            row = {"split": "valid", "step": done, **self.evaluate(state.params)}
            log.write(json.dumps(row) + "\n")
            log.flush()
            postfix["valid"] = f"{row['regime_loss']:.3f}"
            bar.set_postfix(postfix)
          mngr.save(done, args=ocp.args.StandardSave(_as_dict(state)),
                    force=done == c.steps)
          bar.update(1)
      bar.close()
      mngr.wait_until_finished()
    if int(state.step) < c.steps:
      return state, None
    return state, self._finish(state)

  def _finish(self, state) -> dict:
    params = sharding.to_host(state.params)
    checkpointing.save_checkpoint(self.workdir, self.cfg, params, self.tokenizer)
    params = jax.device_put(params)  # One device, placed once for the decodes.
    rows = read_metrics(self.workdir / "metrics.jsonl")
    valid = [r for r in rows if r["split"] == "valid"]
    summary = {"name": self.config.name, "regime": self.regime,
               "steps": int(state.step), "model": self.cfg.to_dict(),
               "tokenizer": self.tokenizer.kind,
               "valid": valid[-1] if valid else self.evaluate(params)}
    # The diagnostics decode LM prompts: none for a translation model.
    n = self.config.diagnostics.num_prompts if self.task is None else 0
    if n and self.cfg.num_prediction_heads > 1:
      summary["head_agreement"] = self.head_agreement(params, n)
    if n and self.regime == "draft":
      summary["draft_agreement"] = self.draft_agreement(params, n)
    if n and losses.REGIMES[self.regime]["trains"] == "eagle":
      summary["eagle_tokens_per_call"] = self.eagle_tokens_per_call(params, n)
    (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_loss_curve(rows, self.workdir / "loss_curve.png",
                    title=f"{self.config.name} ({self.regime})")
    return summary

  def head_agreement(self, params, num_prompts: int) -> list[float]:
    """Per-head agreement with greedy continuations of held-out prompts."""
    return diagnostics.head_agreement(
        params, self.cfg, *self._diagnostic_prompts(num_prompts),
        self.config.diagnostics.new_tokens).tolist()

  def draft_agreement(self, params, num_prompts: int) -> dict:
    """The draft's agreement with the teacher's greedy continuations of
    held-out prompts, and its tokens per call (diagnostics.draft_agreement)."""
    return diagnostics.draft_agreement(
        params, self.cfg, self.teacher,
        *self._diagnostic_prompts(num_prompts),
        self.config.diagnostics.new_tokens)

  def eagle_tokens_per_call(self, params, num_prompts: int) -> dict:
    """Greedy tokens per call of `blockdec.Eagle` at k = 4 and 8 on held-out
    prompts (exact, so the text is the base's greedy text)."""
    prompts, lengths = self._diagnostic_prompts(num_prompts)
    out = {}
    for k in (4, 8):
      result = api.decode(params, self.cfg, prompts, lengths,
                          self.config.diagnostics.new_tokens,
                          method=methods.Eagle(block_size=k))
      out[f"k{k}"] = block_efficiency(result.lengths, result.num_calls)
    return out

  def _diagnostic_prompts(self, num_prompts: int):
    """Held-out prompts (int32 [B, P], lengths [B]) with room to generate."""
    d = self.config.diagnostics
    docs = self.splits["valid"]
    texts = data_lib.heldout_prompts(docs, num_prompts, min_bytes=64,
                                     max_bytes=128, seed=self.config.seed)
    ids = [self.tokenizer.encode(t)[:max(self.cfg.max_seq_len - d.new_tokens, 1)]
           for t in texts]
    return pad_prompts(ids)


def pad_prompts(ids: list[np.ndarray]):
  """Right-pads token arrays -> prompts int32 [B, P], lengths int32 [B]."""
  lengths = np.array([len(x) for x in ids], np.int32)
  prompts = np.zeros((len(ids), int(lengths.max())), np.int32)
  for i, x in enumerate(ids):
    prompts[i, :len(x)] = x
  return prompts, lengths


def _as_dict(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params,
          "opt_state": state.opt_state}


def _from_dict(d: dict) -> TrainState:
  return TrainState(step=d["step"], params=d["params"], opt_state=d["opt_state"])


def read_metrics(path) -> list[dict]:
  """The rows of metrics.jsonl. A torn last line (the process died while
  writing it) is dropped; a bad line before it raises
  `checkpointing.DamagedCheckpointError` naming the file and line."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  lines = path.read_text(errors="replace").splitlines()
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        break  # Torn by a kill mid-write; resume rewrites the file.
      raise checkpointing.DamagedCheckpointError(
          f"{path}:{i + 1} is not a JSON row ({e}): {line[:80]!r}.") from None
    rows.append(row)
  return rows


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
  """Drops rows past `step` (written after the checkpoint we resume from)."""
  rows = [r for r in read_metrics(path) if r["step"] <= step]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def plot_loss_curve(rows: list[dict], path, title: str = "") -> None:
  """The regime's train and held-out loss against steps, as a PNG.

  Uses a bare `Figure` (no pyplot), so it never switches the global
  matplotlib backend of a notebook that trains.
  """
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for split, key, style in (("train", "loss", "-"),
                            ("valid", "regime_loss", "o-")):
    pts = [(r["step"], r[key]) for r in rows if r["split"] == split]
    if pts:
      ax.plot(*zip(*pts), style, label=f"{split} loss", markersize=3)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def train(config, workdir, *, init=None, docs=None, stop_at_step=None):
  """Trains `config` in `workdir`; returns the summary (None if stopped)."""
  return Trainer(config, workdir, init=init, docs=docs).run(stop_at_step)[1]
