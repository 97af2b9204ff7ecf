"""PyramidDrop: image tokens dropped in stages through the decoder, ranked by the last prompt token's attention."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import ClassVar

import torch

from ..budget import resolve_budget, validate_keep
from ..context import StageContext
from ..ops.select import topk_indices
from .base import Policy, Selection, Signals, register


def pdrop_counts(n: int, ratios: Sequence[float], keep: int | float | None) -> list[int]:
    """Image tokens kept at each stage for an image of ``n`` tokens: ``int(n * r)`` per ratio.

    ``keep`` (a count, or a fraction of ``n`` floored) replaces the last
    stage's count, and no earlier stage keeps fewer than it (counts never
    rise from one stage to the next).
    """
    counts = [int(n * r) for r in ratios]
    if keep is not None:
        last = keep if isinstance(keep, int) else int(n * keep)
        counts = [max(c, last) for c in counts[:-1]] + [last]
    return [max(1, min(c, n)) for c in counts]


@register
@dataclass(frozen=True)
class PyramidDrop(Policy):
    """Drop image tokens at several decoder layers, keeping those the last prompt token attends to most.

    Source: "PyramidDrop: Accelerating Your Large Vision-Language Models via
    Pyramid Visual Redundancy Reduction" (CVPR 2025; code
    Cooperx521/PyramidDrop, ``pdrop_rank_drop`` in
    ``llava/model/modeling_llama_pdrop.py``). At each boundary (after
    ``prune_after[s]`` layers have run) the score of an image token is the
    attention the sample's last real prompt token pays it in the NEXT
    layer: that layer's input norm, q/k projections, RoPE at the current
    positions, grouped KV heads repeated, causal softmax over every key in
    fp32, mean over heads. The attention probe
    (`StageContext.attention_rows`) recomputes only that row on the not yet
    dropped sequence, so the model never returns attention weights. Stage s
    keeps the top ``int(N * ratios[s])`` of the image's current tokens
    (ties to the lowest index), ascending; N is the image's original count.

    Departures from the reference: every image of a sample is ranked within
    its own columns with its own counts (the reference prunes the first
    image of a sample only); grouped KV heads are repeated (the reference
    scores MHA models only); the softmax stays fp32 through the head mean
    (the reference casts it to fp16 first); LLaVA-NeXT newline tokens are
    structure, never counted or dropped (the reference's N counts them);
    padding on either side works (the reference needs right padding and
    SDPA or FlashAttention-2). The reference renumbers positions after
    every stage: ``vtprune.wrap(..., positions="compact")`` (1-D RoPE
    families); the default keeps the original positions.

    Parameters (None: the per-model default from model_zoo.yaml):
        keep: None (default) follows ``ratios``; a token count or fraction
            of N (floored) replaces the last stage's count, and no earlier
            stage keeps fewer (keep=192 gives 288 / 192 / 192 on 576).
        prune_after: 1-based layer counts after which the sequence is
            pruned, increasing; the reference's (8, 16, 24) on 32-layer
            LLaVA, scaled to each model's depth in the zoo. Report stages
            are ``llm@8``, ``llm@16``, ``llm@24``.
        ratios: fraction of N kept at each boundary, non-increasing; the
            reference's lambda = 0.5: (0.5, 0.25, 0.125).
    """

    keep: int | float | None = None  # type: ignore[assignment]  # None: the schedule's counts (own image_budget)
    prune_after: Sequence[int] | None = None
    ratios: Sequence[float] | None = None

    name: ClassVar[str] = "pdrop"
    stage: ClassVar[str] = "llm"
    rounding: ClassVar[str] = "floor"
    paper: ClassVar[str] = "PyramidDrop (CVPR 2025), code Cooperx521/PyramidDrop"
    zoo_fields: ClassVar[tuple[str, ...]] = ("prune_after", "ratios")

    def __post_init__(self) -> None:
        if self.keep is not None:
            self._set("keep", validate_keep(self.keep))
        self._set("prune_after", check_layers(self.name, self.prune_after))
        self._set("ratios", check_ratios(self.name, self.ratios))
        if self.prune_after is not None and self.ratios is not None and len(self.ratios) != len(self.prune_after):
            raise ValueError(
                f"pdrop: one ratio per boundary is needed; got prune_after={list(self.prune_after)} and "
                f"ratios={list(self.ratios)}"
            )

    @property
    def _resolved(self) -> bool:
        return self.prune_after is not None and self.ratios is not None

    @property
    def at(self) -> int | None:
        return self.prune_after[0] if self.prune_after else None

    def resolve(self, adapter) -> Policy:
        self.require_zoo(adapter)
        assert self.prune_after is not None  # not missing
        if self.prune_after[-1] > adapter.num_layers - 1:
            raise ValueError(
                f"pdrop: prune_after={list(self.prune_after)} does not fit this model's {adapter.num_layers} decoder "
                f"layers; every boundary must be in 1..{adapter.num_layers - 1} (the layer after it scores)"
            )
        return self

    def signals(self) -> Signals:
        """Pruned before each boundary's next layer, whose attention (probed from the pruning point) scores the drop."""
        layers, _ = self.resolved("prune_after", "ratios")
        return Signals(prune_before=tuple(layers), decoder_attention=tuple(layers))

    def image_budget(self, ctx: StageContext, b: int, i: int) -> int:
        """This boundary's count for image i (`pdrop_counts`), at most the tokens still alive."""
        prune_after, ratios = self.resolved("prune_after", "ratios")
        step = tuple(prune_after).index(ctx.layer)
        n_alive = int(ctx.alive[b][i].numel())
        if n_alive == 0:
            return 0
        n = ctx.layouts[b].images[i].num_tokens
        return resolve_budget(pdrop_counts(n, ratios, self.keep)[step], n_alive, n, self.rounding)

    def select_sample(self, ctx: StageContext, b: int) -> list[Selection]:
        if not ctx.num_images(b):
            return []
        last = torch.nonzero(ctx.valid(b)).flatten()[-1:]
        assert ctx.layer is not None  # the llm stage
        row = ctx.attention_rows(ctx.layer, ctx.hidden[b], b, last)[0]
        return [
            Selection(topk_indices(row[ctx.seq_positions[b][i]], self.image_budget(ctx, b, i))) for i in range(ctx.num_images(b))
        ]

    def describe(self) -> str:
        if not self._resolved:
            return "pdrop(per-model schedule)"
        prune_after, ratios = self.resolved("prune_after", "ratios")
        options = [f"after={','.join(map(str, prune_after))}", f"ratios={','.join(f'{r:g}' for r in ratios)}"]
        if self.keep is not None:
            options.append(f"keep={self.keep}")
        return f"pdrop({', '.join(options)})"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_layers(who: str, value) -> tuple[int, ...] | None:
    """``prune_after`` checked: strictly increasing 1-based layer counts (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{who}: prune_after must be a non-empty list of 1-based layer numbers; got {value!r}")
    if not all(_is_int(k) and k >= 1 for k in value) or list(value) != sorted(set(value)):
        raise ValueError(f"{who}: prune_after must be strictly increasing ints >= 1 (1-based layers); got {list(value)}")
    return tuple(value)


def check_ratios(who: str, value) -> tuple[float, ...] | None:
    """``ratios`` checked: fractions in (0, 1], non-increasing (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{who}: ratios must be a non-empty list of fractions in (0, 1]; got {value!r}")
    if not all(isinstance(r, Real) and not isinstance(r, bool) and 0.0 < float(r) <= 1.0 for r in value):
        raise ValueError(f"{who}: every ratio must be a fraction in (0, 1] of the original tokens; got {list(value)}")
    if list(value) != sorted(value, reverse=True):
        raise ValueError(f"{who}: ratios must not increase from one boundary to the next; got {list(value)}")
    return tuple(float(r) for r in value)
