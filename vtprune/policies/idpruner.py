"""IDPruner: importance plus diversity by maximal marginal relevance, at the projector stage."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from ..budget import resolve_budget
from ..checks import check_bool, check_int, check_number
from ..context import StageContext, token_rows
from ..ops.greedy import COSINE_EPS, cosine_similarity, finite_fp32, mmr_select
from .base import Policy, Selection, Signals, probe_depth, register
from .selector import VisionSelector, load_selector

IMPORTANCE_SOURCES = ("prompt", "norm", "received")


@register
@dataclass(frozen=True)
class IDPruner(Policy):
    """Keep visual tokens that are important and not redundant (greedy MMR).

    Source: "IDPruner: Harmonizing Importance and Diversity in Visual Token
    Pruning for MLLMs" (code in Tencent/AngelSlim, ``idpruner.py``). On the
    post-projector features X of a sample: importance I min-max normalised
    to [0, 1]; cosine similarity S; first pick ``argmax I``, then
    repeatedly ``argmax lam * I - (1 - lam) * max_sim_to_picked``
    (`vtprune.ops.greedy.mmr_select`). Like the reference, all images and
    video frames of a sample form one selection problem with
    ``K = round(N_total * keep)`` (a fraction) or the sum of the images'
    budgets (a count); positions stay original.

    Parameters:
        keep: tokens per image (int) or fraction (float in (0, 1]); default 64.
        lam: weight of importance against redundancy, in [0, 1]; default 0.5
            (the reference). 1 is top-k by importance.
        selector: local directory of a trained scorer in the VisionSelector
            format (`vtprune.policies.selector`), as in the published method;
            ``s_i = q_i . mean_j(k_j) / sqrt(hidden_dim)`` over the tokens of
            the selection problem. Default None.
        importance: training-free importance used when ``selector`` is None
            (the reference has none; reports say "IDPruner-TF", never the
            published method): ``"received"`` (default), the attention each
            token receives at the ViT feature layer (summed over queries, mean
            over heads; the probe, as VisionZip's Qwen score); ``"norm"``, the
            L2 norm of each token's feature; ``"prompt"``, the cosine of each
            token to the mean embedding of the sample's question tokens (falls
            back to ``"norm"`` for a sample without question tokens). The
            default was chosen by measurement on the trained toyvqa models at
            64 and 32 tokens: ``received`` retained 90-92 % (LLaVA) and 98 %
            (Qwen) of the accuracy, ``prompt`` 75-76 % / 66-67 %, ``norm``
            68-69 % / 85-86 % (README, "Accuracy under pruning").
        per_image: False (default, the reference) pools all images of a
            sample; True selects per image with per-image budgets.
        vision_layer: 1-based ViT layer of ``importance="received"``; None
            (default) is the layer whose output is the visual feature.
    """

    keep: int | float = 64
    lam: float = 0.5
    selector: str | None = None
    importance: str = "received"
    per_image: bool = False
    vision_layer: int | None = None
    #: the trained selector's weights, loaded from ``selector`` when the configuration is made (not an option:
    #: equality, hashing, repr and `to_dict` see the path only)
    _scorer: VisionSelector | None = field(default=None, init=False, repr=False, compare=False)

    name: ClassVar[str] = "idpruner"
    stage: ClassVar[str] = "projector"
    paper: ClassVar[str] = "IDPruner, code Tencent/AngelSlim"
    rounding: ClassVar[str] = "round"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("lam", check_number(self.name, "lam", self.lam, 0, 1))
        if self.importance not in IMPORTANCE_SOURCES:
            raise ValueError(f"idpruner: importance must be one of {IMPORTANCE_SOURCES}; got {self.importance!r}")
        check_bool(self.name, "per_image", self.per_image)
        check_int(self.name, "vision_layer", self.vision_layer, minimum=1, allow_none=True)
        scorer: VisionSelector | None = None
        if self.selector is not None:
            if not isinstance(self.selector, (str, os.PathLike)):
                raise TypeError(f"idpruner: selector must be a directory path or None; got {self.selector!r}")
            if not str(self.selector).strip():
                raise ValueError(
                    "idpruner: selector='' names no directory; give the scorer's local folder, or None for IDPruner-TF"
                )
            scorer = load_selector(self.selector)
        self._set("_scorer", scorer)

    def resolve(self, adapter) -> Policy:
        """Check the selector against the model before any hook is installed; resolve the probe layer."""
        if self._scorer is not None:
            self._scorer.check_features(adapter.text_config.hidden_size)
            return self
        if self.importance != "received":
            return self
        depth = probe_depth(adapter, "idpruner: importance='received'")
        layer = self.vision_layer or adapter.feature_vision_layer
        if not 1 <= layer <= depth:
            raise ValueError(
                f"idpruner: vision_layer={layer} is outside this ViT's layers 1..{depth}; give vision_layer in 1..{depth}"
            )
        if layer == self.vision_layer:
            return self
        return replace(self, vision_layer=layer)

    def signals(self) -> Signals:
        """The ViT layer of the received importance (none for the other importances or a trained selector)."""
        if self._scorer is None and self.importance == "received":
            return Signals(vision_inputs=(self.resolved("vision_layer") - 1,))
        return Signals()

    def select_sample(self, ctx: StageContext, b: int) -> list[Selection]:
        n_images = ctx.num_images(b)
        if self.per_image:
            return [self._select(ctx, b, [i], self.image_budget(ctx, b, i))[0] for i in range(n_images)]
        return self._select(ctx, b, list(range(n_images)), self.pooled_budget(ctx, b))

    def pooled_budget(self, ctx: StageContext, b: int) -> int:
        """Tokens the sample keeps over all its images: ``round(N_total * keep)`` or the sum of per-image counts."""
        n_alive = sum(int(a.numel()) for a in ctx.alive[b])
        if isinstance(self.keep, int):
            return sum(self.image_budget(ctx, b, i) for i in range(ctx.num_images(b)))
        n_original = sum(img.num_tokens for img in ctx.layouts[b].images)
        return resolve_budget(self.keep, n_alive, n_original, self.rounding)

    def scores(self, ctx: StageContext, b: int, images: list[int], features: torch.Tensor) -> torch.Tensor:
        """Raw importance of `features`, the tokens of `images` of sample b (one selection problem)."""
        if self._scorer is not None:
            return self._scorer.score(features)
        if self.importance == "received":
            layer = self.resolved("vision_layer") - 1
            received = [ctx.vision_attention(b, i, layer).to(features.device) for i in images]
            return torch.cat(received) if len(received) > 1 else received[0]
        if self.importance == "prompt":
            question = ctx.question(b)
            if question.shape[0] > 0:
                return cosine_similarity(finite_fp32(features), finite_fp32(question).mean(dim=0, keepdim=True))[:, 0]
        return torch.linalg.vector_norm(finite_fp32(features), dim=-1)

    def _select(self, ctx: StageContext, b: int, images: list[int], k: int) -> list[Selection]:
        positions = [ctx.seq_positions[b][i] for i in images]
        sizes = [int(p.numel()) for p in positions]
        device = ctx.hidden.device
        total = sum(sizes)
        if k >= total:
            return [Selection(torch.arange(n, device=device)) for n in sizes]
        # the tokens of every image in one gather (the rows torch.cat of per-image features would hold), or a view
        x = token_rows(ctx.hidden[b], torch.cat(positions) if len(positions) > 1 else positions[0])
        if self._norm_importance(ctx, b):
            # the norms are the importance and the cosine's denominators: compute them once. They are the finite
            # check too: a NaN/inf entry makes its row's norm non-finite, so finite norms (a finite sum of them)
            # mean finite features; otherwise `finite_fp32`'s check and fix, as before
            x = x.float()
            norms = torch.linalg.vector_norm(x, dim=-1)
            if not bool(torch.isfinite(norms.sum())):
                x = finite_fp32(x)
                norms = torch.linalg.vector_norm(x, dim=-1)
            kept = mmr_select(x, norms, k, self.lam, unit=x / (norms.unsqueeze(1) + COSINE_EPS))
        else:
            kept = mmr_select(x, self.scores(ctx, b, images, x), k, self.lam)
        return split_pooled(kept, sizes)

    def _norm_importance(self, ctx: StageContext, b: int) -> bool:
        """Whether `scores` is the features' L2 norm here (``"norm"``, or ``"prompt"`` without question tokens)."""
        if self._scorer is not None:
            return False
        return self.importance == "norm" or (self.importance == "prompt" and ctx.question_seq_positions[b].numel() == 0)

    def describe(self) -> str:
        if self._scorer is not None:
            return f"idpruner(lam={self.lam}, selector={self.selector})"
        per_image = ", per_image" if self.per_image else ""
        return f"IDPruner-TF(importance={self.importance}, lam={self.lam}{per_image})"


def split_pooled(kept: torch.Tensor, sizes: list[int]) -> list[Selection]:
    """Per-image selections from ascending indices into the concatenation of images of the given sizes."""
    bounds = torch.tensor([0, *sizes], device=kept.device).cumsum(0)
    image_of = torch.bucketize(kept, bounds[1:], right=True)
    counts = torch.bincount(image_of, minlength=len(sizes)).tolist()  # one host sync per sample
    parts = torch.split(kept - bounds[image_of], counts)
    return [Selection(part) for part in parts]
