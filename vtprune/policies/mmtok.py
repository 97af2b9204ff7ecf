"""MMTok: multimodal coverage maximisation, at the projector stage."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from numbers import Real
from typing import ClassVar

import torch

from ..budget import split_budget
from ..context import StageContext
from ..ops.coverage import coverage_select
from ..ops.greedy import cosine_similarity, finite_fp32
from .base import Policy, Selection, register


def coverage_matrix(
    visual: torch.Tensor,
    visual_pre: torch.Tensor,
    text: torch.Tensor | None = None,
    alpha: float = 0.5,
    tau_v: float = 0.2,
    tau_t: float = 0.02,
) -> torch.Tensor:
    """MMTok's coverage matrix ``(m + n, n)`` in fp32: rows to cover, columns the candidate visual tokens.

    Text rows (omitted when `text` is None or empty): softmax over columns
    of ``cos(T, V) / tau_t``, divided by m. Visual rows: ``alpha`` times the
    softmax over columns of ``cos(V', V') / tau_v``, divided by n. V are
    post-projector features ``(n, D)``, V' pre-projector features ``(n, D')``,
    T the question's token embeddings ``(m, D)``. Same operation order as
    the reference (``semantic_selector.py``).
    """
    n = visual.shape[0]
    # In place where the reference allocates: the same operations in the same order.
    vis = torch.softmax(cosine_similarity(finite_fp32(visual_pre, "pre-projector features")).mul_(1.0 / tau_v), dim=1)
    vis.div_(n).mul_(alpha)
    if text is None or text.shape[0] == 0:
        return vis
    m = text.shape[0]
    sim = cosine_similarity(finite_fp32(text, "text embeddings"), finite_fp32(visual))
    return torch.cat([torch.softmax(sim.mul_(1.0 / tau_t), dim=1).div_(m), vis])


def _positive(name: str, value: object, allow_zero: bool = False) -> float:
    if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value)):
        in_range = float(value) >= 0 if allow_zero else float(value) > 0
        if in_range:
            return float(value)
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"mmtok: {name} must be a finite number {bound}; got {value!r}")


@register
@dataclass(frozen=True)
class MMTok(Policy):
    """Keep the visual tokens that best cover the question and the image (greedy maximum coverage).

    Source: "MMTok: Multimodal Coverage Maximization for Efficient Inference
    of VLMs" (code Ironieser/MMTok, ``semantic_selector.py``). Per image, a
    coverage matrix (`coverage_matrix`: the question's tokens against the
    post-projector tokens, and the pre-projector tokens against each other)
    and the greedy facility-location selection of the reference
    (`vtprune.ops.coverage.coverage_select`). Each image of a sample uses that
    sample's question tokens (the adapter's question span; the LLaVA
    reference also drops stop-words and re-tokenises the question word by
    word, which an in-context selection cannot do); a sample without
    question tokens is covered by its visual rows alone. Budgets floor:
    ``K = int(keep * n)``, as the Qwen reference. The LLaVA reference
    prunes before the sequence is built (compact positions).

    Parameters:
        keep: tokens per image (int) or fraction (float in (0, 1]); default 64.
        alpha: weight of the visual rows; default 0.5.
        tau_v: temperature of the visual rows; default 0.2.
        tau_t: temperature of the text rows; None (default) is the
            reference's per-model value (0.02 LLaVA, 0.01 Qwen).
        per_crop: split each image's budget over its sub-grids (LLaVA-NeXT
            base and high-resolution views, video frames) in proportion to
            their sizes and select in each; None (default) does so on
            LLaVA-NeXT, whose reference budgets each crop.
    """

    keep: int | float = 64
    alpha: float = 0.5
    tau_v: float = 0.2
    tau_t: float | None = None
    per_crop: bool | None = None

    name: ClassVar[str] = "mmtok"
    stage: ClassVar[str] = "projector"
    rounding: ClassVar[str] = "floor"
    paper: ClassVar[str] = "MMTok, code Ironieser/MMTok"
    zoo_fields: ClassVar[tuple[str, ...]] = ("tau_t", "per_crop")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("alpha", _positive("alpha", self.alpha, allow_zero=True))
        self._set("tau_v", _positive("tau_v", self.tau_v))
        if self.tau_t is not None:
            self._set("tau_t", _positive("tau_t", self.tau_t))
        if self.per_crop is not None and not isinstance(self.per_crop, bool):
            raise TypeError(f"mmtok: per_crop must be True, False or None (per model); got {self.per_crop!r}")

    def resolve(self, adapter) -> Policy:
        """Check that the model has a reference text temperature (or that tau_t is given); per_crop defaults off."""
        if self.tau_t is None:
            raise ValueError(
                f"mmtok: model_zoo.yaml has no reference tau_t for model type {adapter.model_type!r}; give tau_t explicitly"
            )
        return replace(self, per_crop=False) if self.per_crop is None else self

    def _bound(self) -> tuple[float, bool]:
        return self.resolved("tau_t", "per_crop")

    def select_image(self, ctx: StageContext, b: int, i: int, k: int) -> Selection:
        visual = ctx.features_view(b, i)  # read only: every use below copies or normalises it
        n = visual.shape[0]
        if k >= n:
            return Selection(torch.arange(n, device=visual.device))
        tau_t, per_crop = self._bound()
        visual_pre = ctx.pre_projector(b, i).to(visual.device)
        question = ctx.question(b)
        grids = ctx.layouts[b].images[i].grids
        if not per_crop or len(grids) == 1:
            cover = coverage_matrix(visual, visual_pre, question, self.alpha, self.tau_v, tau_t)
            return Selection(coverage_select(cover, k).indices)
        # Alive tokens are ascending grid indices and sub-grids are consecutive ranges of them.
        ends = torch.tensor([g.offset + g.size for g in grids], device=visual.device)
        grid_of = torch.bucketize(ctx.alive[b][i].to(visual.device), ends, right=True)
        sizes = torch.bincount(grid_of, minlength=len(grids)).tolist()
        parts, start = [], 0
        for size, kg in zip(sizes, split_budget(sizes, k)):
            if kg:
                crop = slice(start, start + size)
                cover = coverage_matrix(visual[crop], visual_pre[crop], question, self.alpha, self.tau_v, tau_t)
                parts.append(coverage_select(cover, kg).indices + start)
            start += size
        return Selection(torch.cat(parts))

    def describe(self) -> str:
        tau_t = "per-model" if self.tau_t is None else self.tau_t
        return f"mmtok(alpha={self.alpha}, tau_v={self.tau_v}, tau_t={tau_t})"
