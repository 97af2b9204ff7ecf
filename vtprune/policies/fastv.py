"""FastV: the attention the last token pays each visual token, one layer before pruning (llm stage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..context import StageContext
from ..ops.select import topk_indices
from .base import PerModelLayerPolicy, Selection, Signals, register


@register
@dataclass(frozen=True)
class FastV(PerModelLayerPolicy):
    """Keep the visual tokens the last prompt token attends to most in decoder layer K-1; prune before layer K.

    Source: "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play
    Inference Acceleration for Large Vision-Language Models" (FastV, code
    pkunlp-icler/FastV). Score of a visual token = softmax attention of the
    sequence's last token to it in layer K-1, mean over heads. The reference
    asks the model for its attention map (eager attention); here the
    attention probe (`StageContext.attention_rows`) recomputes only that
    one row from the layer's input, so the model keeps SDPA/FlashAttention.
    Positions stay original (the reference keeps position ids).

    Parameters:
        keep: visual tokens per image from layer K on (int) or fraction; default 64.
        at_layer: K (0-based, as every ``at_layer``); None is the per-model
            default from model_zoo.yaml (K = 2, the paper's setting).
    """

    keep: int | float = 64
    at_layer: int | None = None

    name: ClassVar[str] = "fastv"
    paper: ClassVar[str] = "FastV (ECCV 2024), code pkunlp-icler/FastV"

    def signals(self) -> Signals:
        """Pruned before K; the attention of the last token in layer K-1, probed from that layer's input."""
        k = self.resolved_layer()
        return Signals(prune_before=(k,), decoder_inputs=(k - 1,), decoder_attention=(k - 1,))

    def select_sample(self, ctx: StageContext, b: int) -> list[Selection]:
        if not ctx.num_images(b):
            return []
        layer = self.resolved_layer() - 1
        valid = ctx.valid(b)
        last = torch.nonzero(valid).flatten()[-1:]
        row = ctx.attention_rows(layer, ctx.layer_input(layer)[b], b, last)[0]
        return [
            Selection(topk_indices(row[ctx.seq_positions[b][i]], self.image_budget(ctx, b, i))) for i in range(ctx.num_images(b))
        ]

    def describe(self) -> str:
        return f"fastv(at_layer={self.at_layer if self.at_layer is not None else 'per-model'})"
