"""Qwen2-VL (`qwen2_vl`): dynamic resolution, a 2x2 patch merger, M-RoPE.

Each image (or video) has ``t * h * w / merge^2`` merged tokens, laid out by
``image_grid_thw`` / ``video_grid_thw``; a video has one sub-grid per
temporal frame. Positions are M-RoPE rows, so `compact` is not offered.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..layout import ImageLayout, SampleLayout
from .base import Adapter, single_grid_image


class Qwen2VLAdapter(Adapter):
    model_type = "qwen2_vl"
    mrope = True
    grid_keys = ("image_grid_thw", "video_grid_thw")
    vision_methods = ("get_image_features", "get_video_features")
    template_markers = ("<|im_end|>",)

    @property
    def merge(self) -> int:
        return self.config.vision_config.spatial_merge_size

    def projector_module(self):
        return self.base.visual.merger

    def visual_token_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids == self.config.image_token_id) | (ids == self.config.video_token_id)

    def layouts(self, captured: dict[str, Any], inputs_embeds: torch.Tensor):
        found = super().layouts(captured, inputs_embeds)
        if found is not None and captured.get("mm_token_type_ids") is None:
            # transformers 5.x then silently uses 1-D positions for the image tokens (no error, other logits)
            warnings.warn(
                f"{self.model_type}: inputs hold images but no mm_token_type_ids, so the model falls back to 1-D "
                "positions for them; pass the processor's mm_token_type_ids",
                RuntimeWarning,
                stacklevel=2,
            )
        return found

    def structure_token_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids == self.config.vision_start_token_id) | (ids == self.config.vision_end_token_id)

    def find_images(self, captured: dict[str, Any], ids: torch.Tensor, counter: dict[str, int]) -> list[ImageLayout]:
        images = []
        visual = torch.nonzero(self.visual_token_mask(ids)).flatten()
        cursor = 0
        while cursor < visual.numel():
            kind = "image" if int(ids[visual[cursor]]) == self.config.image_token_id else "video"
            grids = captured.get(f"{kind}_grid_thw")
            if grids is None or counter[kind] >= len(grids):
                raise ValueError(f"{self.model_type}: the prompt holds more {kind} placeholders than {kind}_grid_thw describes")
            t, h, w = (int(x) for x in grids[counter[kind]])
            hm, wm = h // self.merge, w // self.merge
            span = visual[cursor : cursor + t * hm * wm]
            images.append(single_grid_image(len(images), span, hm, wm, frames=t, kind=kind))
            cursor += span.numel()
            counter[kind] += 1
        return images

    def merger_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Permutation the ViT applied to merge units before the merger (None: raster order)."""
        return None

    def pre_projector_features(self, captured: dict[str, Any], layouts: list[SampleLayout], b: int, i: int) -> torch.Tensor:
        image = layouts[b].images[i]
        g = self.global_image_index(layouts, b, i, image.kind, captured=captured)
        # One encoder call per modality; find the one that encoded this kind.
        method = "get_image_features" if image.kind == "image" else "get_video_features"
        for call, features in zip(captured["vision_calls"], captured["pre_projector"]):
            if call["method"] == method:
                grid_thw, feats = call[f"{image.kind}_grid_thw"], features
                break
        else:
            raise RuntimeError(f"no captured vision features for the {image.kind}s of this batch")
        unit = self.merge**2
        merged = feats.reshape(feats.shape[0] // unit, unit * feats.shape[-1])
        order = self.merger_order(grid_thw)
        if order is not None:
            merged = merged[torch.argsort(order.to(merged.device))]
        sizes = (grid_thw.prod(-1) // unit).tolist()
        return torch.split(merged, sizes)[g]

    def decode_positions_from_cache(self, outer: dict[str, Any]) -> bool:
        # Qwen derives decode positions from the 2-D mask when it has one.
        return outer.get("position_ids") is None and outer.get("attention_mask") is None
