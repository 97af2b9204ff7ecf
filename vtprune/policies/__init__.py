"""Pruning policies. Each is a dataclass; `vtprune.available_policies()` lists them by name."""

from .base import (
    AnyStagePolicy,
    LLMStagePolicy,
    Pipeline,
    Policy,
    Selection,
    Signals,
    available_policies,
    make_policy,
    policy_table,
    register,
)
from .baselines import Fixed, Pooling, Random
from .divprune import DivPrune
from .entropyprune import EntropyPrune
from .fastv import FastV
from .hiprune import HiPrune
from .idpruner import IDPruner
from .mmtok import MMTok
from .pixelprune import PixelPrune
from .transprune import TransPrune
from .visionzip import VisionZip

__all__ = [
    "AnyStagePolicy",
    "DivPrune",
    "EntropyPrune",
    "FastV",
    "Fixed",
    "HiPrune",
    "IDPruner",
    "MMTok",
    "LLMStagePolicy",
    "Pipeline",
    "PixelPrune",
    "Policy",
    "Pooling",
    "Random",
    "Selection",
    "Signals",
    "TransPrune",
    "VisionZip",
    "available_policies",
    "make_policy",
    "policy_table",
    "register",
]
