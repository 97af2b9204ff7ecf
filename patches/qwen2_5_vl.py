"""Qwen2.5-VL (`qwen2_5_vl`): Qwen2-VL's layout with window attention in the ViT.

The ViT reorders merge units into attention windows before its blocks and
restores raster order after the merger, so pre-projector features are
un-permuted here with the same window index.
"""

from __future__ import annotations

import torch
from transformers.vision_utils import get_vision_window_index

from .qwen2_vl import Qwen2VLAdapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    model_type = "qwen2_5_vl"
    lmms_model = "qwen2_5_vl"

    def merger_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        vision = self.config.vision_config
        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=vision.spatial_merge_size, window_size=vision.window_size, patch_size=vision.patch_size
        )
        return window_index
