"""Drafters of the draft-and-verify core (`core.Drafter`): one file each."""

from blockdec.decoding.drafters.heads import HeadsDrafter
from blockdec.decoding.drafters.refined import (DraftOptions, NeuralRescorer,
                                                RefinedDrafter)
