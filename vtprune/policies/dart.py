"""DART: keep the image tokens least duplicated with a few pivot tokens, once inside the LLM (llm stage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..context import StageContext
from ..ops.dart import BUDGETS, PIVOT_ORDERS, dart_select
from .base import PerModelLayerPolicy, Policy, Selection, Signals, register


@register
@dataclass(frozen=True)
class DART(PerModelLayerPolicy):
    """Pivot tokens by key norm; each keeps the image tokens least similar to it; prune before layer K.

    Source: "Stop Looking for Important Tokens in Multimodal Language Models:
    Duplication Matters More" (DART, EMNLP 2025; code ZichenWen1/DART).
    Layers 0..K-1 see every token. From layer K-1 (0-based): the L1 norm of
    its post-RoPE keys (kv heads concatenated, not repeated) and the final
    norm of the language model applied to its output (the duplication
    features). Per image: 4 image pivots (largest key norm among the image's
    tokens) and 4 text pivots (largest key norm among the real tokens after
    the image's span: question, template and later images). Each pivot, in
    the reference's visiting order, takes ``keep // 8`` tokens from the pool
    (the image's tokens minus its pivots) with the lowest cosine (eps 1e-8)
    to itself; those leave the pool. Kept: the image pivots and every pick,
    ascending; text pivots are never dropped (they are text). No attention
    weights are read. Positions stay original, as in the reference. The
    keys' RoPE counts positions from the sample's first real token (the
    reference's batch-1, unpadded positions), so padding never changes the
    key norms (RoPE preserves L2 norms, not L1).

    Departures from the reference: every image of a sample is pruned with
    its own pivots (the reference prunes the first image on Qwen and one on
    LLaVA); the span comes from the layout (the reference hard-codes start
    35, length 576 on LLaVA); a pool smaller than the quotas keeps what it
    holds (the reference's ``topk`` raises); fewer than 4 tokens after the
    image give fewer text pivots; LLaVA-NeXT newlines are structure, never
    candidates (the reference's span includes them); keys and cosines in
    fp32 (the reference: fp16).

    Parameters:
        keep: per image; ``keep // 8`` tokens per pivot (a fraction of the
            image's tokens is floored first, as the reference's Qwen ratio).
        at_layer: K; None is the per-model default (2; qwen3_5: 4, so that
            K-1 is a full-attention layer with keys).
        budget: ``"reference"`` (default) keeps the 4 image pivots on top of
            8 x ``keep // 8`` picks (68 / 132 / 196 at 64 / 128 / 192);
            ``"exact"`` trims the last pivots' picks (or adds one to the first
            ones) so that exactly ``keep`` tokens stay.
        pivot_order: ``"reference"`` (default): the iteration order of a
            Python set of the pivots' positions counted from the sample's first
            real token, as the reference visits them (it changes the keep set);
            ``"sorted"``: ascending positions.
    """

    keep: int | float = 64
    at_layer: int | None = None
    budget: str = "reference"
    pivot_order: str = "reference"

    name: ClassVar[str] = "dart"
    rounding: ClassVar[str] = "floor"
    paper: ClassVar[str] = "DART (EMNLP 2025), code ZichenWen1/DART"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget not in BUDGETS:
            raise ValueError(f"dart: budget must be one of {BUDGETS}; got {self.budget!r}")
        if self.pivot_order not in PIVOT_ORDERS:
            raise ValueError(f"dart: pivot_order must be one of {PIVOT_ORDERS}; got {self.pivot_order!r}")

    def signals(self) -> Signals:
        """Pruned before K; layer K-1's keys (from its input, so it must have softmax attention) and output."""
        k = self.resolved_layer()
        return Signals(prune_before=(k,), decoder_inputs=(k - 1,), decoder_attention=(k - 1,))

    def select_sample(self, ctx: StageContext, b: int) -> list[Selection]:
        if not ctx.num_images(b):
            return []
        layer = self.resolved_layer() - 1
        first = int(ctx.valid(b).nonzero()[0])
        key_norm = ctx.layer_keys(layer, b, origin=first).abs().sum(dim=(-2, -1))  # (L,)
        hidden = ctx.final_norm(ctx.hidden[b]).float()
        out = []
        for i in range(ctx.num_images(b)):
            pos = ctx.seq_positions[b][i]
            text = ctx.tokens_after(b, i)
            keep = Policy.image_budget(self, ctx, b, i)
            picks = dart_select(
                key_norm[pos],
                hidden[pos],
                key_norm[text],
                hidden[text],
                keep,
                image_positions=pos - first,
                text_positions=text - first,
                budget=self.budget,
                pivot_order=self.pivot_order,
            )
            out.append(Selection(picks))
        return out

    def describe(self) -> str:
        layer = self.at_layer if self.at_layer is not None else "per-model"
        options = [f"at_layer={layer}"]
        if self.budget != "reference":
            options.append(f"budget={self.budget}")
        if self.pivot_order != "reference":
            options.append(f"pivot_order={self.pivot_order}")
        return f"dart({', '.join(options)})"
