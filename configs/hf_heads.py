r"""Proposal heads 2..k trained on a frozen pretrained HF checkpoint.

The base model is a local Hugging Face folder (config.json, model.safetensors
or a sharded index, tokenizer.json) of a GPT-2 or Llama-family model, read by
`blockdec.load_hf_checkpoint`. Only params["proposal_heads"] train (the
"frozen" regime, configs/heads_frozen.py), on the corpus tokenized with the
checkpoint's own tokenizer.json; the pretrained weights stay bit-for-bit
unchanged, so exact blockwise decoding reproduces the checkpoint's greedy
output. Export the result with `blockdec.export_hf_checkpoint`: the heads go
to blockdec_heads.safetensors beside the HF weights.

Launch (from the repository root):

  blockdec train --config configs/hf_heads.py:cpu \
      --config.hf_checkpoint=path/to/gpt2
  blockdec train --config configs/hf_heads.py:gpu \
      --config.hf_checkpoint=path/to/llama --config.data.seq_len=512

Presets (tiny, cpu, demo, gpu) set k, steps, learning rate and batch size as
in configs/heads_frozen.py. `--config.regime=distill` trains the heads on
the checkpoint's own greedy continuations instead of the corpus (Stern's
sequence-level distillation; the base still stays frozen), which suits a
weak or off-domain checkpoint whose greedy output the corpus does not look
like (experiments/hf_peers.py does this for its tiny GPT-2). A checkpoint without tokenizer.json fails with a
clear error; `blockdec.export_hf_checkpoint(..., tokenizer=...)` writes one
(a byte-level model gets `blockdec.models.hf.byte_tokenizer()`).
"""

import pathlib

from blockdec.training.pipeline import load_config_module


def _heads_config():
  """configs/heads_frozen.py's `heads_config(arg, regime)`."""
  return load_config_module(
      pathlib.Path(__file__).with_name("heads_frozen.py")).heads_config


def get_config(arg="gpu"):
  c = _heads_config()(arg, "frozen")
  c.name = f"hf_heads_{arg or 'gpu'}"  # Run folder prefix.
  c.hf_checkpoint = ""         # The HF checkpoint folder (required).
  # The trainer starts head regimes from `init_from`, which loads HF folders
  # too (blockdec.checkpointing.load_checkpoint); it follows hf_checkpoint,
  # so --config.hf_checkpoint=... on the command line sets both.
  c.init_from = c.get_ref("hf_checkpoint")
  c.base = None                # No base LM to train: the checkpoint is the base.
  return c
