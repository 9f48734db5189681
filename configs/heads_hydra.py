r"""Hydra's dependent heads on a frozen base LM (Ankner et al. 2024).

Head j >= 2 reads the trunk's final hidden state and the embeddings of the
j - 1 tokens before its target (`ModelConfig.head_type="hydra"`); at
decoding time those are the decided token and the drafts of the heads
before it, so a head knows what the chain says so far. Only
params["proposal_heads"] train, with teacher forcing (each head reads the
true tokens before its target); the trunk and head 1 stay bit-for-bit the
base's, so exact decoding (`blockdec.Blockwise` on this model) reproduces
the base's greedy output.

Launch (from the repository root):

  blockdec train --config configs/heads_hydra.py:demo            # corpus text
  blockdec train --config configs/heads_hydra.py:demo_distill    # the base's
                                                                 # greedy text

`<preset>` trains on the corpus (Stern's "frozen" regime); `<preset>_distill`
on the base's own greedy continuations (the "distill" regime, sharing the
cached continuations of configs/heads_distill.py). With `init_from` empty
the base LM of the same preset is trained or reused first. Presets: tiny,
cpu, demo, mid, gpu.
"""

import pathlib

from blockdec.training.pipeline import load_config_module


def get_config(arg="gpu"):
  arg = arg or "gpu"
  distill = arg.endswith("_distill")
  preset = arg[:-len("_distill")] if distill else arg
  heads_config = load_config_module(
      pathlib.Path(__file__).with_name("heads_frozen.py")).heads_config
  c = heads_config(preset, "distill" if distill else "frozen")
  c.name = f"heads_hydra_{arg}"  # Run folder prefix.
  c.model.head_type = "hydra"    # Heads read the tokens before their target.
  return c
