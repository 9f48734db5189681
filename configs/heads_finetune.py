r"""All parameters fine-tuned jointly on the k head losses (Stern sec. 4).

The loss is the mean of the k per-head losses (head 1 included); see
blockdec/training/losses.py for why the mean and not Stern's one sampled head.
Head 1 changes, so blockwise output equals the FINE-TUNED model's greedy
output, not the original base model's.

Launch (from the repository root):

  blockdec train --config configs/heads_finetune.py:cpu
  blockdec train --config configs/heads_finetune.py:gpu --config.optim.learning_rate=3e-4

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
  c = _heads_config()(arg, "finetune")
  c.optim.learning_rate /= 3  # The trunk moves too: a gentler peak rate.
  return c
