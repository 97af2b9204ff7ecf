"""VisPruner: important tokens by attention, then diverse tokens by removing the most duplicated, vision stage."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from ..checks import check_int, check_number
from ..context import StageContext
from ..ops.leaders import vispruner_select
from .base import Policy, Selection, Signals, register
from .vision_views import (
    check_saliency,
    resolve_layer,
    resolve_saliency,
    select_per_view_by_saliency,
)
from .vit_layer import check_vit_layer, layer_at_most, resolve_vit_layer


@register
@dataclass(frozen=True)
class VisPruner(Policy):
    """Keep the most attended tokens, then a diverse set from the rest.

    Source: "Beyond Text-Visual Attention: Exploiting Visual Cues for
    Effective Token Pruning in VLMs" (Zhang et al., ICCV 2025; code
    Theia-4869/VisPruner, ``llava/model/llava_arch.py:144-183`` at aefa01a).
    Per view with budget t: T_imp = int(t * important_ratio) tokens with the
    highest saliency (ties: the lowest index) are important; the others stay
    in saliency-descending order. Rounds: while the list is longer than
    T_div = t - T_imp, it is split into its entries at even positions (A)
    and odd positions (B); the min(8, R - T_div) entries of A with the
    highest cosine to any entry of B are removed, and the list becomes the
    surviving A (by that similarity, descending; ties: lowest index), then B.
    Kept: the important tokens and the final list, ascending, original
    positions; CLS is never kept. Features: the ViT feature-layer rows (the
    projector's input; Qwen: the merger's input averaged per 2x2 merge unit).

    Signals: CLIP: the feature layer's CLS attention (the reference averages
    over heads; vtprune ranks by the head sum, the same order), through the
    ViT probe. No CLS (SigLIP, Qwen ViTs; no official code): the attention
    each token receives in its own attention segment at the feature layer.

    Views and budgets: exactly ``keep`` per image; LLaVA-NeXT's base view and
    crops, LLaVA-OneVision's base and high-resolution views, video frames
    each get ``keep // views``, the remainder to the base view (a view
    smaller than its share passes the rest on).

    Departures from the official code: a list of odd length R makes the
    reference index past its even entries (IndexError: keep 66 or 70 at
    ratio 0.5 on 576 tokens); vtprune pairs even with odd positions as
    intended, so every budget works. A round asked to remove more than the
    even entries (tiny views) removes all of them and continues (the
    reference raises). Budgets per image and view: the reference forces
    LLaVA-NeXT to 5 crops and gives each crop ``T`` (keep=160 here is its
    32 x 5); HF's grid, unpad and newlines are kept. fp32 arithmetic (the
    reference's is fp16). Tie-sensitive: one near-tie decided differently
    changes every later round.

    Parameters:
        keep: tokens per image (int) or fraction (float in (0, 1]); default 64.
        important_ratio: share of the budget taken by saliency, floored
            (0.5 default; the reference README uses 0.75 for MME at 64).
        saliency: ``"cls"`` or ``"received"``; None: the model's default.
        layer: 1-based ViT layer of the saliency; None: the feature layer.
        vit_layer: select inside the vision encoder after its k-th block
            (`vtprune.policies.vit_layer`): saliency and features are read at
            layer ``layer`` (<= k; None: k), the features being the hidden
            states leaving block k; None (default): after the encoder.
    """

    keep: int | float = 64
    important_ratio: float = 0.5
    saliency: str | None = None
    layer: int | None = None
    vit_layer: int | None = None

    name: ClassVar[str] = "vispruner"
    stage: ClassVar[str] = "vision"
    paper: ClassVar[str] = "VisPruner (ICCV 2025), code Theia-4869/VisPruner"
    zoo_fields: ClassVar[tuple[str, ...]] = ("saliency",)
    whole_grid: ClassVar[bool] = True
    after_pixelprune: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.name, "important_ratio", self.important_ratio, 0, 1)
        check_saliency(self.name, self.saliency)
        check_int(self.name, "layer (a 1-based layer number)", self.layer, minimum=1, allow_none=True)
        check_vit_layer(self.name, self.vit_layer)

    def resolve(self, adapter) -> Policy:
        resolve_vit_layer(self.name, adapter, self.vit_layer)
        layer = resolve_layer(self.name, adapter, layer_at_most(self.name, "layer", self.layer, self.vit_layer))
        saliency = resolve_saliency(self.name, adapter, self.saliency)
        return replace(self, layer=layer, saliency=saliency)

    def _resolved(self) -> tuple[int, str]:
        layer, saliency = self.resolved("layer", "saliency")
        return layer - 1, saliency

    def signals(self) -> Signals:
        prune = (self.vit_layer,) if self.vit_layer is not None else ()
        return Signals(vision_inputs=(self._resolved()[0],), encoder_prune=prune)

    def select_image(self, ctx: StageContext, b: int, i: int, k: int) -> Selection:
        layer, saliency = self._resolved()
        return Selection(
            select_per_view_by_saliency(
                ctx,
                b,
                i,
                k,
                layer,
                saliency,
                lambda rows, sal, t: vispruner_select(rows, sal, t, self.important_ratio),
            )
        )

    def describe(self) -> str:
        at = "" if self.vit_layer is None else f", vit@{self.vit_layer}"
        return f"vispruner(important_ratio={self.important_ratio}{at})"
