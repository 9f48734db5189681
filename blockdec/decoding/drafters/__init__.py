"""Drafters of the draft-and-verify core (`core.Drafter`): one file each."""

from blockdec.decoding.drafters.heads import HeadsDrafter
from blockdec.decoding.drafters.refined import (DraftOptions, NeuralRescorer,
                                                RefinedDrafter)
from blockdec.decoding.drafters.draft_model import DraftModelDrafter
from blockdec.decoding.drafters.prompt_lookup import PromptLookupDrafter
from blockdec.decoding.drafters.lookahead import LookaheadDrafter
from blockdec.decoding.drafters.block_diffusion import BlockDiffusionDrafter
from blockdec.decoding.drafters.eagle import EagleDrafter
from blockdec.decoding.drafters.hydra import HydraDrafter
