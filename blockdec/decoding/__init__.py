"""Model-agnostic decoding loops: they receive a scoring callable, never a model."""

from blockdec.decoding.acceptance import (AcceptanceRule, Distance, Exact,
                                          MinBlock, TopK,
                                          accepted_prefix_length)
from blockdec.decoding.adaptive import AdaptiveBlockSize
from blockdec.decoding.blockwise import blockwise_decode
from blockdec.decoding.greedy import greedy_decode
from blockdec.decoding.state import (DecodeOptions, DecodeOutput, DecodeState,
                                     ScoreFn, SplitScoreFn)
from blockdec.decoding.lattice import DraftTree, Lattice, top_k_lattice
from blockdec.decoding.multidraft import (DraftOptions, NeuralRescorer,
                                          refined_blockwise_decode)
from blockdec.decoding.ngram import NGramLM
