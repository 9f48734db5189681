"""The Transformer trunk, proposal heads and KV cache."""

from blockdec.models.kv_cache import KVCache
from blockdec.models.transformer import (Transformer, apply, forward_logits,
                                         init_params, make_cache)
