"""Video pruning: EVS, VidCom2, FastVID and DyCoke's temporal token merging, at the projector stage.

Each video is its own problem, read as T frames of P tokens (the layout's
``num_frames`` and ``frame_tokens``: a Qwen temporal slot of two input
frames, or one LLaVA-OneVision frame of 14 x 14 pooled tokens). Images in
the same prompt pass through untouched: to prune both, put an image policy
after the video policy in a `Pipeline`. The selection math is in
`vtprune.ops.video`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..budget import validate_keep
from ..checks import check_int, check_number
from ..context import StageContext
from ..ops.video import (
    dycoke_select,
    evs_select,
    fastvid_apply,
    fastvid_counts,
    fastvid_noise,
    fastvid_ov_select,
    fastvid_qwen_select,
    keeps_all,
    vidcom2_select,
)
from .base import Policy, Selection, Signals, probe_depth, register


@dataclass(frozen=True)
class VideoPolicy(Policy):
    """Base of the video policies: one keep set per video from its ``(T, P, D)`` features; images kept whole.

    ``keep`` is a fraction of each video's N = T * P tokens (float in (0, 1])
    or a token count per video (int), fed into the method's own budget rule;
    keep = 1.0 or an int >= N keeps the video untouched.
    """

    keep: int | float = 0.25
    stage: ClassVar[str] = "projector"
    whole_grid: ClassVar[bool] = True

    def resolve(self, adapter) -> Policy:
        if not adapter.videos:
            from ..patches import supported_video

            raise ValueError(
                f"{self.name} prunes videos, and {adapter.model_type} takes none; video families: "
                f"{', '.join(supported_video())} (use an image policy here)"
            )
        return self

    def select_sample(self, ctx: StageContext, b: int) -> list[Selection]:
        out = []
        for i, image in enumerate(ctx.layouts[b].images):
            n = int(ctx.alive[b][i].numel())
            if not image.is_video or keeps_all(self.keep, n):
                out.append(Selection(torch.arange(n, device=ctx.hidden.device)))
                continue
            x = self.video_features(ctx, b, i).reshape(image.num_frames, image.frame_tokens, -1)
            out.append(Selection(self.select_video(x).to(ctx.hidden.device)))
        return out

    def video_features(self, ctx: StageContext, b: int, i: int) -> torch.Tensor:
        """The video's projector output ``(N, D)`` (newline and other structure excluded)."""
        return ctx.features(b, i)

    def select_video(self, x: torch.Tensor) -> torch.Tensor:
        """Kept flat indices (ascending) of one video ``(T, P, D)``."""
        raise NotImplementedError


@register
@dataclass(frozen=True)
class EVS(VideoPolicy):
    """EVS, Efficient Video Sampling: keep the tokens that changed most since the previous frame.

    Source: "Efficient Video Sampling: Pruning Temporally Redundant Tokens
    for Faster VLM Inference" (NVIDIA, arXiv 2510.14624); follows vLLM
    0.34.0's implementation (``vllm/multimodal/video_prune/evs.py``,
    ``compute_retention_mask``), switched on there by
    ``--video-pruning-rate q`` with q = 1 - keep. A token scores
    1 - cos(x[t, i], x[t-1, i]) against the same cell of the previous frame;
    frame 0 is always kept whole; the video keeps the top
    max(P, int(T * P * keep)) tokens (an int keep k: max(P, min(k, N))),
    ties to the lowest flat index (vLLM's stable sort: the same set even on
    ties). No merging, positions unchanged.

    Departures: vLLM ships it for Qwen2.5-VL, Qwen3-VL and Qwen3.5; here it
    runs on every video family (LLaVA-OneVision on its 14 x 14 pooled grid).
    On Qwen2.5-VL vLLM's positions differ (it truncates
    ``second_per_grid_ts`` to an integer and restarts the text after the
    video at base + grid width): kept tokens keep HF's unpruned M-RoPE rows.
    vLLM's Qwen3.5 model never sets up its pruning fields; it works here.
    The paper ranks pixel differences against a percentile threshold; the
    code, followed here, ranks cosine changes of the projector output.

    Parameters:
        keep: fraction of each video's tokens (float) or tokens per video
            (int); default 0.25.
        deepstack: Qwen3-VL(-MoE) only: score the merger output and the
            DeepStack levels side by side (True, as vLLM, whose vision tower
            returns their concatenation) or the merger output alone (False);
            models without such levels ignore it.
    """

    keep: int | float = 0.25
    deepstack: bool = True

    name: ClassVar[str] = "evs"
    paper: ClassVar[str] = "EVS (NVIDIA, arXiv 2510.14624), code vLLM 0.34.0 video_prune/evs.py"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.deepstack, bool):
            raise TypeError(f"evs: deepstack must be True or False; got {self.deepstack!r}")

    def video_features(self, ctx: StageContext, b: int, i: int) -> torch.Tensor:
        x = ctx.features(b, i)
        levels = ctx.feature_levels(b, i) if self.deepstack else []
        return torch.cat([x.float(), *(lv.to(x.device).float() for lv in levels)], dim=-1) if levels else x

    def select_video(self, x: torch.Tensor) -> torch.Tensor:
        return evs_select(x, self.keep)

    def describe(self) -> str:
        return f"evs(keep={self.keep})"


@register
@dataclass(frozen=True)
class VidCom2(VideoPolicy):
    """VidCom2: keep the tokens least like both the video's mean and their frame's, more in distinctive frames.

    Source: "Video Compression Commander: Plug-and-Play Inference
    Acceleration for Video Large Language Models" (EMNLP 2025; official code
    xuyang-liu16/VidCom2, ``token_compressor/vidcom2/vidcom2.py``,
    ``vidcom2_compression``), and vLLM 0.34.0's port
    (``vllm/multimodal/video_prune/vidcom2.py``) for ``budget="exact"``.
    On the int(D/2) lowest-variance channels of the projector output,
    tokens normalised, a multi-scale Gaussian similarity to the video's mean
    (v) and to the frame's mean (f) gives the redundancy u = v + f; frame t
    gets k_t = max(1, round(min(1, r * (1 + p_t - 1/T)) * P)) tokens with
    p = softmax(-(mean v per frame) / 0.01) and keeps its k_t tokens of
    smallest u. ``budget="reference"`` stops there (sum of k_t, close to
    r * N); ``"exact"`` (vLLM) then drops the kept tokens of largest u, or
    adds the unkept of smallest u, until max(T, int(N * keep)) remain.

    Departures: fp32 selection (the official computes in the model dtype,
    where a k_t next to a half can move by one); ties to the lowest index
    (the official ``topk`` leaves them unspecified); keep = 1.0 keeps every
    token (the official at r = 1 still drops tokens of frames with
    p_t < 1/T); every sample of a batch is pruned (the official turns
    compression off above batch 1); on Qwen3-VL the merger output alone is
    scored, as the official (vLLM scores its DeepStack concatenation). The
    LLaVA-OneVision official prunes before the sequence is built, so its
    positions are compact (``positions="compact"`` reproduces them).

    Parameters:
        keep: the retention r, a fraction (float) or tokens per video (int,
            read as r = k / N; ``exact`` then keeps max(T, k)); default 0.25.
        budget: ``"reference"`` (the official count) or ``"exact"`` (vLLM's).
    """

    keep: int | float = 0.25
    budget: str = "reference"

    name: ClassVar[str] = "vidcom2"
    paper: ClassVar[str] = "VidCom2 (EMNLP 2025), code xuyang-liu16/VidCom2; budget='exact': vLLM 0.34.0"
    BUDGETS: ClassVar[tuple[str, ...]] = ("reference", "exact")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget not in self.BUDGETS:
            raise ValueError(f"vidcom2: budget must be one of {self.BUDGETS}; got {self.budget!r}")

    def select_video(self, x: torch.Tensor) -> torch.Tensor:
        return vidcom2_select(x, self.keep, self.budget)

    def describe(self) -> str:
        return f"vidcom2(keep={self.keep}, budget={self.budget})"


@register
@dataclass(frozen=True)
class DyCoke(VideoPolicy):
    """DyCoke's temporal token merging (TTM): later frames of pairs and windows keep only the cells that changed.

    Source: "DyCoke: Dynamic Compression of Tokens for Fast Video Large
    Language Models" (CVPR 2025; official code KD-TAO/DyCoke,
    ``llava/model/llava_arch.py``, ``dycole_ttm``). In pairs of frames
    (0, 1), (2, 3), ... the first is kept whole and the second keeps the n
    cells least similar (cosine) to the same cell of the first; in windows
    i = 0, 4, ... while i < T - 4, frame i + 2 keeps its n cells least
    similar to frame i. n = int(keep * P) per pruned frame (an int keep k:
    k // T), so keep = 0.3 (the official pruned share K = 0.7) keeps about
    half of a video. Nothing is averaged.

    Departures: an odd last frame is kept whole (the official drops it);
    T <= 4 runs the pairs only (the official raises); kept tokens keep their
    order (the official emits a pruned frame's cells by ascending
    similarity); ties to the lowest index; every sample of a batch is
    pruned. The decode-time pruning of the paper (attention-guided KV
    selection at each decode step) is not offered. LLaVA-OneVision's
    official positions are compact (``positions="compact"`` reproduces them).

    Parameters:
        keep: the share of each pruned frame kept (float), or tokens per
            video spread over its frames (int); default 0.3.
    """

    keep: int | float = 0.3

    name: ClassVar[str] = "dycoke"
    paper: ClassVar[str] = "DyCoke (CVPR 2025), code KD-TAO/DyCoke (its TTM)"

    def select_video(self, x: torch.Tensor) -> torch.Tensor:
        return dycoke_select(x, self.keep)

    def describe(self) -> str:
        return f"dycoke(keep={self.keep})"


@register
@dataclass(frozen=True)
class FastVID(VideoPolicy):
    """FastVID: segments of similar frames; per frame the most attended tokens kept, density peaks absorb the rest.

    Source: "FastVID: Dynamic Density Pruning for Fast Video Large Language
    Models" (NeurIPS 2025; official code LunarShen/FastVID, the LLaVA-OneVision
    path in ``llava/model/language_model/modeling_qwen2.py`` and the
    Qwen2.5-VL path in ``lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py``).
    Frames are cut into segments after the ``segments`` - 1 least similar
    adjacent frames and wherever similarity < ``tau`` (frame-global
    features: the mean of each frame's projector rows). Each frame keeps
    R = int(P * keep) tokens: the top salient ones by ViT attention,
    unchanged, and context tokens, density peaks (delta * rho, with a
    1e-6 * uniform tie-break drawn from ``seed``) that each merge the tokens
    most like them: w * target + (1 - w) * mean(members),
    w = max(``beta``, 1 / (n + 1)). A merged row stays at its target's
    position. LLaVA-OneVision path (S = R - int(R * ``context``) salient and
    C = R - S context per frame; every ``stride``-th frame of a segment,
    counted from its last, is an anchor merging the whole segment);
    Qwen path (budgets per segment, near-duplicate frames above ``ignore``
    give their tokens to the last of their run, context capped at P / 2).
    Saliency: Qwen, as the official, the last ViT block's attention from
    each frame's mean query to its merge units' mean keys; OneVision, the
    attention received at the feature layer, pooled to the 14 x 14 grid.

    Departures: the OneVision official reads SigLIP's attention-pooling head,
    which HF LLaVA-OneVision checkpoints do not ship (vtprune reads the mean
    of each frame's rows and the attention received at the feature layer,
    so cuts and salient sets differ on the same video); fewer than
    ``segments`` frames cut every gap (the official raises), and a video
    with no cut at all is one segment (the official Qwen path raises); an anchor's
    context is capped at its P - S candidates (the official raises above
    keep 0.45 or so); the noise is drawn on the CPU from ``seed`` in a forked
    RNG (the official reads the global RNG on the model's device: the
    caller's RNG stays untouched); equal cosine to two targets joins the
    lowest index; selection and merging in fp32 (the official merges in the
    model dtype); every video of every sample is pruned (the official: the
    first video, batch 1). keep = 1.0 keeps every token, unmerged.
    Qwen2-VL, Qwen3-VL(-MoE) and Qwen3.5 run the Qwen path (no official
    code); Qwen3-VL's DeepStack rows are kept and merged with the same
    weights.

    Parameters:
        keep: the retention r per frame (float), or tokens per video (int,
            R = k // T); None: the model's default (OneVision 0.10, Qwen 0.27).
        segments: c, at least this many segments; default 8.
        tau: cut where adjacent frames' similarity is below it; None: the
            model's default (OneVision 0.9, Qwen 0.84).
        ignore: Qwen path: near-duplicate frames (similarity >= ignore)
            inside a segment; None: the model's default (0.95); unused on
            OneVision.
        context: d, the context share of each frame's (segment's) budget;
            default 0.4.
        stride: p, the anchor stride; default 4.
        beta: the least weight a target keeps in its merge; default 0.6.
        seed: the density tie-break draw's seed; default 0.
        vision_layer: 1-based ViT layer of the saliency; None: the feature
            layer (the last block on Qwen, as the official).
    """

    keep: int | float | None = None  # type: ignore[assignment]  # None: model_zoo.yaml's per-family budget
    segments: int = 8
    tau: float | None = None
    ignore: float | None = None
    context: float = 0.4
    stride: int = 4
    beta: float = 0.6
    seed: int = 0
    vision_layer: int | None = None
    path: str = field(default="", init=False, repr=False, compare=False)

    name: ClassVar[str] = "fastvid"
    paper: ClassVar[str] = "FastVID (NeurIPS 2025), code LunarShen/FastVID"
    zoo_fields: ClassVar[tuple[str, ...]] = ("keep", "tau", "ignore")

    def __post_init__(self) -> None:
        if self.keep is not None:
            self._set("keep", validate_keep(self.keep))
        check_int(self.name, "segments", self.segments, minimum=1)
        check_int(self.name, "stride", self.stride, minimum=1)
        check_int(self.name, "seed", self.seed, minimum=0)
        if self.vision_layer is not None:
            check_int(self.name, "vision_layer", self.vision_layer, minimum=1)
        for name in ("tau", "ignore"):  # cosine similarities
            self._set(name, check_number(self.name, name, getattr(self, name), -1.0, 1.0, allow_none=True))
        for name in ("context", "beta"):
            self._set(name, check_number(self.name, name, getattr(self, name), 0.0, 1.0))

    def resolve(self, adapter) -> Policy:
        super().resolve(adapter)
        path = "onevision" if adapter.model_type == "llava_onevision" else "qwen"
        self.require_zoo(adapter, "keep", "tau", *(("ignore",) if path == "qwen" else ()))
        depth = probe_depth(adapter, "fastvid")
        layer = self.vision_layer or adapter.feature_vision_layer
        if not 1 <= layer <= depth:
            raise ValueError(f"fastvid: vision_layer={layer} is outside this ViT's layers 1..{depth}")
        bound = dataclasses.replace(self, vision_layer=layer)
        object.__setattr__(bound, "path", path)
        return bound

    def signals(self) -> Signals:
        return Signals(vision_inputs=(self.resolved("vision_layer") - 1,))

    def select_sample(self, ctx: StageContext, b: int) -> list[Selection]:
        out = []
        for i, image in enumerate(ctx.layouts[b].images):
            n = int(ctx.alive[b][i].numel())
            if not image.is_video or keeps_all(self.resolved("keep"), n):
                out.append(Selection(torch.arange(n, device=ctx.hidden.device)))
                continue
            out.append(self.select_one(ctx, b, i, image.num_frames, image.frame_tokens))
        return out

    def select_one(self, ctx: StageContext, b: int, i: int, t: int, p: int) -> Selection:
        x = ctx.features(b, i).reshape(t, p, -1)
        g = x.float().mean(dim=1)
        layer = self.resolved("vision_layer") - 1
        keep, tau = self.resolved("keep", "tau")
        if self.path == "onevision":
            a = ctx.vision_attention(b, i, layer).reshape(t, p)
            salient, _ = fastvid_counts(p, keep, self.context, t)
            noise = fastvid_noise(t, p - salient, self.seed)
            pick = fastvid_ov_select(x, g, a, keep, noise, self.segments, tau, self.context, self.stride, self.beta)
        else:
            a = ctx.vision_frame_saliency(b, i, layer).reshape(t, p)
            pick = fastvid_qwen_select(
                x, g, a, keep, self.seed, self.segments, tau, self.resolved("ignore"), self.context, self.stride, self.beta
            )
        kept = pick.indices.numel()
        levels = [fastvid_apply(pick.mix, kept, lv) for lv in ctx.feature_levels(b, i)]
        device = ctx.hidden.device
        return Selection(
            pick.indices.to(device), values=pick.values.to(device), level_values=levels or None, merged=pick.merged.to(device)
        )

    def describe(self) -> str:
        return f"fastvid(keep={self.keep})"
