"""vtprune: visual-token pruning for HuggingFace multimodal LLMs.

    import vtprune
    vtprune.wrap(model, "random", keep=64)   # the one line
    model.generate(**inputs)
    print(vtprune.report(model))
    vtprune.unwrap(model)
"""

from . import policies
from .api import is_wrapped, pruned, report, unwrap, wrap
from .patches import supported_model_types
from .policies import Pipeline, available_policies

__version__ = "0.1.0"

__all__ = [
    "Pipeline",
    "available_policies",
    "is_wrapped",
    "policies",
    "pruned",
    "report",
    "supported_model_types",
    "unwrap",
    "wrap",
]
