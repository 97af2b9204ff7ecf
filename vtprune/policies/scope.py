"""SCOPE: saliency-weighted greedy coverage of each view's cosine-similarity structure, vision stage."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from ..checks import check_int, check_number
from ..context import StageContext
from ..ops.leaders import scope_select
from .base import Policy, Selection, Signals, register
from .vision_views import (
    check_saliency,
    resolve_layer,
    resolve_saliency,
    select_per_view_by_saliency,
)
from .vit_layer import check_vit_layer, layer_at_most, resolve_vit_layer

COMBINES = ("multi", "add")


@register
@dataclass(frozen=True)
class Scope(Policy):
    """Keep the tokens that add the most saliency-weighted soft coverage of the image.

    Source: "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient
    Multimodel LLMs" (Deng et al., NeurIPS 2025; code kinredon/SCOPE,
    ``scope/clip_encoder.py`` at 6bf7306). Per view with budget t: X = the
    ViT feature-layer rows (CLIP: layer -2, the projector's input), S = their
    cosine matrix (rows divided by their L2 norm), w = saliency ** alpha;
    t times the unpicked token j maximising gain_j * w_j (``combine="multi"``)
    or gain_j + w_j (``"add"``) is kept, gain_j = sum_i max(0, S_ij - cover_i),
    and cover = max(cover, S_j) (soft facility location; ties: the lowest
    index). Kept tokens ascending, original positions; CLS is never kept.

    Signals: CLIP (LLaVA-1.5, LLaVA-NeXT): the CLS attention of the feature
    layer summed over heads, read through the ViT probe (the model never
    returns attention weights). Encoders without CLS (SigLIP in
    LLaVA-OneVision, every Qwen ViT; the official code has none): the
    attention each token receives from its own attention segment at the
    feature layer (Qwen: the last block; merge units averaged, raster order)
    and, as features, the feature-layer rows (SigLIP) or the merger's input
    rows averaged over each 2x2 merge unit (Qwen).

    Views and budgets: exactly ``keep`` per image. LLaVA-NeXT: the base view
    and each crop separately (values from the crop's own CLS row), ``keep //
    views`` each, the remainder to the base view; a view smaller than its
    share keeps all and passes the rest on. LLaVA-OneVision: its base and
    high-resolution views; a video: its frames.

    Departures from the official code: budgets per image and per view (the
    reference gives every crop ``int(T / B)``, B counting the crops of the
    whole batch: keep=64 on 5 crops keeps 16 + 4 x 12 here, 5 x 12 there;
    equal at keep=160); HF's LLaVA-NeXT packing kept (unpad, newlines; the
    reference drops both), so crop keep sets agree on images with nothing to
    unpad; fp32 selection (the reference's fp16 gains tie often); kept
    tokens keep their original positions (the reference feeds them
    contiguously). ``combine="add"`` is refused on encoders without CLS
    (its sum needs the reference's saliency scale, which only CLIP has).

    Parameters:
        keep: tokens per image (int) or fraction (float in (0, 1]); default 64.
        alpha: exponent of the saliency (the reference's ``ALPHA``); default 1.0.
        combine: ``"multi"`` (gain x saliency, the reference default) or ``"add"``.
        saliency: ``"cls"`` or ``"received"``; None: the model's default
            (model_zoo.yaml: cls on CLIP, received otherwise).
        layer: 1-based ViT layer whose attention gives the saliency (the
            features stay the projector's input); None: the layer whose
            output is the visual feature (CLIP: second to last; Qwen: the
            last block).
        vit_layer: select inside the vision encoder after its k-th block
            (`vtprune.policies.vit_layer`): saliency and features are read at
            layer ``layer`` (<= k; None: k), the features being the hidden
            states leaving block k; None (default): after the encoder.
    """

    keep: int | float = 64
    alpha: float = 1.0
    combine: str = "multi"
    saliency: str | None = None
    layer: int | None = None
    vit_layer: int | None = None

    name: ClassVar[str] = "scope"
    stage: ClassVar[str] = "vision"
    paper: ClassVar[str] = "SCOPE (NeurIPS 2025), code kinredon/SCOPE"
    zoo_fields: ClassVar[tuple[str, ...]] = ("saliency",)
    whole_grid: ClassVar[bool] = True
    after_pixelprune: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.name, "alpha", self.alpha, 0, 100)
        if self.combine not in COMBINES:
            raise ValueError(f"scope: combine must be one of {COMBINES}; got {self.combine!r}")
        check_saliency(self.name, self.saliency)
        check_int(self.name, "layer (a 1-based layer number)", self.layer, minimum=1, allow_none=True)
        check_vit_layer(self.name, self.vit_layer)

    def resolve(self, adapter) -> Policy:
        resolve_vit_layer(self.name, adapter, self.vit_layer)
        layer = resolve_layer(self.name, adapter, layer_at_most(self.name, "layer", self.layer, self.vit_layer))
        saliency = resolve_saliency(self.name, adapter, self.saliency)
        if self.combine == "add" and saliency != "cls":
            raise ValueError(
                "scope: combine='add' sums gains with the CLS attention's scale; this model's saliency is "
                f"{saliency!r} (use combine='multi')"
            )
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
                lambda rows, sal, t: scope_select(rows, sal, t, self.alpha, self.combine),
            )
        )

    def describe(self) -> str:
        at = "" if self.vit_layer is None else f", vit@{self.vit_layer}"
        return f"scope(combine={self.combine}{at})"
