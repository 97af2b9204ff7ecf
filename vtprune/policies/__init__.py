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
from .cdpruner import CDPruner
from .dart import DART
from .divprune import DivPrune
from .entropyprune import EntropyPrune
from .fastv import FastV
from .hiprune import HiPrune
from .holov import HoloV
from .idpruner import IDPruner
from .mmtok import MMTok
from .pdrop import PyramidDrop
from .pixelprune import PixelPrune
from .prunesid import PruneSID
from .scope import Scope
from .sparsevlm import SparseVLM
from .transprune import TransPrune
from .video import EVS, DyCoke, FastVID, VidCom2
from .visionzip import VisionZip
from .vispruner import VisPruner

__all__ = [
    "AnyStagePolicy",
    "DART",
    "CDPruner",
    "DivPrune",
    "DyCoke",
    "EVS",
    "EntropyPrune",
    "FastV",
    "FastVID",
    "Fixed",
    "HiPrune",
    "HoloV",
    "IDPruner",
    "MMTok",
    "LLMStagePolicy",
    "Pipeline",
    "PixelPrune",
    "Policy",
    "Pooling",
    "PyramidDrop",
    "PruneSID",
    "Random",
    "Scope",
    "Selection",
    "Signals",
    "SparseVLM",
    "TransPrune",
    "VidCom2",
    "VisionZip",
    "VisPruner",
    "available_policies",
    "make_policy",
    "policy_table",
    "register",
]
