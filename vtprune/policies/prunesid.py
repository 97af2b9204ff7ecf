"""PruneSID: PCA groups, similarity NMS in each group, a budget split by the survivors, vision stage."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..checks import check_bool, check_int
from ..context import NotCaptured, StageContext
from ..ops.leaders import (
    pca_groups,
    prunesid_qwen_budget,
    prunesid_qwen_select,
    prunesid_select,
    qwen_group_count,
    scored_groups,
)
from ..ops.select import sanitize_scores
from .base import Policy, Selection, Signals, register
from .vision_views import alive_views, image_views, resolve_layer, view_budgets

VARIANTS = ("llava", "qwen")


@register
@dataclass(frozen=True)
class PruneSID(Policy):
    """Keep, in each PCA group of tokens, the most salient tokens that are not near-duplicates.

    Source: "Prune Redundancy, Preserve Essence: Vision Token Compression in
    VLMs via Synergistic Importance-Diversity" (Fang et al., ICLR 2026; code
    ZhengyaoFang/PruneSID at 4ef17d9: ``prunesid/prunesid_llava/clip_encoder.py``,
    ``prunesid/prunesid_qwen/modeling_qwen2_vl.py``).

    ``variant="llava"`` (CLIP with CLS; LLaVA-1.5, LLaVA-NeXT). Per view
    with budget t, which COUNTS the CLS token (keep=64: 63 patches + CLS):
    groups = argmax_g |V_ig| of a randomised PCA (``torch.pca_lowrank``, q =
    int(t/4), niter 2) of sigmoid(patch rows)^T, the rows being the ViT
    feature layer's (layer -2); similarity = cosine of the patch rows,
    threshold (t/32) x the mean of its strict upper triangle; in each group,
    similarity NMS on the CLS attention (feature layer, summed over heads,
    through the ViT probe): repeatedly pick the highest remaining score, zero
    every member more similar than the threshold. Group budgets: at least 1,
    at most min(5 ceil(t/64), size, picks) (raised until they cover t), t - 1
    - groups split by the cumulative share of picks (rounded half to even),
    the shortfall filled by groups with most picks. Each group keeps its
    picks in pick order, then its other members by score. The CLS feature
    (the projected feature-layer CLS row) takes the slot of the first patch
    of the view not otherwise kept; the report's ``kept`` counts that slot.

    ``variant="qwen"`` (every Qwen family and LLaVA-OneVision): the rows are
    the image's merger / projector output (the LLM's input embeddings); no
    attention. t = max(round(M keep / 576), 16) for M merged tokens (a float
    ``keep`` f: max(round(M f), 16); M <= 16: nothing pruned;
    ``reference_budget=False``: the plain per-image budget instead); q =
    max(int(t/4), 4) (at most t: every group keeps a token); score = |V| of the token's own group; threshold
    max(18 t / M, 1) x the mean of the upper triangle with the diagonal over
    all M^2 entries; budgets as above without the CLS slot.

    Randomness: the PCA is seeded with ``seed`` inside
    `torch.random.fork_rng` once per image, so results are deterministic and
    the user's RNG stream is untouched; groups equal the reference's only on
    the same torch version, device, seed and batching of views (LLaVA-NeXT
    crops of equal size and share are one batched call, as the reference's).

    Views: LLaVA-NeXT's base view and crops (each share includes its CLS
    slot), a video's frames, ``keep // views`` each, the remainder to the
    base view. Qwen and LLaVA-OneVision images are one view each (their
    frames for a video).

    Departures from the official code: kept tokens ascending with original
    positions (the reference emits CLS, then group 0's picks, group 1's, ...
    to the LLM, and sorts its Qwen output only past 150 tokens); LLaVA-NeXT:
    the right features at the right positions (the reference writes them in
    group order into sorted slots) and HF's packing; Qwen: per image and
    every image, video included (the reference takes one image per request
    and crashes on video); all scores 0 keeps the top tokens by score (the
    reference divides by zero), with a warning; fp32 similarity and
    threshold (the reference multiplies in fp16 / bf16, and computes the Qwen
    mean in bf16); ranks restricted to the group's members (ties at score 0
    could pick a non-member there). Reproduced on purpose: the CLS token is
    kept and projected (LLaVA's projector never saw it in training).

    After PixelPrune (``Pipeline([PixelPrune(), PruneSID(...)])``, ours:
    the reference prunes full grids): the image's tokens are PixelPrune's
    kept units, in grid order, and the rows and the CLS attention are the
    tower's as it ran on them. PCA groups, the similarity matrix and its
    mean (the Qwen threshold's M included), the NMS and the group budgets
    are over each view's kept units only; the budget counts from the
    image's unpruned token count (the Qwen reference budget from the
    unpruned M), capped at the kept units, and is split over the views by
    their kept counts; the CLS feature takes the slot of the view's first
    kept patch not otherwise kept.

    Parameters:
        keep: tokens per image, CLS slot included for ``variant="llava"``
            (int), or fraction (float in (0, 1]); default 64.
        variant: ``"llava"`` or ``"qwen"``; None: the model's default
            (model_zoo.yaml: llava on CLIP, qwen otherwise).
        seed: seed of the PCA's random test matrix; default 0.
        reference_budget: ``variant="qwen"``: t = max(round(M keep / 576), 16)
            as the reference (default True); False keeps ``keep`` per image.
        layer: 1-based ViT layer of the CLS attention and CLS feature
            (``variant="llava"``); None: the feature layer.
    """

    keep: int | float = 64
    variant: str | None = None
    seed: int = 0
    reference_budget: bool = True
    layer: int | None = None

    name: ClassVar[str] = "prunesid"
    stage: ClassVar[str] = "vision"
    paper: ClassVar[str] = "PruneSID (ICLR 2026), code ZhengyaoFang/PruneSID"
    zoo_fields: ClassVar[tuple[str, ...]] = ("variant",)
    whole_grid: ClassVar[bool] = True
    after_pixelprune: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant is not None and self.variant not in VARIANTS:
            raise ValueError(f"prunesid: variant must be one of {VARIANTS} or None (the model's default); got {self.variant!r}")
        check_int(self.name, "seed", self.seed, minimum=0)
        check_bool(self.name, "reference_budget", self.reference_budget)
        check_int(self.name, "layer (a 1-based layer number)", self.layer, minimum=1, allow_none=True)

    def resolve(self, adapter) -> Policy:
        variant = self.variant or ("llava" if adapter.vision_cls else "qwen")
        if variant == "qwen":
            return replace(self, variant=variant)
        if not adapter.vision_cls:
            raise ValueError(
                f"prunesid: variant='llava' reads the CLS token; {adapter.model_type}'s vision encoder has none "
                "(use variant='qwen')"
            )
        layer = resolve_layer(self.name, adapter, self.layer)
        depth = len(adapter.vision_layers())
        if layer >= depth:
            raise ValueError(
                f"prunesid: the CLS feature is the output of ViT layer {layer}, the input of layer {layer + 1}; this "
                f"ViT has layers 1..{depth} (give layer in 1..{depth - 1})"
            )
        return replace(self, variant=variant, layer=layer)

    def _variant(self) -> str:
        variant = self.resolved("variant")
        if variant == "llava":
            self.resolved("layer")
        return variant

    def signals(self) -> Signals:
        if self._variant() == "qwen":
            return Signals()
        layer = self.resolved("layer")
        return Signals(vision_inputs=(layer - 1, layer))  # CLS attention; CLS feature: the next input

    def image_budget(self, ctx: StageContext, b: int, i: int) -> int:
        if self._variant() == "llava" or not self.reference_budget:
            return super().image_budget(ctx, b, i)
        n_alive = int(ctx.alive[b][i].numel())
        if n_alive == 0:
            return 0
        return min(prunesid_qwen_budget(ctx.layouts[b].images[i].num_tokens, self.keep), n_alive)

    def select_image(self, ctx: StageContext, b: int, i: int, k: int) -> Selection:
        # the alive tokens: the whole grid, or after PixelPrune its kept units (grid order); all indices below are theirs
        n = int(ctx.alive[b][i].numel())
        if k >= n:
            return Selection(torch.arange(n, device=ctx.hidden.device))
        if self._variant() == "qwen":
            return self._select_qwen(ctx, b, i, k)
        return self._select_llava(ctx, b, i, k)

    def _select_qwen(self, ctx: StageContext, b: int, i: int, k: int) -> Selection:
        feats = ctx.features(b, i)
        if ctx.layouts[b].images[i].kind == "video":
            views = alive_views(ctx, b, i, image_views(ctx, b, i, None)[0])  # frames
        else:
            views = [torch.arange(feats.shape[0], device=feats.device)]  # the image as one (all its views packed)
        budgets = view_budgets(k, [v.numel() for v in views])
        work = [(v.to(feats.device), t) for v, t in zip(views, budgets) if 0 < t]
        partial = [(v, t) for v, t in work if t < v.numel()]
        groups = scored_groups([feats[v] for v, _ in partial], [qwen_group_count(t) for _, t in partial], self.seed)
        chosen = iter(groups)
        kept = []
        for v, t in work:
            if t >= v.numel():
                kept.append(v)
            else:
                kept.append(v[prunesid_qwen_select(feats[v], t, next(chosen))])
        return Selection(torch.sort(torch.cat(kept)).values)

    def _select_llava(self, ctx: StageContext, b: int, i: int, k: int) -> Selection:
        layer = self.resolved("layer") - 1
        projected = ctx.features(b, i)
        device = projected.device
        pre = ctx.pre_projector(b, i).to(device)
        attention = sanitize_scores(ctx.vision_cls_attention(b, i, layer), "CLS attention").to(device)
        views, crop = image_views(ctx, b, i, layer)
        views = [v.to(device) for v in alive_views(ctx, b, i, views)]
        budgets = view_budgets(k, [v.numel() for v in views])
        partial = [(v, t) for v, t in zip(views, budgets) if 1 < t < v.numel()]
        equal = len({(v.numel(), t) for v, t in partial}) == 1
        groups = iter(pca_groups([pre[v] for v, _ in partial], [int(t / 4) for _, t in partial], self.seed, batched=equal))
        kept, values = [], []
        for v, t in zip(views, budgets):
            if t <= 0:
                continue
            if t >= v.numel():
                kept.append(v)
                values.append(projected[v])
                continue
            patches = v[prunesid_select(pre[v], attention[v], t, group=next(groups))] if t > 1 else v[:0]
            free = torch.ones(v.numel(), dtype=torch.bool, device=device)
            free[torch.searchsorted(v, patches)] = False
            slot = v[torch.nonzero(free).flatten()[:1]]  # the view's first (alive) patch not kept
            cls = self._cls_feature(ctx, b, i, None if crop is None else int(crop[ctx.alive[b][i][v[0]]]))
            kept += [patches, slot]
            values += [projected[patches], ctx.project(cls[None].to(pre.dtype)).to(projected.dtype).to(device)]
        return Selection(torch.cat(kept), torch.cat(values))

    def _cls_feature(self, ctx: StageContext, b: int, i: int, crop: int | None) -> torch.Tensor:
        """The CLS row entering ViT layer ``self.layer`` (0-based: the output of the signal layer) of the image or crop."""
        if crop is None:
            return ctx.vision_cls_feature(b, i, self.resolved("layer"))
        calls = ctx.captured.get("vision_layers", {}).get(self.layer)
        if not calls:
            raise NotCaptured(f"vision layer {self.layer} was not captured; list it in `signals().vision_inputs`")
        return torch.cat([call.hidden for call in calls])[crop, 0]

    def describe(self) -> str:
        return f"prunesid(variant={self.variant}, seed={self.seed})"
