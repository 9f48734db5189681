"""Pallas kernels with pure-jnp references; they know nothing of models.

Installed as ``blockdec.kernels``. Example::

    from blockdec import kernels
    out = kernels.block_attention(q, k_cache, v_cache, offsets,
                                  kernels.CausalBlockMask(T))
"""

from blockdec.kernels.block_attention import BlockSizes
from blockdec.kernels.block_attention import block_attention
from blockdec.kernels.block_attention import block_attention_reference
from blockdec.kernels.block_attention import skipped_kv_tile_fraction
from blockdec.kernels.masks import AndMask
from blockdec.kernels.masks import BlockBidirectionalMask
from blockdec.kernels.masks import BlockMask
from blockdec.kernels.masks import CausalBlockMask
from blockdec.kernels.masks import materialize_mask
from blockdec.kernels.masks import OrMask
from blockdec.kernels.masks import PatternMask
from blockdec.kernels.masks import RuntimeMask
from blockdec.kernels.masks import RuntimePatternMask
from blockdec.kernels.masks import RuntimeTreeMask
from blockdec.kernels.masks import TreeMask
