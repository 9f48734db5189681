r"""English -> German translation from the installed gettext catalogs.

An encoder-decoder (ModelConfig.encoder_layers > 0) trained on the human
translations under /usr/share/locale/<lang>/LC_MESSAGES/*.mo
(blockdec/training/gettext_corpus.py: split by catalog, so test programs are
unseen in training), with a shared BPE vocabulary. The four head regimes of
Stern et al.'s Table 1 train k = 10 proposal heads on the decoder.

Launch (from the repository root):

  blockdec train --config configs/translation.py:cpu            # the base
  blockdec train --config configs/translation.py:cpu,both       # a regime
  blockdec train --config configs/translation.py:cpu,both,hydra # other heads
  python experiments/stern_translation.py --preset=cpu

The argument is "<preset>" (the base translation model, regime "base") or
"<preset>,<regime>" with a regime of Stern's table: regular (frozen base,
heads on the references), distillation (frozen base, heads on the base's
greedy translations), fine-tuning (all parameters, from the regular run),
both (all parameters on the distilled data, from the distillation run).
A third part picks the proposal heads (ModelConfig.head_type): "stern"
(the default: Stern's independent heads, each reading the decoder's state)
or "hydra" (dependent heads that also read the tokens before their target;
configs/heads_hydra.py); a "hydra" fine-tuned regime starts from the
"hydra" run of its table row. A study beyond the table,
"both-over-fine-tuning", is "both" started from (and distilled from) the
fine-tuning run: "both" over a stronger model
(experiments/translation_stronger_base.py).

Presets:
  tiny  seconds; tests and smoke runs.
  cpu   d = 256, 3 + 3 layers: about 12 minutes for the base on 2 CPU cores,
        then about 50 for the four regimes (5 to translate the training
        sources for distillation; the ten heads' vocabulary projections
        dominate a step).
  demo  d = 384, 4 + 4 layers, longer: the intended setting (an idle machine
        or an accelerator).
"""

import dataclasses

from blockdec.training.defaults import default_config


@dataclasses.dataclass(frozen=True)
class Preset:
  d_model: int
  layers: int          # Encoder layers = decoder layers.
  heads: int           # Attention heads.
  vocab: int           # Shared BPE vocabulary.
  max_len: int         # Longest source / target in BPE tokens (+ EOS).
  batch: int           # Pairs per step.
  steps: int           # Base model steps.
  head_steps: int      # Steps of a frozen-trunk regime (regular, distillation).
  finetune_steps: int  # Steps of a fine-tuned regime (fine-tuning, both).
  lr: float            # Peak AdamW learning rate of the base.
  k: int               # Heads of the regime models (head 1 included).
  distill_pairs: int   # Training sources the base translates (distillation).


PRESETS = {
    "tiny": Preset(d_model=32, layers=1, heads=2, vocab=300, max_len=24,
                   batch=4, steps=3, head_steps=2, finetune_steps=2,
                   lr=3e-3, k=4, distill_pairs=8),
    "cpu": Preset(d_model=256, layers=3, heads=4, vocab=4000, max_len=48,
                  batch=64, steps=1000, head_steps=400, finetune_steps=800,
                  lr=2e-3, k=10, distill_pairs=40000),
    "demo": Preset(d_model=384, layers=4, heads=6, vocab=8000, max_len=64,
                   batch=64, steps=6000, head_steps=1000, finetune_steps=3000,
                   lr=1.5e-3, k=10, distill_pairs=60000),
}

# Stern's regimes -> the trainer's regime, and the run a fine-tuned regime
# starts from (its trunk, head 1 and trained heads).
REGIMES = {"regular": "frozen", "distillation": "distill",
           "fine-tuning": "finetune", "both": "distill_finetune"}
FINETUNE_FROM = {"fine-tuning": "regular", "both": "distillation"}
# Stern fine-tunes the whole model jointly with its heads: the trunk learns at
# the heads' rate (configs/stern_table.py moves its LM trunk gently instead).
# "both" at k = 8 on the cpu preset: 1.74 tokens per call at 1.0, 1.65 at 0.3
# (800 steps each), 1.48 at 0.1 after 200 steps (README, Stern on translation).
FINETUNE_TRUNK_LR_SCALE = 1.0


def base_config(preset: str):
  p = PRESETS[preset]
  c = default_config()
  c.name = f"translation_{preset}"  # Run folder prefix.
  c.regime = "base"                 # Head 1: the next target token.
  c.model.vocab_size = 0            # From the shared BPE vocabulary.
  c.model.d_model = p.d_model
  c.model.n_layers = p.layers       # Decoder blocks.
  c.model.encoder_layers = p.layers  # Encoder blocks (bidirectional).
  c.model.n_heads = p.heads
  c.model.max_seq_len = 2 * p.max_len  # Source and target positions.
  c.model.num_prediction_heads = 1  # Heads are added by the regimes.
  c.data.kind = "translation"       # Sentence pairs, not an LM stream.
  c.data.src_lang = "en"            # msgid side.
  c.data.tgt_lang = "de"
  c.data.locale_dir = ""            # "" = /usr/share/locale.
  c.data.tokenizer = "bpe"          # Shared BPE (ids 0, 1, 2: PAD, BOS, EOS).
  c.data.bpe_vocab_size = p.vocab
  c.data.max_source_len = p.max_len  # Longer pairs are dropped.
  c.data.max_target_len = p.max_len  # y + EOS.
  c.data.bucket = 16                # Batches of similar lengths, cut to x16.
  c.data.valid_fraction = 0.05      # Share of catalogs held out (valid).
  c.data.test_fraction = 0.05       # Share of catalogs held out (BLEU).
  c.data.eval_batches = 8           # Valid batches per evaluation.
  c.batch_size = p.batch
  c.steps = p.steps
  c.optim.learning_rate = p.lr
  c.optim.warmup_steps = max(p.steps // 20, 1)
  c.eval_every = max(p.steps // 4, 1)
  c.checkpoint_every = max(p.steps // 10, 1)
  c.log_every = max(min(10, p.steps // 20), 1)
  c.diagnostics.num_prompts = 0     # LM diagnostics do not apply.
  if preset == "tiny":
    c.data.eval_batches = 1
  return c


HEAD_TYPES = ("stern", "hydra")

# Studies beyond Stern's table: "both-over-fine-tuning" is the "both"
# regime started from the fine-tuning run instead of the distillation run,
# its distillation data the fine-tuned model's greedy translations: "both"
# over a stronger model (experiments/translation_stronger_base.py).
STUDY_REGIMES = {"both-over-fine-tuning": "distill_finetune"}
STUDY_FINETUNE_FROM = {"both-over-fine-tuning": "fine-tuning"}
RUN_NAME_SUFFIX = {"both-over-fine-tuning": "_from_ft"}


def regime_config(preset: str, regime: str, head_type: str = "stern"):
  """The training config of one of Stern's regimes (k heads on the base),
  or of a study regime (STUDY_REGIMES)."""
  trainer_regimes = {**REGIMES, **STUDY_REGIMES}
  finetune_from = {**FINETUNE_FROM, **STUDY_FINETUNE_FROM}
  if regime not in trainer_regimes:
    raise ValueError(f"translation regime {regime!r} unknown; allowed: "
                     f"{tuple(trainer_regimes)}.")
  if head_type not in HEAD_TYPES:
    raise ValueError(f"translation head type {head_type!r} unknown; "
                     f"allowed: {HEAD_TYPES}.")
  p = PRESETS[preset]
  base = base_config(preset)
  c = default_config()
  # Stern's heads keep the run names and config digests they were cached
  # under: head_type is set only for other heads.
  hydra = "_hydra" if head_type == "hydra" else ""
  suffix = RUN_NAME_SUFFIX.get(regime, "")
  c.name = (f"translation_{trainer_regimes[regime]}{hydra}{suffix}_{preset}"
            f"_k{p.k}")
  c.regime = trainer_regimes[regime]
  c.base = base
  c.init_from = ""
  c.model = {"num_prediction_heads": p.k, "head_hidden": 0}
  if head_type != "stern":
    c.model.head_type = head_type
  c.data = base.data.copy_and_resolve_references()
  c.batch_size = p.batch
  steps = p.finetune_steps if regime in finetune_from else p.head_steps
  c.steps = steps
  c.optim.learning_rate = 1e-3 if regime in finetune_from else 3e-3
  c.optim.warmup_steps = max(steps // 10, 1)
  c.eval_every = c.checkpoint_every = max(steps // 4, 1)
  c.log_every = max(min(10, steps // 20), 1)
  c.diagnostics.num_prompts = 0
  c.distill.num_sequences = p.distill_pairs  # Sources the base translates.
  c.distill.batch_size = 256                 # Sources per decoding call.
  if regime in finetune_from:
    c.base = regime_config(preset, finetune_from[regime], head_type)
    c.optim.trunk_lr_scale = FINETUNE_TRUNK_LR_SCALE
    c.first_head_weight = float(p.k - 1)  # Head 1 is half of the loss.
  if preset == "tiny":
    c.data.eval_batches = 1
    c.distill.batch_size = 4
  return c


def get_config(arg="cpu"):
  preset, regime, head_type, *rest = (arg or "cpu").split(",") + ["", ""]
  if preset not in PRESETS:
    raise ValueError(f"translation preset {preset!r} unknown; allowed: "
                     f"{tuple(PRESETS)}.")
  if any(rest) or (head_type and not regime):
    raise ValueError(f"translation config {arg!r}: expected <preset>, "
                     "<preset>,<regime> or <preset>,<regime>,<head type>.")
  if not regime:
    return base_config(preset)
  return regime_config(preset, regime, head_type or "stern")
