"""DivPrune: max-min diversity of the post-projector visual tokens, at the projector stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..context import StageContext
from ..ops.diversity import divprune_select
from .base import Policy, Selection, register


@register
@dataclass(frozen=True)
class DivPrune(Policy):
    """Keep the most diverse visual tokens of each image (greedy max-min on cosine distance).

    Source: "DivPrune: Diversity-based Visual Token Pruning for Large
    Multimodal Models" (CVPR 2025, code vbdi/divprune). Follows the official
    code (`vtprune.ops.diversity.divprune_select`): distance ``1 - cosine`` of
    the post-projector features; the first pick is the token whose nearest
    other token is farthest; then repeatedly the token farthest from the
    picked set. Per image, ``K = round(N * keep)`` for a fraction. The
    reference prunes before the sequence is built, so its positions are
    compact (``positions="compact"`` reproduces them); ours default to original.

    Parameters:
        keep: tokens per image (int) or fraction (float in (0, 1]); default 64.
    """

    keep: int | float = 64

    name: ClassVar[str] = "divprune"
    paper: ClassVar[str] = "DivPrune (CVPR 2025), code vbdi/divprune"
    stage: ClassVar[str] = "projector"
    rounding: ClassVar[str] = "round"

    def select_image(self, ctx: StageContext, b: int, i: int, k: int) -> Selection:
        features = ctx.features(b, i)
        if k >= features.shape[0]:
            return Selection(torch.arange(features.shape[0], device=features.device))
        return Selection(divprune_select(features, k))
