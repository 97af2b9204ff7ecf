"""Qwen2.5-VL (`qwen2_5_vl`): Qwen2-VL's layout with window attention in the ViT.

The ViT reorders merge units into attention windows before its blocks and
restores raster order after the merger, so pre-projector features are
un-permuted here with the same window index.
"""

from __future__ import annotations

import torch
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
    pixel_prune = False  # the window-attention path is not done yet

    def merger_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        vision = self.config.vision_config
        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=vision.spatial_merge_size, window_size=vision.window_size, patch_size=vision.patch_size
        )
        return window_index
