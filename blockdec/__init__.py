"""blockdec: blockwise parallel decoding for JAX/Flax language models.

    import blockdec
    cfg = blockdec.ModelConfig(vocab_size=256, d_model=128, n_layers=2,
                               n_heads=4, num_prediction_heads=4)
    params = blockdec.init_params(cfg, jax.random.key(0))
    out = blockdec.decode(params, cfg, prompts, prompt_lengths, 64,
                          method=blockdec.Blockwise(block_size=4))
    sampled = blockdec.decode(params, cfg, prompts, prompt_lengths, 64,
                              sampling=blockdec.Sampling(temperature=0.6),
                              key=jax.random.key(0))
"""

from blockdec.api import (HostArraysWarning, blockwise_decode, check_params,
                          decode, forward_logits, greedy_decode, init_params,
                          model_score_fn)
from blockdec.checkpointing import load_checkpoint, save_checkpoint
# Verification call costs on this machine (for AdaptiveBlockSize).
from blockdec.calibration import measure_call_costs
from blockdec.config import ModelConfig
from blockdec.decoding import (AcceptAll, AcceptanceRule, AdaptiveBlockSize,
                               DecodeOutput, Distance, DraftTree,
                               DynamicTree, Exact, MinBlock, Sampling, SpeculativeSampling, TopK, Typical,
                               Verifier)
from blockdec.methods import (Autoregressive, BlockDiffusion, Blockwise,
                              DraftModel, Eagle, Lookahead, Method,
                              PromptLookup, Refined)
from blockdec.models import KVCache
from blockdec.models.hf import (export_hf_checkpoint, load_hf_checkpoint,
                                load_hf_tokenizer)
from blockdec.sharding import ShardingConfig, make_mesh, shard_params

# Refined block drafts (Kim et al. 2024): lattice rescoring, multi-draft.
from blockdec.api import refined_blockwise_decode
from blockdec.decoding import NGramLM
# Static token-tree shapes from measured acceptance (Sequoia-style).
from blockdec.decoding import tree_shapes

__version__ = "0.1.0"
