"""LLaVA-1.5 (`llava`): a CLIP ViT, a 2-layer MLP projector, a Llama-style decoder.

Every image is one square grid of (image_size / patch_size)^2 tokens (576
for CLIP-L/336), consecutive `image_token_id` placeholders in the prompt.
"""

from __future__ import annotations

from typing import Any

import torch

from ..context import LayerCall
from ..layout import ImageLayout, SampleLayout
from .attention import vit_attention_from, vit_attention_received, vit_keys
from .base import Adapter, single_grid_image


class LlavaAdapter(Adapter):
    model_type = "llava"
    lmms_model = "llava_hf"
    grid_keys = ("image_sizes",)
    vision_cls = True
    vision_cls_per_image = True
    template_markers = ("ASSISTANT:",)

    def check_config(self) -> None:
        strategy = self.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(
                f"{self.model_type}: vision_feature_select_strategy={strategy!r} is not supported; "
                "vtprune lays out patch grids for 'default' (CLS dropped), as every released checkpoint uses"
            )

    @property
    def grid_side(self) -> int:
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    def projector_module(self):
        return self.base.multi_modal_projector

    def visual_token_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return ids == self.config.image_token_id

    def find_images(self, captured: dict[str, Any], ids: torch.Tensor, counter: dict[str, int]) -> list[ImageLayout]:
        positions = torch.nonzero(self.visual_token_mask(ids)).flatten()
        side = self.grid_side
        n_images = positions.numel() // (side * side)
        runs = self.split_runs(positions, [side * side] * n_images)
        counter["image"] += n_images
        return [single_grid_image(i, run, side, side) for i, run in enumerate(runs)]

    def vision_layers(self):
        tower = self.base.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    @property
    def feature_vision_layer(self) -> int:
        feature = self.config.vision_feature_layer  # an index into hidden_states, whose entry 0 is the embeddings
        return len(self.vision_layers()) + feature + 1 if feature < 0 else feature

    def vision_attention_received(self, layer: int, call: LayerCall) -> torch.Tensor:
        return vit_attention_received(self.vision_layers()[layer], call.hidden)

    def vision_cls_attention(self, layer: int, call: LayerCall) -> torch.Tensor:
        return vit_attention_from(self.vision_layers()[layer], call.hidden, query=0)

    def vision_cls_feature(self, captured, layouts, b, i, calls):
        per_image = torch.cat([call.hidden for call in calls])
        return per_image[self.global_image_index(layouts, b, i, captured=captured), 0]

    def vision_keys(self, layer: int, call: LayerCall) -> torch.Tensor:
        return vit_keys(self.vision_layers()[layer], call.hidden)

    def vision_token_values(self, captured, layouts, b, i, per_call):
        per_crop = torch.cat(per_call)
        return per_crop[self.global_image_index(layouts, b, i, captured=captured), 1:]  # CLS dropped

    def pre_projector_features(self, captured: dict[str, Any], layouts: list[SampleLayout], b: int, i: int) -> torch.Tensor:
        feats = captured["pre_projector"][0]
        return feats[self.global_image_index(layouts, b, i, captured=captured)]
