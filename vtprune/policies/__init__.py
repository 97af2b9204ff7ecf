"""Pruning policies. Each is a dataclass; `vtprune.available_policies()` lists them by name."""

from .base import LLMStagePolicy, Pipeline, Policy, Selection, available_policies, make_policy, register
from .baselines import Fixed, Pooling, Random
from .cdpruner import CDPruner
from .divprune import DivPrune
from .entropyprune import EntropyPrune
from .fastv import FastV
from .hiprune import HiPrune
from .holov import HoloV
from .idpruner import IDPruner
from .mmtok import MMTok
from .transprune import TransPrune
from .visionzip import VisionZip

__all__ = [
    "CDPruner",
    "DivPrune",
    "EntropyPrune",
    "FastV",
    "Fixed",
    "HiPrune",
    "HoloV",
    "IDPruner",
    "MMTok",
    "LLMStagePolicy",
    "Pipeline",
    "Policy",
    "Pooling",
    "Random",
    "Selection",
    "TransPrune",
    "VisionZip",
    "available_policies",
    "make_policy",
    "register",
]
