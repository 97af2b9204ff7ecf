"""VisionZip: dominant tokens by ViT attention plus merged contextual tokens, vision stage."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from numbers import Integral, Real
from typing import ClassVar

import torch

from ..checks import check_bool
from ..context import StageContext
from ..ops.greedy import finite_fp32
from ..ops.select import sanitize_scores, topk_indices
from ..zoo import adapter_defaults
from .base import Policy, Selection, Signals, probe_depth, register
from .vit_layer import check_vit_layer, layer_at_most, resolve_vit_layer

DOMINANT_SCORES = ("cls", "received")
MERGES = ("reference", "mean")
#: the LLaVA reference's split: 54+10, 108+20, 162+30 of 64/128/192 (and LLaVA-NeXT's 135+25 .. 540+100)
REFERENCE_CONTEXTUAL_SHARE = 10 / 64


def contextual_groups(keys: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's grouping of the non-dominant tokens: evenly spaced targets, the rest joins the most similar.

    ``keys`` ``(r, d)`` are the tokens' keys in grid order. Targets are rows
    ``0, step, 2 step, ..`` (``step = max(1, r // count)``, the first
    ``count``); every other row joins the target with the largest cosine
    similarity of keys (ties: the first target). Returns the target rows
    ``(count,)`` and each row's group ``(r,)`` (a target is its own group).
    """
    r = keys.shape[0]
    targets = torch.arange(0, r, max(1, r // count), device=keys.device)[:count]
    keys = finite_fp32(keys, "keys")
    normed = keys / keys.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    is_target = torch.zeros(r, dtype=torch.bool, device=keys.device)
    is_target[targets] = True
    similarity = sanitize_scores(normed[~is_target] @ normed[targets].T, "key similarities")
    group = torch.empty(r, dtype=torch.long, device=keys.device)
    group[targets] = torch.arange(targets.numel(), device=keys.device)
    group[~is_target] = similarity.argmax(dim=-1)
    return targets, group


def merge_groups(features: torch.Tensor, targets: torch.Tensor, group: torch.Tensor, merge: str = "reference") -> torch.Tensor:
    """One feature per group ``(count, D)`` in fp32, in target order.

    ``"reference"`` (the official code): the target's feature plus the mean
    of the features that joined it (the target alone when none did).
    ``"mean"``: the plain mean over the whole group, target included.
    """
    features = finite_fp32(features, "features")
    joined = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
    joined[targets] = False
    count = targets.numel()
    sums = features.new_zeros(count, features.shape[1]).index_add_(0, group[joined], features[joined])
    counts = torch.bincount(group[joined], minlength=count).to(features.dtype)[:, None]
    if merge == "reference":
        return features[targets] + sums / counts.clamp_min(1)
    return (features[targets] + sums) / (counts + 1)


@register
@dataclass(frozen=True)
class VisionZip(Policy):
    """Keep the dominant tokens by ViT attention and merge the rest into a few contextual tokens.

    Source: "VisionZip: Longer is Better but Not Necessary in Vision Language
    Models" (Yang et al., CVPR 2025; code dvlab-research/VisionZip, now
    JIA-Lab-research/VisionZip). Per image, budget k = d dominant + c
    contextual tokens:

    - dominant: the top d tokens by a score at one ViT layer (by default the
      layer whose output is the visual feature: CLIP's second to last, the
      Qwen ViT's last block). ``"cls"`` (LLaVA reference): the attention the
      CLS token pays each patch, summed over heads. ``"received"`` (the
      Qwen2.5-VL reference, ``Qwen2_5_VL/qwen2_5vl_visionzip.py``, for an
      encoder without CLS): the attention a token receives,
      summed over queries, mean over heads, within the block's own attention
      segments, 2x2 merge units averaged. Computed by the ViT probe from the
      layer's captured input; the ViT keeps SDPA/FlashAttention.
    - contextual: the remaining tokens, in grid order, are grouped by
      `contextual_groups` (c evenly spaced targets; every other token joins
      its most similar target by cosine of that layer's keys, mean over heads:
      raw CLIP keys; Qwen: rotated keys averaged over each merge unit) and
      each group becomes one token at its target's position, merged by
      `merge_groups` (returned as ``Selection.values``).

    Where features are merged follows each reference: LLaVA merges the ViT
    features (the projector's input) and projects the merged ones
    (``merge_before_projector=True``); Qwen2.5-VL merges the merger's output
    embeddings (False). Split of the budget: the LLaVA reference's 54+10 /
    108+20 / 162+30 (LLaVA-NeXT: 135+25 / 270+50 / 540+100) are all
    ``c = round(k * 10 / 64)``, the rule used for any other budget. The
    LLaVA reference's d dominant tokens are the CLS token plus d - 1 patches
    (``visionzip(dominant=54, contextual=10)`` feeds the LLM CLS + 53 + 10 =
    64 tokens); with ``cls_token=True`` (the LLaVA-1.5 default) vtprune keeps
    the same counts: d - 1 dominant patches, c contextual tokens, and the
    projected CLS feature of the scoring layer's output in the slot of the
    first patch not otherwise kept (the sequence has no slot of its own for
    it; the reference puts it first). The Qwen2.5-VL reference keeps
    ``int(0.65 N)`` dominant and ``max(int(0.05 N), 1)`` contextual tokens of
    N at 70 % retention (45 % + 5 % at 50 %): with ``contextual_fraction`` f
    and a fractional ``keep`` the count is ``int((keep - f) N) +
    max(int(f N), 1)`` (178 of 256 at 0.7, where ``round(0.7 N)`` is 179;
    ``exact_keep=True`` keeps ``round(keep N)`` instead), split as
    ``c = max(int(f N), 1)`` and ``d = k - c``. Per-model defaults in
    model_zoo.yaml.

    Departures from the reference: kept tokens stay in grid order with original positions (the LLaVA
    reference appends the contextual tokens after the dominant ones and
    renumbers, as ``positions="compact"`` does; the Qwen one keeps positions);
    budgets per image and per video (the Qwen reference, batch size 1, pools
    all images of the prompt into one selection and leaves videos unpruned;
    the LLaVA-NeXT reference splits per crop); the probe's attention stays
    inside each attention segment, as the ViT's (the Qwen reference's
    FlashAttention path takes the softmax across segments; its eager path does
    not).

    After PixelPrune (``Pipeline([PixelPrune(), VisionZip(...)])``, ours:
    the references prune full grids): the image's tokens are PixelPrune's
    kept units, in grid order, and the signals are the tower's as it ran on
    them (attention and keys over the kept units only). The dominant tokens
    are the top d of those; the contextual targets are taken at the stride
    above over the remaining kept tokens in grid order, and every other
    remaining kept token joins one; a dropped unit is in no group. The
    budget counts from the image's unpruned token count N (``keep`` as a
    fraction, ``contextual_fraction``'s ``int(f N)``), capped at the kept
    units. With ``vit_layer=k`` the same selection runs inside the tower,
    whose blocks before k ran on PixelPrune's units.

    Parameters:
        keep: tokens per image (int) or fraction (float in (0, 1]); default 64.
        contextual: contextual tokens per image (int >= 0), or their share of
            the budget (float in [0, 1), rounded); None: the per-model default.
        contextual_fraction: contextual tokens as a share of the image's
            tokens N, ``max(int(N * f), 1)`` (the Qwen reference's 0.05); give
            this or ``contextual``, not both.
        layer: 1-based ViT layer of the scores and keys; None: the layer whose
            output is the visual feature.
        dominant_score: ``"cls"`` or ``"received"``; None: the per-model
            default (cls for CLIP, received for Qwen).
        merge: ``"reference"`` (target + mean of the joined tokens, as the
            official code) or ``"mean"`` (plain group mean); default ``"reference"``.
        merge_before_projector: merge the projector's input and project the
            result (True) or merge the projected features (False); None: the
            per-model default.
        cls_token: count the CLS token among the dominant tokens and keep its
            feature, as the LLaVA reference (CLIP encoders, one crop per
            image); None: the per-model default (True for LLaVA-1.5). False
            keeps d dominant patches instead (54 + 10 patches at 64).
        exact_keep: with ``contextual_fraction`` and a fractional ``keep``,
            keep ``round(keep * N)`` tokens instead of the reference's
            ``int((keep - f) N) + max(int(f N), 1)``; default False.
        vit_layer: select inside the vision encoder after its k-th block
            (`vtprune.policies.vit_layer`): scores and keys at ``layer``
            (<= k; None: k); each contextual group's hidden states leaving
            block k are merged (``merge``) into its target's rows, which the
            remaining blocks encode like every kept token; the CLS token
            stays the encoder's own (``cls_token`` is False). None (default):
            after the encoder.
    """

    keep: int | float = 64
    contextual: int | float | None = None
    contextual_fraction: float | None = None
    layer: int | None = None
    dominant_score: str | None = None
    merge: str = "reference"
    merge_before_projector: bool | None = None
    cls_token: bool | None = None
    exact_keep: bool = False
    vit_layer: int | None = None

    name: ClassVar[str] = "visionzip"
    stage: ClassVar[str] = "vision"
    rounding: ClassVar[str] = "round"
    paper: ClassVar[str] = "VisionZip (CVPR 2025), code dvlab-research/VisionZip"
    zoo_fields: ClassVar[tuple[str, ...]] = ("dominant_score", "merge_before_projector", "cls_token")
    whole_grid: ClassVar[bool] = True
    after_pixelprune: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_contextual(self.contextual, self.contextual_fraction)
        if isinstance(self.keep, Integral) and isinstance(self.contextual, Integral) and self.contextual > self.keep:
            raise ValueError(
                f"visionzip: contextual={self.contextual} contextual tokens do not fit in keep={self.keep} tokens per "
                f"image; give contextual in [0, {self.keep}] (or a float share of the budget in [0, 1))"
            )
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1):
            raise ValueError(f"visionzip: layer must be a 1-based layer number >= 1 or None; got {self.layer!r}")
        if self.dominant_score is not None and self.dominant_score not in DOMINANT_SCORES:
            raise ValueError(f"visionzip: dominant_score must be one of {DOMINANT_SCORES} or None; got {self.dominant_score!r}")
        if self.merge not in MERGES:
            raise ValueError(f"visionzip: merge must be one of {MERGES}; got {self.merge!r}")
        check_bool(self.name, "merge_before_projector", self.merge_before_projector, allow_none=True)
        check_bool(self.name, "cls_token", self.cls_token, allow_none=True)
        check_bool(self.name, "exact_keep", self.exact_keep)
        check_vit_layer(self.name, self.vit_layer)

    def bind(self, adapter) -> Policy:
        """The zoo's contextual split applies only when neither ``contextual`` nor ``contextual_fraction`` is given."""
        bound = super().bind(adapter)
        assert isinstance(bound, VisionZip)
        if self.contextual is None and self.contextual_fraction is None:
            defaults = adapter_defaults(adapter, self.name)
            contextual, fraction = defaults.get("contextual"), defaults.get("contextual_fraction")
            if contextual is None and fraction is None:
                contextual = REFERENCE_CONTEXTUAL_SHARE
            bound = replace(bound, contextual=contextual, contextual_fraction=fraction)
        return bound

    def resolve(self, adapter) -> Policy:
        depth = probe_depth(adapter, "visionzip")
        resolve_vit_layer(self.name, adapter, self.vit_layer)
        layer = layer_at_most(self.name, "layer", self.layer, self.vit_layer) or adapter.feature_vision_layer
        if not 1 <= layer <= depth:
            origin = "" if self.layer else f" (the {adapter.model_type} feature layer)"
            raise ValueError(
                f"visionzip: layer={layer}{origin} is outside this ViT's layers 1..{depth}; give layer in 1..{depth}"
            )
        score = self.dominant_score or "received"
        if score == "cls" and not adapter.vision_cls:
            raise ValueError(
                f"visionzip: dominant_score='cls' needs a vision encoder with a CLS token; {adapter.model_type}'s has "
                "none (use 'received', the Qwen2.5-VL reference's score)"
            )
        before = bool(self.merge_before_projector)
        cls_token = bool(self.cls_token) and self.vit_layer is None  # inside the encoder CLS stays CLS
        if cls_token and not (adapter.vision_cls and adapter.vision_cls_per_image):
            raise ValueError(
                f"visionzip: cls_token=True keeps each image's CLS token; {adapter.model_type}'s vision encoder has "
                "no single CLS token per image (give cls_token=False)"
            )
        if cls_token and layer >= depth:
            raise ValueError(
                f"visionzip: cls_token=True reads the CLS feature from the output of ViT layer {layer}, the input of "
                f"layer {layer + 1}; this ViT has layers 1..{depth} (give layer in 1..{depth - 1} or cls_token=False)"
            )
        return replace(self, layer=layer, dominant_score=score, merge_before_projector=before, cls_token=cls_token)

    def _settings(self) -> dict:
        layer, _, _, _ = self.resolved("layer", "dominant_score", "merge_before_projector", "cls_token")
        if self.contextual is None and self.contextual_fraction is None:
            self.resolved("contextual")  # the split: contextual or contextual_fraction, set by bind
        return {
            "layer": layer - 1,
            "score": self.dominant_score,
            "contextual": self.contextual,
            "fraction": self.contextual_fraction,
            "before": self.merge_before_projector,
        }

    def signals(self) -> Signals:
        layer = self._settings()["layer"]
        # the CLS feature: the input of the next layer
        prune = (self.vit_layer,) if self.vit_layer is not None else ()
        return Signals(vision_inputs=(layer, layer + 1) if self.cls_token else (layer,), encoder_prune=prune)

    def image_budget(self, ctx: StageContext, b: int, i: int) -> int:
        """The reference's count with ``contextual_fraction`` and a fractional ``keep``; else the usual budget."""
        if self.exact_keep or self.contextual_fraction is None or isinstance(self.keep, int):
            return super().image_budget(ctx, b, i)
        n_alive, n = int(ctx.alive[b][i].numel()), ctx.layouts[b].images[i].num_tokens
        if n_alive == 0:
            return 0
        f = self.contextual_fraction
        dominant = max(0, int(n * round(self.keep - f, 12)))  # round: 0.7 - 0.05 is 0.6499..., the reference's 0.65
        return max(1, min(dominant + max(int(n * f), 1), n_alive))

    def split(self, k: int, n: int) -> tuple[int, int]:
        """(dominant, contextual) counts for budget ``k`` of an image with ``n`` tokens (after `bind`)."""
        settings = self._settings()
        contextual, fraction = settings["contextual"], settings["fraction"]
        if fraction is not None:
            c = max(int(n * fraction), 1)
        elif isinstance(contextual, Integral):
            c = int(contextual)
        else:
            c = math.floor(k * contextual + 0.5)
        c = min(c, k)
        return k - c, c

    def select_image(self, ctx: StageContext, b: int, i: int, k: int) -> Selection:
        # after PixelPrune the alive tokens are its kept units (grid order); everything below indexes them
        n = int(ctx.alive[b][i].numel())
        if k >= n:
            return Selection(torch.arange(n, device=ctx.hidden.device))
        settings = self._settings()
        layer = settings["layer"]
        dominant_count, contextual_count = self.split(k, ctx.layouts[b].images[i].num_tokens)
        if settings["score"] == "cls":
            score = ctx.vision_cls_attention(b, i, layer)
        else:
            score = ctx.vision_attention(b, i, layer)
        with_cls = bool(self.cls_token) and dominant_count >= 1  # the CLS token is one of the dominant tokens
        dominant = topk_indices(sanitize_scores(score, "dominant-token scores"), dominant_count - int(with_cls))
        projected = ctx.features(b, i)
        dominant = dominant.to(projected.device)
        if contextual_count == 0 and not with_cls:
            return Selection(dominant)
        kept, values = [dominant], [projected[dominant]]
        if contextual_count:
            rest = torch.ones(n, dtype=torch.bool, device=projected.device)
            rest[dominant] = False
            rest = torch.nonzero(rest).flatten()
            keys = ctx.vision_keys(b, i, layer).to(projected.device)
            targets, group = contextual_groups(keys[rest], contextual_count)
            if settings["before"]:
                pre = ctx.pre_projector(b, i).to(projected.device)
                merged = ctx.project(merge_groups(pre[rest], targets, group, self.merge).to(pre.dtype))
            else:
                merged = merge_groups(projected[rest], targets, group, self.merge)
            kept.append(rest[targets])
            values.append(merged.to(projected.dtype))
        if with_cls:
            free = torch.ones(n, dtype=torch.bool, device=projected.device)
            free[torch.cat(kept)] = False
            slot = torch.nonzero(free).flatten()[:1]  # the first patch not otherwise kept (k < n: one exists)
            cls = ctx.vision_cls_feature(b, i, layer + 1).to(projected.device)
            kept.append(slot)
            values.append(ctx.project(cls[None]).to(projected.dtype))
        return Selection(torch.cat(kept), torch.cat(values))

    def describe(self) -> str:
        at = "" if self.vit_layer is None else f", vit@{self.vit_layer}"
        return f"visionzip(merge={self.merge}{at})"


def _check_contextual(contextual: object, fraction: object) -> None:
    if contextual is not None and fraction is not None:
        raise ValueError(
            f"visionzip: give contextual (count or share of the budget) or contextual_fraction (share of the image's "
            f"tokens), not both; got contextual={contextual!r}, contextual_fraction={fraction!r}"
        )
    if contextual is not None:
        count_ok = isinstance(contextual, Integral) and not isinstance(contextual, bool) and int(contextual) >= 0
        share_ok = isinstance(contextual, float) and math.isfinite(contextual) and 0 <= contextual < 1
        if not (count_ok or share_ok):
            raise ValueError(
                f"visionzip: contextual must be an int count >= 0 or a float share of the budget in [0, 1); got {contextual!r}"
            )
    if fraction is not None:
        ok = isinstance(fraction, Real) and not isinstance(fraction, bool) and math.isfinite(float(fraction))
        if not (ok and isinstance(fraction, Real) and 0 < float(fraction) < 1):
            raise ValueError(f"visionzip: contextual_fraction must be a float in (0, 1); got {fraction!r}")
