r"""A tiny GPT-2 trained on the embedded corpus (head 1 only).

The GPT-2 architecture (LayerNorm with bias, GELU MLP, learned absolute
positions, biases on every projection, tied embeddings) with a BPE
vocabulary trained on the corpus, so that the GPT-2 family can be
benchmarked with weights that say something: `experiments/hf_peers.py`
exports this run as a `GPT2LMHeadModel` folder and trains proposal heads
on that folder with `configs/hf_heads.py`, the path a user with their own
GPT-2 checkpoint takes.

Launch (from the repository root):

  blockdec train --config configs/gpt2_tiny.py            # ~3 minutes on 2 cores
  blockdec train --config configs/gpt2_tiny.py --config.steps=2000

Every field is documented in blockdec/training/defaults.py.
"""

import pathlib

from blockdec.training.pipeline import load_config


def get_config(arg=None):
  del arg  # One size.
  c = load_config(pathlib.Path(__file__).with_name("base_lm.py"), "cpu")
  c.name = "gpt2_tiny"
  c.model.norm = "layernorm"     # GPT-2: LayerNorm with bias ...
  c.model.norm_eps = 1e-5        # ... and its epsilon,
  c.model.mlp = "gelu"           # a GELU MLP (4 * d_model wide),
  c.model.position = "learned"   # learned absolute positions,
  c.model.qkv_bias = True        # biases on q, k, v ...
  c.model.proj_bias = True       # ... and on the output and MLP projections.
  c.data.tokenizer = "bpe"       # Subword tokens, as GPT-2 (its own 50257 ...
  c.data.bpe_vocab_size = 2048   # ... would be mostly unused on 11 MB).
  c.steps = 1500                 # 1500 x 16 x 128 tokens.
  c.eval_every = 500
  c.checkpoint_every = 250
  return c
