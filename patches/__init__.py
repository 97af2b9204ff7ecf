"""Model adapters, one module per family, chosen by ``config.model_type``.

`ADAPTERS` is the one table of supported model types: the API, the tiny
test models, the demo, ``calibrate-ecl``, the test fixtures and the
lmms-eval runner all read it. A family's module holds its adapter and, as
the adapter's ``spec``, its `FamilySpec` (tiny model and inputs, demo,
bench, show); a new family is that module plus its row here.
"""

from __future__ import annotations

from torch import nn

from .base import Adapter
from .family import FamilySpec
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_5 import Qwen3_5Adapter
from .qwen3_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    cls.model_type: cls
    for cls in (
        LlavaAdapter,
        LlavaNextAdapter,
        Qwen2VLAdapter,
        Qwen2_5_VLAdapter,
        LlavaOnevisionAdapter,
        Qwen3_5Adapter,
        Qwen3VLAdapter,
        Qwen3VLMoeAdapter,
    )
}


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values vtprune can wrap (the keys of `ADAPTERS`), sorted."""
    return sorted(ADAPTERS)


def supported_pixel_prune() -> list[str]:
    """The model types whose adapter runs the vision tower on a subset of the patches (PixelPrune), sorted."""
    return sorted(t for t, cls in ADAPTERS.items() if cls.pixel_prune)


def supported_vit_prune() -> list[str]:
    """The model types whose adapter prunes inside the vision tower, after one of its blocks (``vit_layer``), sorted."""
    return sorted(t for t, cls in ADAPTERS.items() if cls.vit_prune)


def supported_pixel_then_vit() -> list[str]:
    """The model types whose adapter prunes before the vision tower and again inside it (PixelPrune, then a
    ``vit_layer`` policy), sorted."""
    return sorted(t for t, cls in ADAPTERS.items() if cls.pixel_then_vit)


def supported_video() -> list[str]:
    """The model types whose adapter takes videos (the video policies' families), sorted."""
    return sorted(t for t, cls in ADAPTERS.items() if cls.videos)


def supported_video_demo() -> list[str]:
    """The model types whose `FamilySpec` builds demo video inputs (``vtprune show --video``, the video bench)."""
    return sorted(t for t, cls in ADAPTERS.items() if cls.spec.video_demo)


def family_spec(model_type: str) -> FamilySpec:
    """The `FamilySpec` of a supported ``config.model_type``; a clear error for anything else."""
    if model_type not in ADAPTERS:
        raise ValueError(f"unknown family {model_type!r}; choose from {tuple(supported_model_types())}")
    return ADAPTERS[model_type].spec


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for `model`, matched on ``config.model_type``; a clear error for anything else."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model type {model_type!r} ({type(model).__name__}); "
            f"vtprune supports: {', '.join(supported_model_types())}"
        )
    return ADAPTERS[model_type](model)


__all__ = [
    "ADAPTERS",
    "Adapter",
    "FamilySpec",
    "adapter_for",
    "family_spec",
    "supported_model_types",
    "supported_pixel_prune",
    "supported_video",
    "supported_pixel_then_vit",
    "supported_vit_prune",
]
