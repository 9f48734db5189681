r"""Sequence-level distillation (Stern sec. 4): heads learn the base model's own output.

The base model greedily continues `distill.num_sequences` prefixes of the
training split (with blockdec.blockwise_decode, exact, cached on disk next to
the run); the heads train on those continuations with the base frozen.
`--config.regime=distill_finetune` fine-tunes everything on that data instead
("both" in Stern's table).

Launch (from the repository root):

  blockdec train --config configs/heads_distill.py:cpu
  blockdec train --config configs/heads_distill.py:cpu --config.regime=distill_finetune

With `init_from` empty the base LM of the same preset is trained or reused
first. Presets: tiny, cpu, demo, mid, gpu.
"""

import pathlib

from blockdec.training.pipeline import load_config_module


def _heads_config():
  """configs/heads_frozen.py's `heads_config(arg, regime)`."""
  return load_config_module(
      pathlib.Path(__file__).with_name("heads_frozen.py")).heads_config


def get_config(arg="gpu"):
  return _heads_config()(arg, "distill")
