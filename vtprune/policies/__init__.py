"""Pruning policies. Each is a dataclass; `vtprune.available_policies()` lists them by name."""

from .base import LLMStagePolicy, Pipeline, Policy, Selection, available_policies, make_policy, register
from .baselines import Pooling, Random

__all__ = [
    "LLMStagePolicy",
    "Pipeline",
    "Policy",
    "Pooling",
    "Random",
    "Selection",
    "available_policies",
    "make_policy",
    "register",
]
