"""HoloV: holistic visual token pruning (budget per contiguous chunk by score), at the projector stage."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from ..checks import check_int
from ..context import StageContext
from ..ops.holov import OVERFLOW_MODES, holov_select
from .base import Policy, Selection, Signals, probe_depth, register

ATTENTION_SOURCES = ("cls", "received")


@register
@dataclass(frozen=True)
class HoloV(Policy):
    """Cut each image's tokens into contiguous chunks, give each chunk a share of the budget by its score,
    and keep the most attended tokens inside each chunk.

    Source: "HoloV: Holistic Visual Token Pruning for Efficient Multimodal
    LLMs" (NeurIPS 2025), official code obananas/HoloV
    (``llava/model/utils.py`` ``HoloV``, ``llava/model/llava_arch.py``;
    Qwen2.5-VL: ``qwen-model-HoloV/``). Selection: `vtprune.ops.holov.holov_select`
    on the post-projector rows of the image, in span order:
    P = max(1, int(1024 / 576 * N / keep)) chunks (16 x 36 tokens at keep 64
    on 576), each scored by ``mean(1000 a + 0.09 v mean|1000 a| / mean|v|)``
    (a the attention, v the variance of the chunk's cosine similarities),
    ``floor(w * keep)`` tokens per chunk with the left-over tokens one each
    to the largest weights, then the top tokens by attention inside each
    chunk. Kept indices ascending. No attention weights are asked of the
    model: the ViT attention probe recomputes the scores.

    Attention ``a`` (``attention``, default per model): ``"cls"`` (CLIP
    towers: llava, llava_next) the CLS row of the feature layer (LLaVA's
    layer -2), mean over heads, each LLaVA-NeXT token from its own crop's
    CLS row, as the reference; ``"received"`` (SigLIP, every Qwen ViT) the
    attention each token receives in the feature layer (Qwen: the last
    block), mean over heads, 2x2 merge units averaged, in raster order. The
    probe sums the received attention over queries where the Qwen reference
    averages: a constant factor per image (one attention segment per image
    or frame), which leaves the selection unchanged up to the reference's
    1e-6 terms.

    Departures from the official code (all on purpose):

    - Budget: the LLaVA code hard-codes P = 16 and keep = 64 for every image;
      vtprune uses the formula everywhere (it equals the shipped code at
      keep 64 on LLaVA-1.5); a fractional ``keep`` floors, as the Qwen code.
    - Overflow: the reference loses the excess of a chunk allocated more
      than its size and pads the output with zero vectors up to keep.
      ``overflow="redistribute"`` (default) hands the excess to the other
      chunks in descending weight order, filled up to their sizes, so exactly
      ``keep`` are kept; ``overflow="drop"`` reproduces the reference's keep
      set (fewer tokens, reported truthfully, no zero rows).
    - Order: the reference emits chunk order (top-k order inside a chunk);
      vtprune keeps ascending order and original positions (the reference
      renumbers).
    - Several images: each its own budget (the LLaVA reference fails to
      unpack them; the Qwen one handles one image). Video: one budget per
      video, chunks running over its frames in order.
    - Qwen2.5-VL: the reference's scores stay in window order while the
      features return to raster order, its span starts one token early at
      ``<|vision_start|>``, and eager vision attention silently gives
      all-ones scores; vtprune takes the span from the layout and the
      scores from the probe in raster order.
    - fp32 throughout (the reference averages heads in fp16, which ties).

    Parameters:
        keep: tokens per image (int) or fraction (float in (0, 1], floored); default 64.
        overflow: ``"redistribute"`` (default, exactly ``keep``) or ``"drop"`` (the reference).
        attention: ``"cls"`` or ``"received"``; None (default) is ``"cls"`` on a ViT with a CLS
            token (llava, llava_next), else ``"received"``.
        vision_layer: 1-based ViT layer of the attention; None (default) is the layer whose
            output is the visual feature.
    """

    keep: int | float = 64
    overflow: str = "redistribute"
    attention: str | None = None
    vision_layer: int | None = None

    name: ClassVar[str] = "holov"
    stage: ClassVar[str] = "projector"
    paper: ClassVar[str] = "HoloV (NeurIPS 2025), code obananas/HoloV"
    rounding: ClassVar[str] = "floor"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.overflow not in OVERFLOW_MODES:
            raise ValueError(f"holov: overflow must be one of {OVERFLOW_MODES}; got {self.overflow!r}")
        if self.attention is not None and self.attention not in ATTENTION_SOURCES:
            raise ValueError(f"holov: attention must be one of {ATTENTION_SOURCES} or None; got {self.attention!r}")
        check_int(self.name, "vision_layer", self.vision_layer, minimum=1, allow_none=True)

    def resolve(self, adapter) -> Policy:
        """Resolve the attention source and the ViT layer for this model, checking both."""
        depth = probe_depth(adapter, "holov")
        layer = self.vision_layer or adapter.feature_vision_layer
        if not 1 <= layer <= depth:
            raise ValueError(
                f"holov: vision_layer={layer} is outside this ViT's layers 1..{depth}; give vision_layer in 1..{depth}"
            )
        attention = self.attention or ("cls" if adapter.vision_cls else "received")
        if attention == "cls" and not adapter.vision_cls:
            raise ValueError(
                f"holov: attention='cls' reads the CLS row; {adapter.model_type}'s vision encoder has no CLS token "
                "(give attention='received' or None)"
            )
        if layer == self.vision_layer and attention == self.attention:
            return self
        return replace(self, vision_layer=layer, attention=attention)

    def _layer(self) -> int:
        """0-based ViT layer of the attention (after `bind`)."""
        return self.resolved("vision_layer", "attention")[0] - 1

    def signals(self) -> Signals:
        return Signals(vision_inputs=(self._layer(),))

    def attention_scores(self, ctx: StageContext, b: int, i: int):
        """Per-token attention of image i's alive tokens, ``(n,)`` fp32 (CLS row mean over heads, or received)."""
        layer = self._layer()
        if self.attention == "cls":
            heads = ctx.adapter.vision_layers()[layer].self_attn.num_heads
            return ctx.vision_cls_attention(b, i, layer).float() / heads  # the probe sums the CLS row over heads
        return ctx.vision_attention(b, i, layer).float()

    def select_image(self, ctx: StageContext, b: int, i: int, k: int) -> Selection:
        features = ctx.features(b, i)
        attention = self.attention_scores(ctx, b, i).to(features.device)
        return Selection(holov_select(features, attention, k, self.overflow))

    def describe(self) -> str:
        return f"holov(overflow={self.overflow})"
