"""Video pruning: EVS, VidCom2 and DyCoke's temporal token merging, at the projector stage.

Each video is its own problem, read as T frames of P tokens (the layout's
``num_frames`` and ``frame_tokens``: a Qwen temporal slot of two input
frames, or one LLaVA-OneVision frame of 14 x 14 pooled tokens). Images in
the same prompt pass through untouched: to prune both, put an image policy
after the video policy in a `Pipeline`. The selection math is in
`vtprune.ops.video`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..context import StageContext
from ..ops.video import dycoke_select, evs_select, keeps_all, vidcom2_select
from .base import Policy, Selection, register


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
