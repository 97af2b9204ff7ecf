"""Qwen2.5-VL (`qwen2_5_vl`): Qwen2-VL's layout with window attention in the ViT.

The ViT reorders merge units into attention windows before its blocks and
restores raster order after the merger, so pre-projector features are
un-permuted here with the same window index.

Encoding a subset of the merge units (PixelPrune, `encode_kept`): the
windows are the whole grid's (8 x 8 patches at the released window of 112
px), each keeping its kept units in window order; windows left empty
disappear from ``cu_window_seqlens``; the window index is renumbered over
the kept units, so the tower's own un-permutation after the merger returns
the kept units in raster order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.vision_utils import get_vision_window_index

from .family import Geometry
from .qwen2_vl import Qwen2VLAdapter, Qwen2VLSpec


class Qwen2_5_VLSpec(Qwen2VLSpec):
    """The tiny Qwen2.5-VL model: Qwen2-VL's with 2 x 2-merge-unit attention windows and a full-attention last block."""

    hf_class = "Qwen2_5_VLForConditionalGeneration"

    def tiny_config(self, g: Geometry):
        from transformers import Qwen2_5_VLConfig

        text, vision, ids = self.parts(g)
        vision.update(window_size=4 * g.patch * 2, fullatt_block_indexes=[g.vision_layers - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    model_type = "qwen2_5_vl"
    lmms_model = "qwen2_5_vl"
    spec = Qwen2_5_VLSpec()

    def merger_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        vision = self.config.vision_config
        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=vision.spatial_merge_size, window_size=vision.window_size, patch_size=vision.patch_size
        )
        return window_index

    def kept_tower_inputs(self, grid_thw: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor) -> dict[str, Any]:
        """Qwen2-VL's, plus the attention windows of the kept units: window index and ``cu_window_seqlens``."""
        out = super().kept_tower_inputs(grid_thw, keep, rows)
        vision = self.config.vision_config
        window_index, cu_window = get_vision_window_index(
            grid_thw,
            spatial_merge_size=vision.spatial_merge_size,
            window_size=vision.window_size,
            patch_size=vision.patch_size,
        )
        unit = self.merge**2
        keep = keep.to(window_index.device)
        bounds = (cu_window.to(window_index.device).long() // unit)[1:]
        window_of = torch.searchsorted(bounds, torch.arange(window_index.numel(), device=window_index.device), right=True)
        kept_in_order = keep[window_index]  # window order: is this position's unit kept
        rank = torch.cumsum(keep.long(), 0) - 1  # a kept unit's index among the kept units (raster order)
        counts = torch.bincount(window_of[kept_in_order], minlength=bounds.numel()) * unit
        out["window_index"] = rank[window_index[kept_in_order]]
        out["cu_window_seqlens"] = torch.unique_consecutive(F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0)))
        return out
