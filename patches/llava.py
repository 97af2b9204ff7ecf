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
    pixel_then_vit = True

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
        h, w = h // patch, w // patch  # SigLIP's 384 px at 14 px: 27 patches, the last 6 px unseen by its convolution
        x = x[:, :, : h * patch, : w * patch]
        grid = x.reshape(n, c, h, patch, w, patch).permute(0, 2, 4, 1, 3, 5).flatten(3)
        return torch.stack([pred2d_keep(g, tau).flatten() for g in grid])

    def encode_kept(self, original, pixel_values: torch.Tensor, grid_thw, keep: torch.Tensor, kwargs: dict[str, Any]):
        """Run the tower on each image's kept patches (plus its CLS, CLIP); every output back at full length (zero
        where dropped).

        One image is one tower image (LLaVA-NeXT and OneVision: one crop). The
        embeddings (patch embedding plus the position table; CLIP: CLS first)
        are the whole image's, gathered per image; images with fewer kept
        patches are padded at the end, and padded keys are masked for every
        query. Returns (the output, None: the projector sees the full-length
        features the model selects from it).
        """
        rows = self._padded(keep.to(pixel_values.device), self._tower_dtype())
        out = self._run_on(original, pixel_values, kwargs, rows)
        out.last_hidden_state = rows.scatter(out.last_hidden_state)
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(None if h is None else rows.scatter(h) for h in out.hidden_states)
        return out, None

    def _tower_dtype(self) -> torch.dtype:
        tower = getattr(self.vision_tower(), "vision_model", self.vision_tower())
        return tower.embeddings.patch_embedding.weight.dtype

    def _run_on(self, original, pixel_values: torch.Tensor, kwargs: dict[str, Any], rows: _PaddedRows):
        """The tower's forward with its embeddings gathered to ``rows`` (each image's kept tokens, padded) and the
        padding masked; the outputs at that padded length."""

        def gather(_module, _args, embeddings):
            return rows.gather(embeddings)

        tower = getattr(self.vision_tower(), "vision_model", self.vision_tower())
        handle = tower.embeddings.register_forward_hook(gather)
        try:
            return original(pixel_values, **kwargs, attention_mask=rows.mask)
        finally:
            handle.remove()

    def _with_cls(self, keep: torch.Tensor) -> torch.Tensor:
        """A keep mask per patch ``(images, P)`` -> per token of the tower ``(images, cls + P)``: CLS (CLIP) always kept."""
        if not self.vision_cls:
            return keep
        return torch.cat([torch.ones(keep.shape[0], 1, dtype=torch.bool, device=keep.device), keep], 1)

    def _padded(self, keep: torch.Tensor, dtype: torch.dtype) -> _PaddedRows:
        """The tower's sequences over the patches `keep` keeps (``(images, P)``; CLIP: and CLS), padded at the end."""
        with_cls = self._with_cls(keep)
        counts = with_cls.sum(1, keepdim=True)
        length = int(counts.max())
        valid = torch.arange(length, device=keep.device)[None] < counts
        index = torch.zeros(keep.shape[0], length, dtype=torch.long, device=keep.device)
        index[valid] = torch.nonzero(with_cls)[:, 1]
        mask = torch.zeros(keep.shape[0], 1, 1, length, dtype=dtype, device=keep.device)
        mask.masked_fill_(~valid[:, None, None], torch.finfo(dtype).min)
        return _PaddedRows(keep, with_cls, valid, index, mask)

    # --- pruning inside the encoder (vit_layer) -------------------------
    def encoder_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states between two ViT blocks ``(images, cls + P, D)`` -> the projector input's shape (CLS dropped)."""
        return hidden[:, int(self.vision_cls) :]

    def encoder_keep_units(self, grid_thw, hidden: torch.Tensor, chosen: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """``(image, indices of its patches)`` pairs of one tower call -> bool ``(images, P)``."""
        keep = torch.zeros(hidden.shape[0], hidden.shape[1] - int(self.vision_cls), dtype=torch.bool, device=hidden.device)
        for item, indices in chosen:
            keep[item, indices.to(hidden.device)] = True
        return keep

    def encode_pruned_after(
        self, original, pixel_values: torch.Tensor, grid_thw, kwargs: dict[str, Any], at: int, choose, first=None
    ):
        """Run the tower, choosing the kept patches after layer ``at - 1`` (0-based) and running the rest on them.

        ``choose(hidden)`` gets the hidden states leaving layer ``at - 1``
        ``(images, cls + P, D)`` (zero at patches ``first`` dropped) and
        returns (bool ``(images, P)``, ``[(flat patch indices image * P + p,
        their new rows)]``). ``first``: the patches kept before the encoder
        (PixelPrune): layers 0 .. ``at - 1`` run on those (as `encode_kept`
        runs them) and the choice is narrowed to them. From layer ``at`` on
        each image's sequence is its kept patches in raster order (after its
        CLS, CLIP), padded at the end to the most kept, padded keys masked
        for every query. Every per-token output (last hidden state, hidden
        states) comes back at full length, zero at dropped patches. Returns
        (the output, None: the projector sees the full-length features the
        model selects from it).
        """
        layers = self.vision_layers()
        state: dict[str, Any] = {}
        start = None if first is None else self._padded(first.to(pixel_values.device), self._tower_dtype())

        def prune(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            every = hidden if start is None else start.scatter(hidden)
            keep, updates = choose(every)
            keep = keep.to(hidden.device)
            if start is not None:
                keep = keep & start.keep
            if bool(keep.all()) or (start is not None and torch.equal(keep, start.keep)):
                return None
            rows = self._padded(keep, hidden.dtype)
            kept = rows.gather(every)
            patches = keep.shape[1]
            slot = torch.cumsum(rows.with_cls.long(), 1) - 1  # a kept token's place in its image's sequence
            for flat, values in updates:
                flat = flat.to(keep.device)
                image, patch = flat // patches, flat % patches
                kept[image, slot[image, patch + int(self.vision_cls)]] = values.to(kept)
            state.update(rows=rows, kept=kept)
            return (kept, *output[1:]) if isinstance(output, tuple) else kept

        def substitute(_module, args, kw):
            if not state:
                return None
            if len(args) > 1:
                return (args[0], state["rows"].mask, *args[2:]), kw
            return args, {**kw, "attention_mask": state["rows"].mask}

        handles = [layers[at - 1].register_forward_hook(prune)]
        handles += [
            layers[j].register_forward_pre_hook(substitute, with_kwargs=True, prepend=True) for j in range(at, len(layers))
        ]
        try:
            out = original(pixel_values, **kwargs) if start is None else self._run_on(original, pixel_values, kwargs, start)
        finally:
            for handle in handles:
                handle.remove()
        if not state and start is None:
            return out, None
        last = state["rows"] if state else start
        assert last is not None

        def before(hidden: torch.Tensor) -> torch.Tensor:
            return hidden if start is None else start.scatter(hidden)

        out.last_hidden_state = last.scatter(out.last_hidden_state)
        if getattr(out, "hidden_states", None) is not None:
            # entry j is layer j - 1's output: entries past `at` ran on the kept tokens; entry `at` is the kept
            # rows where the recorder read the output after the prune; the entries before ran on `first`'s
            out.hidden_states = tuple(
                None if h is None else last.scatter(h) if state and (j > at or h is state["kept"]) else before(h)
                for j, h in enumerate(out.hidden_states)
            )
        return out, None

    def full_vit_rows(self, values: torch.Tensor, grid_thw, keep: torch.Tensor) -> torch.Tensor:
        """Per-token values of a tower call on the kept patches (``(images, cls + most kept, ...)``, padded) -> full length.

        The padded length can equal the full one (an image with nothing
        dropped beside one with duplicates), so the keep sets decide.
        """
        if bool(keep.all()):  # the tower ran whole
            return values
        return self._padded(keep.to(values.device), torch.float32).scatter(values)

    def raster_unit_rows(self, captured, layouts, b: int, i: int, per_call: list[torch.Tensor]) -> torch.Tensor:
        """Values per patch of every encoder call (one row per image) -> image i's."""
        return torch.cat(per_call)[self.global_image_index(layouts, b, i, captured=captured)]


class _PaddedRows:
    """Each tower image's kept tokens (CLIP: CLS first) in raster order, padded at the end to the most kept.

    ``with_cls``: bool per token of the whole image; ``valid``: bool per padded slot; ``index``: each slot's token
    (0 for padding); ``mask``: the additive key mask, padding at the dtype's minimum.
    """

    def __init__(self, keep, with_cls, valid, index, mask) -> None:
        self.keep, self.with_cls, self.valid, self.index, self.mask = keep, with_cls, valid, index, mask

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """Whole images ``(images, cls + P, ...)`` -> the padded kept tokens."""
        return hidden.gather(1, self.index.view(*self.index.shape, *[1] * (hidden.dim() - 2)).expand(-1, -1, *hidden.shape[2:]))

    def scatter(self, hidden: torch.Tensor) -> torch.Tensor:
        """The padded kept tokens -> whole images, zero at the tokens not kept."""
        full = hidden.new_zeros(self.with_cls.shape[0], self.with_cls.shape[1], *hidden.shape[2:])
        full[self.with_cls] = hidden[self.valid]
        return full
