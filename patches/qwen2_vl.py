"""Qwen2-VL (`qwen2_vl`): dynamic resolution, a 2x2 patch merger, M-RoPE.

Each image (or video) has ``t * h * w / merge^2`` merged tokens, laid out by
``image_grid_thw`` / ``video_grid_thw``; a video has one sub-grid per
temporal frame. Positions are M-RoPE rows, so `compact` is not offered.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from transformers.vision_utils import get_vision_position_ids

from ..context import LayerCall
from ..layout import ImageLayout, SampleLayout
from ..ops.pixel import pred2d_keep
from .attention import packed_vit_attention_received, packed_vit_frame_query_attention, packed_vit_keys
from .base import CLIP_PIXEL_NORM, Adapter, single_grid_image
from .family import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    FamilySpec,
    Geometry,
    SampleSpec,
    TinyBatch,
    text_kwargs,
)


def unit_rows(units: torch.Tensor, unit: int) -> torch.Tensor:
    """Merge-unit indices -> the indices of their patch rows (a unit's ``unit`` patches are consecutive rows)."""
    return (units[:, None] * unit + torch.arange(unit, device=units.device)).flatten()


class Qwen2VLSpec(FamilySpec):
    """The tiny Qwen2-VL model: M-RoPE decoder, a packed ViT with a 2x2 merger; inputs as its processor's
    (flattened patches, ``image_grid_thw``/``video_grid_thw``, vision start/end pairs, ``mm_token_type_ids``).
    The Qwen families after it (Qwen2.5-VL, Qwen3-VL, Qwen3.5) change the config and the video timestamps."""

    hf_class = "Qwen2VLForConditionalGeneration"
    drawn = True
    video_demo = True  # Qwen2-VL, Qwen2.5-VL (Qwen3-VL and Qwen3.5 write timestamps: not built)
    frames_per_slot = 2

    @staticmethod
    def parts(g: Geometry) -> tuple[dict, dict, dict]:
        """The Qwen families' shared (text config, vision config, token ids) as keyword dicts."""
        half = g.hidden // g.heads // 2  # M-RoPE splits half the head dim into (t, h, w) sections
        section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
        text = dict(
            text_kwargs(g),
            rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0},
        )
        vision = dict(
            depth=g.vision_layers,
            hidden_size=g.vision_hidden,
            embed_dim=g.vision_hidden,
            num_heads=2,
            patch_size=g.patch,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_chans=3,
            out_hidden_size=g.hidden,
            hidden_act="silu",
            intermediate_size=2 * g.vision_hidden,
        )
        ids = dict(
            image_token_id=IMAGE_TOKEN,
            video_token_id=VIDEO_TOKEN,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )
        return text, vision, ids

    def tiny_config(self, g: Geometry):
        from transformers import Qwen2VLConfig

        text, vision, ids = self.parts(g)
        vision.pop("out_hidden_size")
        vision.pop("intermediate_size")
        vision.update(mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=dict(vision, hidden_size=g.hidden), **ids)

    def tiny_image(self, batch: TinyBatch, size, images_in_sample):
        vision = batch.vision
        gh, gw = size[0] // vision.patch_size, size[1] // vision.patch_size
        batch.grids.append([1, gh, gw])
        batch.pixels.append(batch.randn(gh * gw, 3 * vision.temporal_patch_size * vision.patch_size**2))
        return [VISION_START] + [IMAGE_TOKEN] * (gh * gw // 4) + [VISION_END]

    def tiny_video(self, batch, frames, height, width):
        vision = batch.vision
        gt, gh, gw = frames // vision.temporal_patch_size, height // vision.patch_size, width // vision.patch_size
        batch.vgrids.append([gt, gh, gw])
        batch.videos.append(batch.randn(gt * gh * gw, 3 * vision.temporal_patch_size * vision.patch_size**2))
        if not self.timestamp_tokens:
            return [VISION_START] + [VIDEO_TOKEN] * (gt * gh * gw // 4) + [VISION_END]
        ids = []
        for _ in range(gt):  # every frame: its timestamp (text), then its own vision span
            ids += batch.text(self.timestamp_tokens) + [VISION_START] + [VIDEO_TOKEN] * (gh * gw // 4) + [VISION_END]
        return ids

    def tiny_visual_inputs(self, batch):
        out = {}
        if batch.pixels:
            out["pixel_values"] = torch.cat(batch.pixels)
            out["image_grid_thw"] = torch.tensor(batch.grids)
        if batch.videos:
            out["pixel_values_videos"] = torch.cat(batch.videos)
            out["video_grid_thw"] = torch.tensor(batch.vgrids)
        return out

    def mixed_samples(self):
        return [*super().mixed_samples(), SampleSpec(videos=((4, 32, 32),), question=3)]

    def alone_visual_inputs(self, batch, b, mask):
        def count(tok, row):
            return int((batch["input_ids"][row] == tok).sum())

        out = {}
        for kind, tok, pix in (("image", IMAGE_TOKEN, "pixel_values"), ("video", VIDEO_TOKEN, "pixel_values_videos")):
            key = f"{kind}_grid_thw"
            if key not in batch:
                continue
            grids = batch[key]
            per_item = grids.prod(-1) // 4
            # items of earlier rows
            first = 0
            consumed = 0
            while consumed < sum(count(tok, r) for r in range(b)):
                consumed += int(per_item[first])
                first += 1
            last, mine = first, 0
            while mine < count(tok, b):
                mine += int(per_item[last])
                last += 1
            if last > first:
                patches = grids.prod(-1)
                start = int(patches[:first].sum())
                out[pix] = batch[pix][start : start + int(patches[first:last].sum())]
                out[key] = grids[first:last]
        return out

    def demo_video_side(self, model) -> int:
        return 448

    def demo_video(self, model, frames):
        """Qwen2-VL video inputs: each slot holds two consecutive frames (patches C, t, p, p)."""
        from transformers import Qwen2VLImageProcessorPil

        vision = model.config.vision_config
        merge, patch = vision.spatial_merge_size, vision.patch_size
        pixels = frames[0].shape[0] * frames[0].shape[1]
        proc = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=patch, merge_size=merge)
        slots = []
        for a, b in zip(frames[0::2], frames[1::2]):
            pa, pb = (proc(f, return_tensors="pt") for f in (a, b))
            grid = pa["image_grid_thw"][0]
            ca, cb = (p["pixel_values"].view(-1, 3, 2, patch, patch)[:, :, 0] for p in (pa, pb))
            slots.append(torch.stack([ca, cb], dim=2).flatten(1))  # the image processor repeats one frame in time
        t, h, w = len(slots), int(grid[1]), int(grid[2])
        n = t * h * w // merge**2
        ids = [1, 5, 6, VISION_START] + [VIDEO_TOKEN] * n + [VISION_END] + list(range(20, 32))
        ids_t = torch.tensor([ids])
        return {
            "input_ids": ids_t,
            "attention_mask": torch.ones_like(ids_t),
            "pixel_values_videos": torch.cat(slots),
            "video_grid_thw": torch.tensor([[t, h, w]]),
            "second_per_grid_ts": torch.tensor([1.0]),
            "mm_token_type_ids": (2 * (ids_t == VIDEO_TOKEN)).int(),
        }

    def demo_image(self, model, adapter, image, pixels):
        from transformers import Qwen2VLImageProcessorPil

        vision = model.config.vision_config
        proc = Qwen2VLImageProcessorPil(
            min_pixels=pixels, max_pixels=pixels, patch_size=vision.patch_size, merge_size=adapter.merge
        )
        pix = proc(image, return_tensors="pt")
        n = int(pix["image_grid_thw"].prod()) // adapter.merge**2
        return pix, [VISION_START] + [IMAGE_TOKEN] * n + [VISION_END]

    def view_and_grid(self, model, processor, inputs, image):
        import numpy as np
        from PIL import Image

        _, h, w = (int(v) for v in inputs["image_grid_thw"][0])
        patch = model.config.vision_config.patch_size
        merge = model.config.vision_config.spatial_merge_size
        view = np.asarray(image.convert("RGB").resize((w * patch, h * patch), Image.Resampling.BICUBIC))
        return view, (h // merge, w // merge)


class Qwen2VLAdapter(Adapter):
    model_type = "qwen2_vl"
    lmms_model = "qwen2_vl"
    mrope = True
    videos = True
    grid_keys = ("image_grid_thw", "video_grid_thw")
    vision_methods = ("get_image_features", "get_video_features")
    template_markers = ("<|im_end|>",)
    #: what lmms-eval's Qwen wrappers need beyond the ``[eval]`` extra (they go through qwen_vl_utils, which imports
    #: torchvision)
    lmms_needs = ("qwen_vl_utils", "torchvision")
    spec = Qwen2VLSpec()
    #: the family's image processor's per-channel normalisation (mean, std): pixel values map back to [0, 1]
    pixel_norm: ClassVar[tuple[tuple[float, ...], tuple[float, ...]]] = CLIP_PIXEL_NORM
    pixel_prune = True
    vit_prune = True
    pixel_then_vit = True

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
        images: list[ImageLayout] = []
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
        unit = self.merge**2
        per_call = [feats.reshape(feats.shape[0] // unit, unit * feats.shape[-1]) for feats in captured["pre_projector"]]
        return self._image_rows(captured, layouts, b, i, per_call)

    def vision_layers(self):
        return self.base.visual.blocks

    # --- pruning before the encoder (PixelPrune) ------------------------
    def vision_tower(self):
        return self.base.visual

    def unit_keep(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, tau: float) -> torch.Tensor:
        """Which merge units of one encoder call to keep (`vtprune.ops.pixel.pred2d_keep`), bool per unit.

        Units in the order the processor packs them (item by item, frame by
        frame, raster order of 2x2 units; a unit's four patches are
        consecutive rows). Each temporal frame of an item is its own grid
        (an image has one). A unit is compared on all its pixels, both
        frames of its temporal patch, mapped back to [0, 1] with the
        processor's mean and std (`pixel_norm`).
        """
        vision = self.config.vision_config
        frames, patch = vision.temporal_patch_size, vision.patch_size
        channels = pixel_values.shape[-1] // (frames * patch * patch)
        x = pixel_values
        if tau > 0:  # exact equality (tau = 0) is the same on the normalised values: no copy
            mean, std = (torch.tensor(v, dtype=torch.float32, device=x.device)[:channels, None] for v in self.pixel_norm)
            x = x.float().reshape(-1, channels, frames * patch * patch) * std + mean
        x = x.reshape(-1, self.merge**2 * pixel_values.shape[-1])
        keep, offset = [], 0
        for t, h, w in grid_thw.tolist():
            hm, wm = h // self.merge, w // self.merge
            for _ in range(t):
                keep.append(pred2d_keep(x[offset : offset + hm * wm].view(hm, wm, -1), tau).flatten())
                offset += hm * wm
        return torch.cat(keep)

    def kept_tower_inputs(self, grid_thw: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor) -> dict[str, Any]:
        """What the tower computes from the grid, for the kept patch ``rows`` only (its precomputed keyword inputs).

        The ViT's rotary positions are the whole grid's, gathered; each
        frame's attention segment (``cu_seqlens``) holds its kept patches;
        a learned absolute position table interpolated to the grid (Qwen3-VL,
        Qwen3.5) is gathered the same way.
        """
        tower = self.vision_tower()
        unit = self.merge**2
        units = (grid_thw[:, 1] * grid_thw[:, 2] // unit).repeat_interleave(grid_thw[:, 0]).tolist()
        kept = torch.stack([part.sum() for part in torch.split(keep, units)]) * unit
        out = {
            "position_ids": get_vision_position_ids(grid_thw, self.merge)[rows.to(grid_thw.device)],
            "cu_seqlens": torch.nn.functional.pad(kept.cumsum(0, dtype=torch.int32), (1, 0)),
        }
        if hasattr(tower, "pos_embed") and hasattr(tower, "num_grid_per_side"):
            from transformers.vision_utils import get_vision_interpolation_indices_and_weights

            indices, weights = get_vision_interpolation_indices_and_weights(
                grid_thw,
                num_grid_per_side=tower.num_grid_per_side,
                mode=tower.interpolation_mode,
                align_corners=tower.interpolation_align_corners,
                spatial_merge_size=self.merge,
            )
            rows = rows.to(indices.device)
            out["interp_indices"], out["interp_weights"] = indices[rows], weights[rows]
        return out

    def encode_kept(
        self, original, hidden_states: torch.Tensor, grid_thw: torch.Tensor, keep: torch.Tensor, kwargs: dict[str, Any]
    ):
        """Run the tower (``original``, its forward) on the kept merge units only; outputs scattered back.

        ``keep``: bool per merge unit (`unit_keep`). The tower gets the kept
        patches and its grid-derived inputs for them (`kept_tower_inputs`);
        its outputs come back at full length, zero at dropped units, so the
        model places every unit as unpruned (M-RoPE on the whole layout) and
        the vision stage then removes the dropped ones from the sequence.
        Returns (the output, the merger's input at full length in the ViT's
        order).
        """
        unit = self.merge**2
        device = hidden_states.device
        keep = keep.to(device)
        kept_units = torch.nonzero(keep).flatten()
        rows = unit_rows(kept_units, unit)
        extra = self.kept_tower_inputs(grid_thw, keep, rows)
        out = original(hidden_states[rows], grid_thw, **kwargs, **extra)

        def scatter(values: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
            full = values.new_zeros(length, *values.shape[1:])
            full[index] = values
            return full

        full_hidden = self.full_vit_rows(out.last_hidden_state, grid_thw, keep)
        out.last_hidden_state = full_hidden
        out.pooler_output = scatter(out.pooler_output, kept_units, keep.numel())
        if getattr(out, "deepstack_features", None):
            out.deepstack_features = [scatter(f, kept_units, keep.numel()) for f in out.deepstack_features]
        return out, full_hidden

    # --- pruning inside the encoder (vit_layer) -------------------------
    def encoder_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states between two ViT blocks -> rows shaped as the merger's input (what `pre_projector_features`
        reads): the same rows, in the ViT's order."""
        return hidden

    def encoder_keep_units(
        self, grid_thw: torch.Tensor, hidden: torch.Tensor, chosen: list[tuple[int, torch.Tensor]]
    ) -> torch.Tensor:
        """``(item, indices of its merge units)`` pairs of one tower call -> bool per merge unit of the call
        (processor order, as `unit_keep`)."""
        sizes = (grid_thw.prod(-1) // self.merge**2).tolist()
        offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        keep = torch.zeros(offsets[-1], dtype=torch.bool, device=hidden.device)
        for item, indices in chosen:
            keep[offsets[item] + indices.to(hidden.device)] = True
        return keep

    def encode_pruned_after(
        self,
        original,
        hidden_states: torch.Tensor,
        grid_thw: torch.Tensor,
        kwargs: dict[str, Any],
        at: int,
        choose,
        first: torch.Tensor | None = None,
    ):
        """Run the tower, choosing the kept merge units after block ``at - 1`` (0-based) and running the rest on them.

        ``choose(hidden)`` gets the hidden states leaving block ``at - 1`` (the
        ViT's row order, every unit: zero where ``first`` dropped one) and
        returns (bool per merge unit in processor order, ``[(merge units of
        the call, their new rows (m, unit * D))]``). ``first``: the units kept
        before the encoder (PixelPrune): blocks 0 .. ``at - 1`` run on those
        (as `encode_kept` runs them) and the choice is narrowed to them. From
        block ``at`` on, every block gets the kept rows, their rotary tables
        and attention segments rebuilt over the kept units (full-attention
        blocks: each image's or frame's kept units; Qwen2.5-VL's window
        blocks: each window's kept units in window order, empty windows
        gone); DeepStack taps and the merger then see the kept rows. Outputs
        come back at full length, zero at dropped units (the merger's output
        scattered before the tower undoes its window order). Returns (the
        output, the merger's input at full length in the ViT's order, or None
        when nothing was dropped).
        """
        tower = self.vision_tower()
        blocks = tower.blocks
        unit = self.merge**2
        n_units = int(grid_thw.prod(-1).sum()) // unit
        device = hidden_states.device
        full_attention = getattr(tower, "fullatt_block_indexes", None)
        order = self.merger_order(grid_thw)
        order = None if order is None else order.to(device)
        # the units the blocks before `at` run on, in the ViT's order (None: every unit)
        running: torch.Tensor | None = None
        if first is not None:
            first = first.to(device)
            raster = torch.nonzero(first).flatten()
            rows = unit_rows(raster, unit)
            kwargs = {**kwargs, **self.kept_tower_inputs(grid_thw, first, rows)}
            hidden_states = hidden_states[rows]
            running = first if order is None else first[order]
        state: dict[str, Any] = {}

        def prune(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            every = hidden
            if running is not None:
                every = hidden.new_zeros(n_units * unit, *hidden.shape[1:])
                every[unit_rows(torch.nonzero(running).flatten(), unit)] = hidden
            keep, updates = choose(every)
            keep = keep.to(device)
            if first is not None:
                keep = keep & first
            if bool(keep.all()) or (first is not None and torch.equal(keep, first)):
                return None
            in_order = keep if order is None else keep[order]  # every unit, the ViT's order
            now = in_order if running is None else in_order[running]  # the units running now, the ViT's order
            rows = unit_rows(torch.nonzero(now).flatten(), unit)
            raster = torch.nonzero(keep).flatten()
            extra = self.kept_tower_inputs(grid_thw, keep, unit_rows(raster, unit))
            kept_units = torch.nonzero(in_order).flatten()
            slot = torch.full((keep.numel(),), -1, dtype=torch.long, device=device)
            slot[kept_units if order is None else order[kept_units]] = torch.arange(kept_units.numel(), device=device)
            kept = hidden[rows]
            for unit_index, values in updates:
                view = kept.view(kept_units.numel(), unit, -1)
                view[slot[unit_index.to(device)]] = values.to(kept).view(-1, unit, view.shape[-1])
            # a frame (or window) left without kept units is no attention segment
            state.update(
                rows=rows,
                in_order=in_order,
                now=now,
                keep=keep,
                cu=torch.unique_consecutive(extra["cu_seqlens"].to(device)),
                cu_window=extra.get("cu_window_seqlens"),
            )
            return (kept, *output[1:]) if isinstance(output, tuple) else kept

        def substitute(index: int):
            def hook(_module, args, kw):
                if not state:
                    return None
                kw = dict(kw)
                if "position_embeddings" not in state:
                    state["position_embeddings"] = tuple(t[state["rows"]] for t in kw["position_embeddings"])
                kw["position_embeddings"] = state["position_embeddings"]
                window = full_attention is not None and index not in full_attention
                kw["cu_seqlens"] = state["cu_window"].to(state["cu"]) if window else state["cu"]
                kw["max_seqlen"] = None
                return args, kw

            return hook

        def scatter_merged(_module, _args, output):
            # back to the units the tower started from, in its order: the tower's own un-permutation follows
            if not state:
                return None
            full = output.new_zeros(state["now"].numel(), *output.shape[1:])
            full[state["now"]] = output
            return full

        handles = [blocks[at - 1].register_forward_hook(prune)]
        handles += [
            blocks[j].register_forward_pre_hook(substitute(j), with_kwargs=True, prepend=True) for j in range(at, len(blocks))
        ]
        handles.append(tower.merger.register_forward_hook(scatter_merged))
        try:
            out = original(hidden_states, grid_thw, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        keep = state["keep"] if state else first
        if keep is None:  # nothing dropped, before or inside the tower
            return out, None
        full_hidden = self.full_vit_rows(out.last_hidden_state, grid_thw, keep)
        out.last_hidden_state = full_hidden
        if first is not None:  # the merger's output covers the units the tower started from (raster order)
            full = out.pooler_output.new_zeros(n_units, *out.pooler_output.shape[1:])
            full[first] = out.pooler_output
            out.pooler_output = full
        if getattr(out, "deepstack_features", None):
            # a tap before the prune has a row per running unit, one after it a row per kept unit (the ViT's order)
            ran = [(torch.ones(n_units, dtype=torch.bool, device=device) if running is None else running)]
            if state:
                ran.append(state["in_order"])

            def full_units(values: torch.Tensor) -> torch.Tensor:
                if values.shape[0] == n_units:  # a tap on every unit
                    return values
                mask = next(m for m in reversed(ran) if int(m.sum()) == values.shape[0])
                full = values.new_zeros(n_units, *values.shape[1:])
                full[mask] = values
                return full

            out.deepstack_features = [full_units(f) for f in out.deepstack_features]
        return out, full_hidden

    def full_vit_rows(self, values: torch.Tensor, grid_thw: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Rows the tower computed for the kept patches (its row order, dim 0) -> one per patch of the call, zero where
        dropped; a call whose units were all kept (the tower ran whole) comes back as it is."""
        unit = self.merge**2
        if bool(keep.all()):  # the tower ran whole
            return values
        keep = keep.to(values.device)
        order = self.merger_order(grid_thw)
        in_order = keep if order is None else keep[order.to(values.device)]  # units in the tower's row order
        units = torch.nonzero(in_order).flatten()
        rows = unit_rows(units, unit)
        full = values.new_zeros(keep.numel() * unit, *values.shape[1:])
        full[rows] = values
        return full

    def raster_unit_rows(self, captured, layouts, b: int, i: int, per_call: list[torch.Tensor]) -> torch.Tensor:
        """Values per merge unit of every encoder call, in the processor's (raster) order -> image i's rows."""
        return self._image_rows(captured, layouts, b, i, per_call, permuted=False)

    def vision_attention_received(self, layer: int, call: LayerCall) -> torch.Tensor:
        # the block's own attention segments (windows or whole images/frames) and rotary tables
        return packed_vit_attention_received(
            self.vision_layers()[layer], call.hidden, call.kwargs["cu_seqlens"], call.kwargs["position_embeddings"]
        )

    def vision_frame_query_attention(self, layer: int, call: LayerCall) -> torch.Tensor:
        return packed_vit_frame_query_attention(
            self.vision_layers()[layer],
            call.hidden,
            call.kwargs["cu_seqlens"],
            call.kwargs["position_embeddings"],
            self.merge**2,
        )

    def vision_keys(self, layer: int, call: LayerCall) -> torch.Tensor:
        return packed_vit_keys(self.vision_layers()[layer], call.hidden, call.kwargs["position_embeddings"])

    def project(self, features: torch.Tensor) -> torch.Tensor:
        # rows are whole merge units (unit * D'); the merger normalises each patch, then merges the unit
        return super().project(features.reshape(-1, features.shape[-1] // self.merge**2))

    def vision_token_values(self, captured, layouts, b, i, per_call):
        unit = self.merge**2
        merged = [t.reshape(t.shape[0] // unit, unit, *t.shape[1:]).mean(dim=1) for t in per_call]
        return self._image_rows(captured, layouts, b, i, merged)

    def _image_rows(self, captured, layouts, b: int, i: int, per_call: list[torch.Tensor], permuted: bool = True) -> torch.Tensor:
        """One row per merge unit of every encoder call (the ViT's order) -> image i's rows in raster order.

        The ViT runs once per modality (all images, then all videos, packed);
        rows are un-permuted where the ViT reordered merge units into windows
        (`merger_order`) and split by each item's own grid.
        """
        image = layouts[b].images[i]
        g = self.global_image_index(layouts, b, i, image.kind, captured=captured)
        method = "get_image_features" if image.kind == "image" else "get_video_features"
        for call, values in zip(captured["vision_calls"], per_call):
            if call["method"] == method:
                grid_thw, rows = call[f"{image.kind}_grid_thw"], values
                break
        else:
            raise RuntimeError(f"no captured vision encoder call for the {image.kind}s of this batch")
        order = self.merger_order(grid_thw) if permuted else None
        if order is not None:
            rows = rows[torch.argsort(order.to(rows.device))]
        sizes = (grid_thw.prod(-1) // self.merge**2).tolist()
        return torch.split(rows, sizes)[g]

    def decode_positions_from_cache(self, outer: dict[str, Any]) -> bool:
        # Qwen derives decode positions from the 2-D mask when it has one.
        return outer.get("position_ids") is None and outer.get("attention_mask") is None
