"""The trained tiny GPT-2 and its heads, shared by the experiments.

The base run (configs/gpt2_tiny.py) is exported once as a Hugging Face
GPT2LMHeadModel folder beside its run folder; the heads (Stern's, or
Hydra's dependent heads) are trained on that folder by distillation with
configs/hf_heads.py (`heads_config`), the path a user with their own GPT-2 checkpoint
takes. Imports no torch, so `experiments/drafters.py` can use it too.
"""

from __future__ import annotations

import pathlib

import blockdec
from blockdec.training import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = str(ROOT / "configs" / "gpt2_tiny.py")
HEAD_TYPES = ("stern", "hydra")


def base_run(cache_dir: str, *, train: bool = True, required: bool = False):
  """The configs/gpt2_tiny.py run (trained when missing and `train`), with
  its HF export written beside it; when not cached and not `train`, None or
  (`required`) `pipeline.cached_run`'s error."""
  run = pipeline.cached_run(BASE, cache_dir, train=train, required=required)
  folder = ROOT / hf_folder(run) if run is not None else None
  if run is not None and not (folder / "config.json").exists():
    blockdec.export_hf_checkpoint(run.cfg, run.params, folder,
                                  tokenizer=run.tokenizer)
  return run


def hf_folder(base) -> pathlib.Path:
  """The HF GPT-2 folder exported from the `base` run; relative to the
  repository root when inside it, so the heads' config (whose key holds
  this path) is the same whether the cache was named absolute or not."""
  path = pathlib.Path(f"{base.workdir}-hf").absolute()
  return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


# configs/hf_heads.py:demo, regime distill, with more of the base's text
# than the preset's default: on 256 x 64 tokens (the cpu preset) the heads
# memorised their data (train loss 1.6, held-out 6.6 nats) and agreed with
# the base's next tokens ~0.45 of the time.
HEADS_PRESET = "demo"
HEADS_STEPS = 600
DISTILL_SEQUENCES = 2048  # x 192 tokens: ~390k tokens of the base's text.


def heads_config(base, head_type: str = "stern"):
  """configs/hf_heads.py:demo on the base's HF folder, regime distill on
  DISTILL_SEQUENCES of its greedy continuations, k = 8 heads of
  `head_type`, HEADS_STEPS steps."""
  if head_type not in HEAD_TYPES:
    raise ValueError(f"head_type={head_type!r}; allowed: {HEAD_TYPES}.")
  heads = pipeline.load_config(ROOT / "configs" / "hf_heads.py",
                               HEADS_PRESET)
  heads.hf_checkpoint = str(hf_folder(base))
  heads.regime = "distill"
  heads.steps = HEADS_STEPS
  heads.optim.warmup_steps = HEADS_STEPS // 10
  heads.eval_every = HEADS_STEPS // 2
  heads.checkpoint_every = HEADS_STEPS // 5
  heads.distill.num_sequences = DISTILL_SEQUENCES
  heads.name = f"hf_heads_distill_{HEADS_PRESET}"
  if head_type != "stern":
    heads.model.head_type = head_type
    heads.name = f"hf_heads_{head_type}_distill_{HEADS_PRESET}"
  return heads


def note(base, heads_run, head_type: str) -> str:
  """One line on where the model came from, for the results' notes."""
  return (
      f"gpt2-tiny: configs/gpt2_tiny.py trained on the stdlib ({base.workdir},"
      f" held-out {base.summary['valid']['loss']:.2f} nats/token), exported to"
      f" GPT2LMHeadModel at {hf_folder(base)}; k=8 {head_type} heads trained "
      f"on that folder by configs/hf_heads.py:{HEADS_PRESET} with "
      f"regime=distill ({DISTILL_SEQUENCES} continuations, {HEADS_STEPS} "
      f"steps)"
      f"{'' if head_type == 'stern' else ', model.head_type=' + head_type} "
      f"({heads_run.workdir}).")
