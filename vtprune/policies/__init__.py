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
from .prunesid import PruneSID
from .scope import Scope
from .transprune import TransPrune
from .visionzip import VisionZip
from .vispruner import VisPruner

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
    "Policy",
    "Pooling",
    "PruneSID",
    "Random",
    "Scope",
    "Selection",
    "Signals",
    "TransPrune",
    "VisionZip",
    "VisPruner",
    "available_policies",
    "make_policy",
    "policy_table",
    "register",
]
