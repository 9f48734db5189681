"""Model-agnostic decoding loops: they receive a scoring callable, never a model.

`core.run` is the draft-and-verify loop every method runs (a drafter from
`drafters/`, a verifier from `verify.py` / `acceptance.py`); `greedy.py` is
the plain reference loop.
"""

from blockdec.decoding.acceptance import (AcceptAll, AcceptanceRule, Distance,
                                          Exact,
                                          MinBlock, TopK,
                                          accepted_prefix_length)
from blockdec.decoding.adaptive import AdaptiveBlockSize
from blockdec.decoding.blockwise import blockwise_decode
from blockdec.decoding.core import Draft, Drafter, NoDrafter, View
from blockdec.decoding.drafters import HeadsDrafter, RefinedDrafter
from blockdec.decoding.greedy import greedy_decode
from blockdec.decoding.sampling import Sampling
from blockdec.decoding.state import (DecodeOptions, DecodeOutput, DecodeState,
                                     ScoreFn, SplitScoreFn)
from blockdec.decoding.lattice import (DraftTree, DynamicTree, Lattice,
                                      RowTree, top_k_lattice)
from blockdec.decoding.multidraft import (DraftOptions, NeuralRescorer,
                                          refined_blockwise_decode)
from blockdec.decoding.ngram import NGramLM
from blockdec.decoding.verify import (SpeculativeSampling, Typical, Verdict,
                                      Verifier)
