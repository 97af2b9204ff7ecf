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
from .family import IMAGE_TOKEN, FamilySpec, Geometry, TinyBatch, text_kwargs, vit_kwargs


class LlavaSpec(FamilySpec):
    """LLaVA-1.5's tiny model (CLIP + Llama), square images, the demo's CLIP processor, ``show`` and ``bench``'s bare
    pipeline."""

    hf_class = "LlavaForConditionalGeneration"
    square_images = True
    bench_bare = True
    drawn = True

    def tiny_config(self, g: Geometry):
        from transformers import LlavaConfig

        return LlavaConfig(**self.vit_llama(g))

    @staticmethod
    def vit_llama(g: Geometry) -> dict:
        """CLIP tower and Llama decoder, as LLaVA-1.5 and LLaVA-NeXT."""
        from transformers import CLIPVisionConfig, LlamaConfig

        vision = CLIPVisionConfig(**vit_kwargs(g), projection_dim=g.vision_hidden)
        text = LlamaConfig(**text_kwargs(g))
        return dict(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE_TOKEN,
                    vision_feature_layer=-2, vision_feature_select_strategy="default")

    def tiny_image(self, batch: TinyBatch, size, images_in_sample):
        side = batch.vision.image_size
        batch.pixels.append(batch.randn(3, side, side))
        return [IMAGE_TOKEN] * batch.adapter.grid_side**2

    def tiny_visual_inputs(self, batch):
        return {"pixel_values": torch.stack(batch.pixels)} if batch.pixels else {}

    def alone_visual_inputs(self, batch, b, mask):
        n_before = sum(self.images_in_row(batch, r) for r in range(b))
        n_mine = self.images_in_row(batch, b)
        return self.image_rows(batch, n_before, n_mine) if n_mine else {}

    def images_in_row(self, batch: dict, row: int) -> int:
        """Images of a row of `batch` (every image has the same number of placeholders)."""
        ids = batch["input_ids"]
        if "pixel_values" not in batch:
            return 0
        return int((ids[row] == IMAGE_TOKEN).sum()) * len(batch["pixel_values"]) // int((ids == IMAGE_TOKEN).sum())

    def image_rows(self, batch: dict, start: int, n: int) -> dict:
        """Images ``start ... start + n - 1`` of `batch` as a batch's image inputs."""
        return {"pixel_values": batch["pixel_values"][start : start + n]}

    def demo_image(self, model, adapter, image, pixels):
        from transformers import CLIPImageProcessorPil

        proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        return proc(image, return_tensors="pt"), [IMAGE_TOKEN] * adapter.grid_side**2

    def view_and_grid(self, model, processor, inputs, image):
        import numpy as np

        ip = processor.image_processor
        pixels = inputs["pixel_values"][0].float().permute(1, 2, 0).numpy()
        pixels = pixels * np.array(ip.image_std) + np.array(ip.image_mean)
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        return (pixels.clip(0, 1) * 255).astype(np.uint8), (side, side)


class LlavaAdapter(Adapter):
    model_type = "llava"
    lmms_model = "llava_hf"
    grid_keys = ("image_sizes",)
    vision_cls = True
    vision_cls_per_image = True
    template_markers = ("ASSISTANT:",)
    spec = LlavaSpec()

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
