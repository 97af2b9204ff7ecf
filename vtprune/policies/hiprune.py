"""HiPrune: hierarchical ViT attention (object-layer anchors and buffers, deep-layer registers), vision stage."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..checks import check_bool, check_int, check_number
from ..context import StageContext
from ..ops.select import sanitize_scores, topk_indices
from .base import Policy, Selection, Signals, probe_depth, register
from .vit_layer import check_vit_layer, layer_at_most, resolve_vit_layer


@register
@dataclass(frozen=True)
class HiPrune(Policy):
    """Keep anchors, their buffers and registers chosen from two ViT layers' attention.

    Source: "HiPrune: Training-Free Visual Token Pruning via Hierarchical
    Attention in Vision-Language Models" (code Danielement321/HiPrune). The
    score of a patch at a ViT layer is the attention it receives, summed
    over all queries, mean over heads (`StageContext.vision_attention`,
    computed by the ViT probe from the layer's captured input: the ViT keeps
    SDPA/FlashAttention). CLIP (LLaVA): CLS query included, CLS column
    dropped. Qwen2-VL / Qwen2.5-VL: the queries of the same attention segment
    as the block itself uses (a window, or the whole image / video frame on
    full-attention blocks; the reference's eager path; its FlashAttention
    path takes a softmax across all images and windows), the 4 patch scores of
    each 2x2 merge unit averaged and the window permutation undone, so scores
    follow the merged tokens' raster order (the reference also softmaxes the
    merged scores: a monotone map, same ranking). With budget N' per image:
    anchors are the top ``round(alpha * N' / 5)`` tokens by the object
    layer's score; buffers are each anchor's neighbours at flat index +-1 and
    +-grid width, clamped to the grid as the reference does (no row-wrap check
    unless ``wrap_correct``), with each image's own (merged) grid width (the
    Qwen reference uses the first image's width for every image); registers
    fill the rest with the top deep-layer scores among tokens not yet chosen
    (excluded with -inf; the reference subtracts 1, which can under-fill).
    Exactly N' tokens are kept. LLaVA-NeXT views and Qwen video frames are
    separate grids (neighbours stay in their view or frame). Budgets are per
    image (the Qwen reference pools the sample's images, batch size 1).
    Positions: original (the LLaVA reference compacts; the Qwen one keeps the
    original M-RoPE positions).

    After PixelPrune (``Pipeline([PixelPrune(), HiPrune(...)])``, ours: the
    reference prunes full grids): the image's tokens are PixelPrune's kept
    units and both layers' scores are the tower's as it ran on them
    (attention received over the kept units only). Anchors are the top kept
    units; an anchor's buffers are its grid neighbours (of its grid
    position, clamped as above) that PixelPrune kept: a dropped neighbour
    is not kept and its share of the budget goes to the registers, so
    exactly N' tokens are still kept (the budget counts from the image's
    unpruned token count, capped at the kept units). Registers come from
    the kept units. With ``vit_layer=k`` the same selection runs inside the
    tower, whose blocks before k ran on PixelPrune's units.

    Parameters:
        keep: tokens per image (int) or fraction; default 64.
        alpha: share of the budget spent on anchors and buffers; default 0.1.
        object_layer: 1-based ViT layer of the anchors; None is the per-model
            default from model_zoo.yaml (9 for CLIP-L/336, block 16 for the
            32-block Qwen ViTs). A layer the ViT does not have is an error at
            wrap time (no clamping: tiny test models pass layers explicitly).
        deep_layer: 1-based ViT layer of the registers; None is the layer
            whose output is the model's visual feature (CLIP: second to last;
            Qwen: the last block).
        wrap_correct: drop +-1 neighbours that wrap to another row; default False.
        vit_layer: select inside the vision encoder after its k-th block
            (`vtprune.policies.vit_layer`): the registers' deep layer is k
            (a given ``deep_layer`` must be <= k) and the anchors are read at
            ``min(object_layer, k)``; None (default): after the encoder.
    """

    keep: int | float = 64
    alpha: float = 0.1
    object_layer: int | None = None
    deep_layer: int | None = None
    wrap_correct: bool = False
    vit_layer: int | None = None

    name: ClassVar[str] = "hiprune"
    stage: ClassVar[str] = "vision"
    paper: ClassVar[str] = "HiPrune, code Danielement321/HiPrune"
    zoo_fields: ClassVar[tuple[str, ...]] = ("object_layer",)
    whole_grid: ClassVar[bool] = True
    after_pixelprune: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.name, "alpha", self.alpha, 0, 1)
        for name in ("object_layer", "deep_layer"):
            check_int(self.name, f"{name} (a 1-based layer number)", getattr(self, name), minimum=1, allow_none=True)
        check_bool(self.name, "wrap_correct", self.wrap_correct)
        check_vit_layer(self.name, self.vit_layer)

    def resolve(self, adapter) -> Policy:
        depth = probe_depth(adapter, "hiprune")
        if self.object_layer is None:
            raise ValueError(f"hiprune: no object_layer default for {adapter.model_type!r}; give object_layer")
        resolve_vit_layer(self.name, adapter, self.vit_layer)
        if self.vit_layer is not None:
            deep = layer_at_most(self.name, "deep_layer", self.deep_layer, self.vit_layer)
            obj = min(self.object_layer, self.vit_layer)
            return replace(self, object_layer=obj, deep_layer=deep)
        deep = self.deep_layer or adapter.feature_vision_layer
        for name, layer in (("object_layer", self.object_layer), ("deep_layer", deep)):
            if not 1 <= layer <= depth:
                origin = "" if name == "object_layer" or self.deep_layer else f" (the {adapter.model_type} default)"
                raise ValueError(
                    f"hiprune: {name}={layer}{origin} is outside this ViT's layers 1..{depth}; give {name} in 1..{depth}"
                )
        return replace(self, deep_layer=deep) if deep != self.deep_layer else self

    @property
    def layers(self) -> tuple[int, int]:
        """0-based (object, deep) ViT layers; known once both are given or resolved by `bind`."""
        obj, deep = self.resolved("object_layer", "deep_layer")
        return obj - 1, deep - 1

    def signals(self) -> Signals:
        prune = (self.vit_layer,) if self.vit_layer is not None else ()
        return Signals(vision_inputs=tuple(sorted(set(self.layers))), encoder_prune=prune)

    def select_image(self, ctx: StageContext, b: int, i: int, k: int) -> Selection:
        image = ctx.layouts[b].images[i]
        obj_layer, deep_layer = self.layers
        obj = sanitize_scores(ctx.vision_attention(b, i, obj_layer), "object-layer scores")
        deep = sanitize_scores(ctx.vision_attention(b, i, deep_layer), "deep-layer scores")
        n = obj.numel()  # the alive tokens (after PixelPrune: its kept units), grid order
        alive = ctx.alive[b][i].to(obj.device)
        rank = ctx.alive_rank(b, i).to(obj.device)  # grid index -> index among the alive tokens, -1: dropped
        anchors = topk_indices(obj, min(n, round(self.alpha * k / 5)))
        chosen = torch.zeros(n, dtype=torch.bool, device=obj.device)
        chosen[anchors] = True
        for anchor in alive[anchors].tolist():
            around = rank[self._neighbours(image.grids, anchor).to(obj.device)]
            chosen[around[around >= 0]] = True  # a dropped neighbour is not kept: the registers fill its place
        picked = torch.nonzero(chosen).flatten()
        if picked.numel() > k:  # only for budgets too small for the buffers: keep the strongest
            picked = picked[topk_indices(obj[picked], k)]
            chosen.zero_()
            chosen[picked] = True
        rest = torch.nonzero(~chosen).flatten()  # excluded outright (the reference subtracts 1 instead)
        registers = rest[topk_indices(deep[rest], k - picked.numel())] if k > picked.numel() else picked[:0]
        return Selection(torch.cat([picked, registers]))

    def _neighbours(self, grids, index: int) -> torch.Tensor:
        for grid in grids:
            if grid.offset <= index < grid.offset + grid.size:
                local, width = index - grid.offset, grid.width
                around = [local - 1, local + 1, local - width, local + width]
                if self.wrap_correct:
                    row = local // width
                    around = [a for a in around if 0 <= a < grid.size and (abs(a - local) == width or a // width == row)]
                around = [min(max(a, 0), grid.size - 1) for a in around]
                return torch.tensor([grid.offset + a for a in around], dtype=torch.long)
        raise IndexError(f"token {index} is outside the image's grids")

    def describe(self) -> str:
        at = "" if self.vit_layer is None else f", vit@{self.vit_layer}"
        return f"hiprune(alpha={self.alpha}{at})"
