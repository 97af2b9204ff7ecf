"""LLaVA-NeXT (`llava_next`): anyres crops plus newline tokens.

Each image is a base view (one square grid) followed by the unpadded
high-resolution view, whose rows each end in an `image_newline` token. The
newlines are structure: always kept, never counted in a budget. The patch
tokens are indexed in span order with newlines skipped, so the two views
are two sub-grids of one image.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import BadValue
from ..layout import ImageLayout, SampleLayout, SubGrid
from .family import IMAGE_TOKEN, Geometry, TinyBatch, placeholder_runs
from .llava import LlavaAdapter, LlavaSpec


class LlavaNextSpec(LlavaSpec):
    """LLaVA-NeXT's tiny model: LLaVA-1.5's with anyres crops (grid pinpoints of 1 x 2, 2 x 1 and 2 x 2 views)."""

    hf_class = "LlavaNextForConditionalGeneration"
    square_images = False
    bench_bare = False
    drawn = False

    def tiny_config(self, g: Geometry):
        from transformers import LlavaNextConfig

        s = g.image_size
        return LlavaNextConfig(image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]], **self.vit_llama(g))

    def tiny_image(self, batch: TinyBatch, size, images_in_sample):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        h, w = size
        side = batch.vision.image_size
        n_crops = image_size_to_num_patches([h, w], batch.model.config.image_grid_pinpoints, side)
        batch.pixels.append(batch.randn(n_crops, 3, side, side))
        batch.sizes.append([h, w])
        rh, rw = batch.adapter.hires_shape(torch.tensor([h, w]))
        return [IMAGE_TOKEN] * (batch.adapter.grid_side**2 + rh * (rw + 1))

    def tiny_visual_inputs(self, batch):
        if not batch.pixels:
            return {}
        most = max(p.shape[0] for p in batch.pixels)
        padded = torch.zeros(len(batch.pixels), most, *batch.pixels[0].shape[1:])
        for i, p in enumerate(batch.pixels):
            padded[i, : p.shape[0]] = p
        return {"pixel_values": padded, "image_sizes": torch.tensor(batch.sizes)}

    def images_in_row(self, batch, row):
        return placeholder_runs(batch["input_ids"][row] == IMAGE_TOKEN)

    def image_rows(self, batch, start, n):
        return {"pixel_values": batch["pixel_values"][start : start + n], "image_sizes": batch["image_sizes"][start : start + n]}

    def demo_image(self, model, adapter, image, pixels):
        from transformers import LlavaNextImageProcessorPil

        proc = LlavaNextImageProcessorPil(
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            image_grid_pinpoints=model.config.image_grid_pinpoints,
        )
        pix = proc(image, return_tensors="pt")
        rows, cols = adapter.hires_shape(pix["image_sizes"][0])
        return pix, [IMAGE_TOKEN] * (adapter.grid_side**2 + rows * (cols + 1))


class LlavaNextAdapter(LlavaAdapter):
    model_type = "llava_next"
    vision_cls_per_image = False  # one CLS per crop: VisionZip's reference budgets each crop instead
    spec = LlavaNextSpec()
    #: a unit is one patch of one crop (each crop is one tower image); a token's patch is found by packing the
    #: crops' row indices as the model packs features (`_token_rows`)
    pixel_prune = True
    vit_prune = True

    def hires_shape(self, image_size: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of the unpadded high-resolution view of an image of `image_size` (h, w)."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        vision = self.config.vision_config
        side = self.grid_side
        rows, cols = get_anyres_image_grid_shape(image_size.tolist(), self.config.image_grid_pinpoints, vision.image_size)
        shape = unpad_image(torch.empty(0, rows * side, cols * side), image_size.tolist()).shape
        return shape[1], shape[2]

    def find_images(self, captured: dict[str, Any], ids: torch.Tensor, counter: dict[str, int]) -> list[ImageLayout]:
        sizes = captured.get("image_sizes")
        positions = torch.nonzero(self.visual_token_mask(ids)).flatten()
        side = self.grid_side
        images: list[ImageLayout] = []
        cursor = 0
        while cursor < positions.numel():
            if sizes is None or counter["image"] >= len(sizes):
                raise ValueError("llava_next: the prompt holds more image placeholders than `image_sizes` describes")
            h, w = self.hires_shape(torch.as_tensor(sizes[counter["image"]]))
            base = side * side
            span = positions[cursor : cursor + base + h * (w + 1)]
            if span.numel() != base + h * (w + 1):
                raise ValueError(
                    f"llava_next: image {counter['image']} needs {base + h * (w + 1)} placeholder tokens, "
                    f"the prompt has {span.numel()}"
                )
            hires = span[base:].view(h, w + 1)
            images.append(
                ImageLayout(
                    index=len(images),
                    positions=torch.cat([span[:base], hires[:, :w].flatten()]),
                    grids=[SubGrid(0, side, side), SubGrid(base, h, w)],
                    newline_positions=hires[:, w],
                )
            )
            cursor += span.numel()
            counter["image"] += 1
        return images

    def vision_token_values(self, captured, layouts, b, i, per_call):
        per_crop = torch.cat(per_call)[:, 1:]  # CLS dropped
        rows = per_crop if per_crop.dim() == 3 else per_crop[..., None]
        packed = self._pack(captured, layouts, b, i, rows)
        return packed if per_crop.dim() == 3 else packed[:, 0]

    def pre_projector_features(self, captured: dict[str, Any], layouts: list[SampleLayout], b: int, i: int) -> torch.Tensor:
        return self._pack(captured, layouts, b, i, captured["pre_projector"][0])

    def _image_crops(self, captured) -> list[int]:
        """Crops (tower images) of each image of the encoder's image call, in order: the base view plus its tiles."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        vision = self.config.vision_config
        return [
            image_size_to_num_patches(torch.as_tensor(s).tolist(), self.config.image_grid_pinpoints, vision.image_size)
            for s in self.encoded(captured, "image_sizes")
        ]

    def _pack(self, captured, layouts, b, i, feats: torch.Tensor) -> torch.Tensor:
        """Per-crop rows ``(crops, side^2, D)`` of image i -> its patch tokens in span order (newlines skipped)."""
        sizes = self.encoded(captured, "image_sizes")
        crops = self._image_crops(captured)
        g = self.global_image_index(layouts, b, i, captured=captured)
        start = sum(crops[:g])
        per_image = feats[start : start + crops[g]]
        packed, _ = self.base.pack_image_features(
            [per_image], torch.as_tensor(sizes[g : g + 1]), self.config.vision_feature_select_strategy, image_newline=None
        )
        return packed[0]

    # --- pruning before and inside the encoder: a unit is one patch of one crop ----------------------------
    def _mixing(self, captured, layouts, b: int, i: int) -> str | None:
        """Why image i's tokens do not each come from one patch of one crop, or None (LLaVA-NeXT: they always do)."""
        return None

    def _call_units(self, captured, kind: str, per_call: list[torch.Tensor]) -> torch.Tensor:
        """Per-crop values of the encoder call that encoded the media of `kind` (LLaVA-NeXT: one image call)."""
        return torch.cat(per_call)

    def _token_rows(self, captured, layouts, b: int, i: int, patches: int) -> torch.Tensor:
        """The patch of each of image i's tokens (span order, newlines skipped) as its index ``crop * patches + p``
        among the patches of the image's encoder call.

        The model's own packing (`_pack`: tiles placed side by side,
        unpadded) applied to the call's patch indices. Refused (BadValue)
        where a token mixes several patches (`_mixing`): a patch pruned before
        or inside the tower would enter a kept token as zeros.
        """
        reason = self._mixing(captured, layouts, b, i)
        if reason is not None:
            raise BadValue(
                f"{self.model_type}: {reason}, so its tokens do not each come from one patch; pruning before or "
                "inside the vision encoder (pixelprune, vit_layer) is refused for it rather than mix the dropped "
                "patches into kept tokens. Use a policy after the encoder (vit_layer=None) for this input"
            )
        crops = sum(self._image_crops(captured))
        rows = torch.arange(crops * patches, device=layouts[b].valid.device).view(crops, patches, 1)
        return self._pack(captured, layouts, b, i, rows)[:, 0]

    def raster_unit_rows(self, captured, layouts, b: int, i: int, per_call: list[torch.Tensor]) -> torch.Tensor:
        """Values per patch of every crop of an encoder call (one row per crop) -> image i's tokens, span order."""
        units = self._call_units(captured, layouts[b].images[i].kind, per_call)
        rows = self._token_rows(captured, layouts, b, i, units.shape[1])
        return units.flatten(0, 1)[rows.to(units.device)]

    def encoder_call_grid(self, grid_thw, captured, layouts, hidden):
        """Each item's token rows (`_token_rows`) in this tower call, by its index among the call's items."""
        patches = hidden.shape[1] - int(self.vision_cls)
        return {
            self.global_image_index(layouts, b, i, image.kind, captured=captured): self._token_rows(
                captured, layouts, b, i, patches
            ).to(hidden.device)
            for b, sample in enumerate(layouts)
            for i, image in enumerate(sample.images)
        }

    def encoder_keep_units(self, grid_thw, hidden: torch.Tensor, chosen: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """``(image, indices of its tokens)`` pairs of one tower call -> bool ``(crops, P)``: the patches the tokens
        come from (`encoder_call_grid`'s rows); patches the model unpads away are no token and are dropped."""
        patches = hidden.shape[1] - int(self.vision_cls)
        keep = torch.zeros(hidden.shape[0] * patches, dtype=torch.bool, device=hidden.device)
        for item, indices in chosen:
            keep[grid_thw[item][indices.to(hidden.device)]] = True
        return keep.view(hidden.shape[0], patches)

    def encoder_unit_rows(self, grid_thw, hidden: torch.Tensor, item: int, indices: torch.Tensor) -> torch.Tensor:
        return grid_thw[item][indices.to(hidden.device)]
