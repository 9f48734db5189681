"""Model-agnostic decoding loops: they receive a scoring callable, never a model."""

from blockdec.decoding.acceptance import (AcceptanceRule, Distance, Exact,
                                          MinBlock, TopK,
                                          accepted_prefix_length)
from blockdec.decoding.blockwise import blockwise_decode
from blockdec.decoding.greedy import greedy_decode
from blockdec.decoding.state import (DecodeOptions, DecodeOutput, DecodeState,
                                     ScoreFn)
