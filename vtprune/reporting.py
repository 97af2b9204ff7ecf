"""What the last prefill did: tokens before/after per image and stage, kept indices, selection time."""

from __future__ import annotations

import copy
from typing import Any

import torch

from .layout import SampleLayout


class Report:
    """Describes the last call of a wrapped model (`vtprune.report(model)`): its prefill.

    A call is one ``generate`` (its first prefill: the selection every later
    step reuses) or one forward outside ``generate`` that ran a prefill;
    decode-only forwards leave the report as it is. ``config`` is the bound
    policy's configuration (`Policy.to_dict`, resolved for the model).
    `to_dict()` is plain JSON-able data: ``{"policy": str, "config": dict, "samples": [{"images":
    [{"kind": str, "tokens": int, "stages": {STAGE: {"before": int, "after": int,
    "kept": [int, ...], "ms": float}}}]}]}``. ``kept`` lists positions within the
    image's own token grid (raster order, ascending, newlines skipped); a
    video's stages also say, per frame, its tokens before (``frames_before``)
    and after (``frames``: T counts, frame t holding indices t * P .. t * P + P - 1); a policy that
    merges says which kept tokens' rows are merges (``merged``, a subset of ``kept``); a stage that
    leaves new rows in the sequence (SparseVLM's recycled tokens, rows that were not in the input)
    says how many under ``inserted``: ``after`` counts them, ``kept`` lists only the image's own tokens. STAGE is
    ``vision`` (selected from vision-encoder signals, applied where the
    projector stage is; the vision tower itself sees every token unless a
    policy chose before it, PixelPrune, or inside it, ``vit_layer``; a
    second vision-stage policy is ``vision#2``), ``projector`` or
    ``llm@K``. ``ms`` is the policy's selection time for the whole batch
    at that stage (the same value in every image); for PixelPrune and a
    ``vit_layer`` policy it includes the time they spent choosing inside
    the vision tower's calls.
    """

    def __init__(self, policy: str, samples: list[dict[str, Any]] | None = None, config: dict[str, Any] | None = None) -> None:
        self.policy = policy
        self.samples: list[dict[str, Any]] = samples or []
        #: the bound policy's configuration as plain data (`Policy.to_dict`, resolved for the model)
        self.config: dict[str, Any] = config or {}
        self._frames: list[list[int]] = []  # per image: tokens per frame of a video, 0 for an image

    def start(self, layouts: list[SampleLayout]) -> Report:
        self._frames = [[img.frame_tokens if img.is_video else 0 for img in s.images] for s in layouts]
        self.samples = [
            {"images": [{"kind": img.kind, "tokens": img.num_tokens, "stages": {}} for img in s.images]} for s in layouts
        ]
        return self

    def record_no_images(self, batch_size: int) -> None:
        self.samples = [{"images": []} for _ in range(batch_size)]

    def stage(
        self,
        key: str,
        before: list[list[torch.Tensor]],
        after: list[list[torch.Tensor]],
        ms: float,
        merged: dict[int, dict[int, torch.Tensor]] | None = None,
    ) -> None:
        merged = merged or {}
        frame_sizes = self._frames or [[0] * len(s["images"]) for s in self.samples]
        for b, (sample, bef, aft, sizes) in enumerate(zip(self.samples, before, after, frame_sizes)):
            for i, (image, b_i, a_i, per_frame) in enumerate(zip(sample["images"], bef, aft, sizes)):
                name, n = key, 2
                while name in image["stages"]:
                    name, n = f"{key}#{n}", n + 1
                own = a_i < image["tokens"]  # inserted rows are named N + g (see StageRunner.apply)
                inserted = int((~own).sum())
                image["stages"][name] = {
                    "before": int(b_i.numel()),
                    "after": int(a_i.numel()),
                    "kept": torch.sort(a_i[own]).values.tolist() if inserted else a_i.tolist(),
                    "ms": round(ms, 4),
                }
                if inserted:
                    image["stages"][name]["inserted"] = inserted
                    a_i = a_i[own]
                if image["kind"] == "video" and per_frame:
                    frames = image["tokens"] // per_frame
                    image["stages"][name]["frames_before"] = _per_frame(b_i[b_i < image["tokens"]], per_frame, frames)
                    image["stages"][name]["frames"] = _per_frame(a_i, per_frame, frames)
                if i in merged.get(b, {}):
                    image["stages"][name]["merged"] = merged[b][i].tolist()

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "config": copy.deepcopy(self.config), "samples": copy.deepcopy(self.samples)}

    def __str__(self) -> str:
        lines = [f"vtprune report: {self.policy}"]
        if not self.samples:
            return lines[0] + "\n(no prefill yet)"
        lines.append(f"{'sample':>6} {'image':>5} {'stage':<14} {'before':>7} {'after':>7} {'ms':>9}")
        for s, sample in enumerate(self.samples):
            if not sample["images"]:
                lines.append(f"{s:>6} {'-':>5} {'(no visual tokens)':<14}")
            for i, image in enumerate(sample["images"]):
                for name, st in image["stages"].items():
                    lines.append(f"{s:>6} {i:>5} {name:<14} {st['before']:>7} {st['after']:>7} {st['ms']:>9.3f}")
        return "\n".join(lines)

    __repr__ = __str__


def _per_frame(indices: torch.Tensor, per_frame: int, frames: int) -> list[int]:
    """How many of a video's token indices fall in each of its frames."""
    return torch.bincount(indices.cpu() // per_frame, minlength=frames).tolist()
