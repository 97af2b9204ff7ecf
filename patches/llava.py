"""LLaVA-1.5 (`llava`): a CLIP ViT, a 2-layer MLP projector, a Llama-style decoder.

Every image is one square grid of (image_size / patch_size)^2 tokens (576
for CLIP-L/336), consecutive `image_token_id` placeholders in the prompt.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..context import LayerCall
from ..layout import ImageLayout, SampleLayout
from ..ops.pixel import pred2d_keep
from .attention import vit_attention_from, vit_attention_received, vit_keys
from .base import CLIP_PIXEL_NORM, Adapter, single_grid_image
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
        return dict(
            vision_config=vision.to_dict(),
            text_config=text.to_dict(),
            image_token_id=IMAGE_TOKEN,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )

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
    grid_keys: ClassVar[tuple[str, ...]] = ("image_sizes",)
    vision_cls = True
    vision_cls_per_image = True
    template_markers = ("ASSISTANT:",)
    spec = LlavaSpec()
    #: the image processor's per-channel normalisation (mean, std): CLIP's
    pixel_norm: ClassVar[tuple[tuple[float, ...], tuple[float, ...]]] = CLIP_PIXEL_NORM
    pixel_prune = True
    vit_prune = True

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
        return vit_attention_received(self.vision_layers()[layer], call.hidden, valid=self._valid_tokens(call))

    def vision_cls_attention(self, layer: int, call: LayerCall) -> torch.Tensor:
        return vit_attention_from(self.vision_layers()[layer], call.hidden, query=0, valid=self._valid_tokens(call))

    @staticmethod
    def _valid_tokens(call: LayerCall) -> torch.Tensor | None:
        """Tokens of a layer call that exist: None (all) unless the images were padded (`encode_kept`'s key mask)."""
        mask = call.args[1] if len(call.args) > 1 else call.kwargs.get("attention_mask")
        return None if mask is None else mask[:, 0, 0, :] == 0

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

    # --- pruning before the encoder (PixelPrune) ------------------------
    def vision_tower(self):
        return self.base.vision_tower

    def unit_keep(self, pixel_values: torch.Tensor, grid_thw, tau: float) -> torch.Tensor:
        """Which patches of each image to keep (`vtprune.ops.pixel.pred2d_keep`), ``(images, side * side)`` bool.

        A unit is one patch (CLIP has no merger), compared on its pixels
        mapped back to [0, 1] with the processor's mean and std.
        """
        patch = self.config.vision_config.patch_size
        x = pixel_values
        if tau > 0:  # exact equality (tau = 0) is the same on the normalised values: no copy
            mean, std = (torch.tensor(v, dtype=torch.float32, device=x.device)[:, None, None] for v in self.pixel_norm)
            x = x.float() * std + mean
        n, c, h, w = x.shape
        grid = x.reshape(n, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5).flatten(3)
        return torch.stack([pred2d_keep(g, tau).flatten() for g in grid])

    def encode_kept(self, original, pixel_values: torch.Tensor, grid_thw, keep: torch.Tensor, kwargs: dict[str, Any]):
        """Run the CLIP tower on CLS plus each image's kept patches; every output back at full length (zero where dropped).

        The embeddings (patch embedding plus the position table, CLS first)
        are the whole image's, gathered per image; images with fewer kept
        patches are padded at the end, and padded keys are masked for every
        query. Returns (the output, None: the projector sees the full-length
        features the model selects from it).
        """
        keep = keep.to(pixel_values.device)
        n, patches = keep.shape
        with_cls = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=keep.device), keep], 1)
        length = int(with_cls.sum(1).max())
        index = torch.zeros(n, length, dtype=torch.long, device=keep.device)
        valid = torch.arange(length, device=keep.device)[None] < with_cls.sum(1, keepdim=True)
        index[valid] = torch.nonzero(with_cls)[:, 1]

        def gather(_module, _args, embeddings):
            return embeddings.gather(1, index[..., None].expand(-1, -1, embeddings.shape[-1]))

        tower = getattr(self.vision_tower(), "vision_model", self.vision_tower())
        dtype = tower.embeddings.patch_embedding.weight.dtype
        mask = torch.zeros(n, 1, 1, length, dtype=dtype, device=keep.device)
        mask.masked_fill_(~valid[:, None, None], torch.finfo(dtype).min)
        handle = tower.embeddings.register_forward_hook(gather)
        try:
            out = original(pixel_values, **kwargs, attention_mask=mask)
        finally:
            handle.remove()

        def scatter(hidden: torch.Tensor) -> torch.Tensor:
            full = hidden.new_zeros(n, patches + 1, *hidden.shape[2:])
            full[with_cls] = hidden[valid]
            return full

        out.last_hidden_state = scatter(out.last_hidden_state)
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(None if h is None else scatter(h) for h in out.hidden_states)
        return out, None

    # --- pruning inside the encoder (vit_layer) -------------------------
    def encoder_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states between two ViT blocks ``(images, 1 + P, D)`` -> the projector input's shape (CLS dropped)."""
        return hidden[:, 1:]

    def encoder_keep_units(self, grid_thw, hidden: torch.Tensor, chosen: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """``(image, indices of its patches)`` pairs of one tower call -> bool ``(images, P)``."""
        keep = torch.zeros(hidden.shape[0], hidden.shape[1] - 1, dtype=torch.bool, device=hidden.device)
        for item, indices in chosen:
            keep[item, indices.to(hidden.device)] = True
        return keep

    def encode_pruned_after(
        self, original, pixel_values: torch.Tensor, grid_thw, kwargs: dict[str, Any], at: int, choose, first=None
    ):
        """Run the CLIP tower, choosing the kept patches after layer ``at - 1`` (0-based) and running the rest on them.

        ``choose(hidden)`` gets the hidden states leaving layer ``at - 1``
        ``(images, 1 + P, D)`` and returns (bool ``(images, P)``, ``[(flat
        patch indices image * P + p, their new rows)]``). From layer ``at`` on
        each image's sequence is its CLS plus its kept patches in raster
        order, padded at the end to the most kept, padded keys masked for
        every query. Every per-token output (last hidden state, hidden states
        from entry ``at`` on) comes back at full length, zero at dropped
        patches. Returns (the output, None: the projector sees the full-length
        features the model selects from it).
        """
        if first is not None:  # `pixel_then_vit` is False: the plan refuses PixelPrune before a vit_layer policy
            raise NotImplementedError(f"{self.model_type}: the tower cannot start from PixelPrune's units here")
        layers = self.vision_layers()
        state: dict[str, Any] = {}

        def prune(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            keep, updates = choose(hidden)
            if bool(keep.all()):
                return None
            keep = keep.to(hidden.device)
            n, patches = keep.shape
            with_cls = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=keep.device), keep], 1)
            counts = with_cls.sum(1, keepdim=True)
            length = int(counts.max())
            valid = torch.arange(length, device=keep.device)[None] < counts
            index = torch.zeros(n, length, dtype=torch.long, device=keep.device)
            index[valid] = torch.nonzero(with_cls)[:, 1]
            kept = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
            slot = torch.cumsum(with_cls.long(), 1) - 1  # a kept token's place in its image's sequence
            for flat, values in updates:
                flat = flat.to(keep.device)
                image, patch = flat // patches, flat % patches
                kept[image, slot[image, patch + 1]] = values.to(kept)
            mask = torch.zeros(n, 1, 1, length, dtype=hidden.dtype, device=keep.device)
            mask.masked_fill_(~valid[:, None, None], torch.finfo(hidden.dtype).min)
            state.update(keep=keep, with_cls=with_cls, valid=valid, mask=mask, kept=kept)
            return (kept, *output[1:]) if isinstance(output, tuple) else kept

        def substitute(_module, args, kw):
            if not state:
                return None
            if len(args) > 1:
                return (args[0], state["mask"], *args[2:]), kw
            return args, {**kw, "attention_mask": state["mask"]}

        handles = [layers[at - 1].register_forward_hook(prune)]
        handles += [
            layers[j].register_forward_pre_hook(substitute, with_kwargs=True, prepend=True) for j in range(at, len(layers))
        ]
        try:
            out = original(pixel_values, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if not state:
            return out, None
        n, patches = state["keep"].shape

        def scatter(hidden: torch.Tensor) -> torch.Tensor:
            full = hidden.new_zeros(n, patches + 1, *hidden.shape[2:])
            full[state["with_cls"]] = hidden[state["valid"]]
            return full

        out.last_hidden_state = scatter(out.last_hidden_state)
        if getattr(out, "hidden_states", None) is not None:
            # entry j is layer j - 1's output: entries past `at` ran on the kept tokens; entry `at` is the kept
            # rows where the recorder read the output after the prune
            out.hidden_states = tuple(
                scatter(h) if h is not None and (j > at or h is state["kept"]) else h for j, h in enumerate(out.hidden_states)
            )
        return out, None

    def full_vit_rows(self, values: torch.Tensor, grid_thw, keep: torch.Tensor) -> torch.Tensor:
        """Per-token values of a tower call on the kept patches (``(images, 1 + most kept, ...)``, padded) -> full length.

        The padded length can equal the full one (an image with nothing
        dropped beside one with duplicates), so the keep sets decide.
        """
        n, patches = keep.shape
        if bool(keep.all()):  # the tower ran whole
            return values
        keep = keep.to(values.device)
        with_cls = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=keep.device), keep], 1)
        valid = torch.arange(values.shape[1], device=keep.device)[None] < with_cls.sum(1, keepdim=True)
        full = values.new_zeros(n, patches + 1, *values.shape[2:])
        full[with_cls] = values[valid]
        return full

    def raster_unit_rows(self, captured, layouts, b: int, i: int, per_call: list[torch.Tensor]) -> torch.Tensor:
        """Values per patch of every encoder call (one row per image) -> image i's."""
        return torch.cat(per_call)[self.global_image_index(layouts, b, i, captured=captured)]
