"""LLaVA-OneVision (`llava_onevision`): a SigLIP tower without CLS, anyres-max crops, newline tokens, pooled video.

Every view is one square SigLIP grid (27 x 27 = 729 tokens per 384 px crop in
the released checkpoints; no CLS token, so every token is a patch). As the
model lays out its placeholders (transformers 5.24, ``pack_image_features``
and ``get_video_features``):

- the image of a one-image prompt (``batch_num_images`` 1, or not given): the
  base view, then the unpadded high-resolution view whose rows each end in an
  `image_newline` token. Past ``anyres_max_N`` (N crops' worth of tokens, times
  1.1^2) the model first shrinks that view bilinearly, so one of its tokens
  mixes several patches;
- an image of a multi-image prompt: its base view, then one newline;
- a video: every frame's grid bilinearly pooled to ceil(side / 2)^2 tokens
  (14 x 14 = 196), the frames in order, then one newline.

Newlines are structure, as on LLaVA-NeXT: always kept, never counted. Where
the model mixes patches into a token (a shrunk view, a pooled frame), the
per-patch values a policy asks for (ViT attention received, keys,
pre-projector features) are mixed by the model's own packing and pooling, so
they follow the tokens the language model sees.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..context import LayerCall
from ..layout import ImageLayout, SampleLayout, SubGrid
from .base import Adapter
from .family import IMAGE_TOKEN, VIDEO_TOKEN, Geometry, SampleSpec, TinyBatch, placeholder_runs, text_kwargs, vit_kwargs
from .llava_next import LlavaNextAdapter, LlavaNextSpec


class LlavaOnevisionSpec(LlavaNextSpec):
    """LLaVA-OneVision's tiny model: a SigLIP tower (no CLS token) and a Qwen2 decoder, as the released checkpoints.

    The real geometry is 384 px crops of 27 x 27 = 729 tokens and ``anyres_max_9``; here the crops are
    ``image_size`` square and the maximum is 2 crops, so the tiny 2 x 2 crop grid (256 tokens) is
    downsampled by the model as a large real image is (the ``anyres_max`` path), while 1 x 2 grids are not.
    Features: the last layer's output, every token ("full"), as the checkpoints. The demo uses the
    checkpoints' 384 px views and cap (up to 9 crops' worth of tokens before shrinking).
    """

    video_demo = True

    hf_class = "LlavaOnevisionForConditionalGeneration"
    demo_geometry = {"image_size": 384}
    demo_config = {"vision_aspect_ratio": "anyres_max_9"}

    def tiny_config(self, g: Geometry):
        from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

        vision = SiglipVisionConfig(**vit_kwargs(g), vision_use_head=False)
        text = Qwen2Config(**text_kwargs(g))
        s = g.image_size
        return LlavaOnevisionConfig(
            vision_config=vision.to_dict(),
            text_config=text.to_dict(),
            image_token_index=IMAGE_TOKEN,
            video_token_index=VIDEO_TOKEN,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
            vision_aspect_ratio="anyres_max_2",
        )

    def tiny_image(self, batch: TinyBatch, size, images_in_sample):
        # as its processor: the image of a one-image prompt gets anyres crops, those of a multi-image one a base view
        adapter, side = batch.adapter, batch.vision.image_size
        crops = adapter.num_crops(list(size)) if images_in_sample == 1 else 1
        batch.pixels.append(batch.randn(crops, 3, side, side))
        batch.sizes.append(list(size))
        return [IMAGE_TOKEN] * adapter.image_token_count(list(size), crops > 1)

    def tiny_video(self, batch, frames, height, width):
        # every frame one square view; `height`, `width` are ignored
        side = batch.vision.image_size
        batch.videos.append(batch.randn(frames, 3, side, side))
        return [VIDEO_TOKEN] * batch.adapter.video_token_count(frames)

    def tiny_visual_inputs(self, batch):
        out = super().tiny_visual_inputs(batch)
        if batch.pixels:
            out["batch_num_images"] = torch.tensor(batch.counts)
        if batch.videos:
            out["pixel_values_videos"] = torch.stack(batch.videos)  # (videos, frames, 3, H, W): equal frame counts
        return out

    def mixed_samples(self):
        # a one-image prompt gets anyres crops (64 x 64: a 2 x 2 grid the model shrinks, anyres_max), the images of a
        # multi-image prompt a base view each; a video of pooled frames after an image
        return [*super().mixed_samples(), SampleSpec(images=((64, 64),), videos=((2, 32, 32),), question=3)]

    def image_rows(self, batch, start, n):
        return {**super().image_rows(batch, start, n), "batch_num_images": torch.tensor([n])}

    def alone_visual_inputs(self, batch, b, mask):
        out = super().alone_visual_inputs(batch, b, mask)
        if "pixel_values_videos" in batch:
            v_before = sum(placeholder_runs(batch["input_ids"][r] == VIDEO_TOKEN) for r in range(b))
            v_mine = placeholder_runs(batch["input_ids"][b] == VIDEO_TOKEN)
            if v_mine:
                out["pixel_values_videos"] = batch["pixel_values_videos"][v_before : v_before + v_mine]
        return out

    def demo_video(self, model, frames):
        """LLaVA-OneVision video inputs: each frame one base view (its image processor's first crop)."""
        from transformers import LlavaOnevisionImageProcessorPil

        from . import adapter_for

        side = model.config.vision_config.image_size
        proc = LlavaOnevisionImageProcessorPil(
            size={"height": side, "width": side}, image_grid_pinpoints=model.config.image_grid_pinpoints
        )
        views = torch.stack([proc(f, return_tensors="pt")["pixel_values"][0, 0] for f in frames])
        adapter = adapter_for(model)
        assert isinstance(adapter, LlavaOnevisionAdapter), type(adapter)
        n = adapter.video_token_count(len(frames))
        ids = torch.tensor([[1, 5, 6] + [VIDEO_TOKEN] * n + list(range(20, 32))])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": views[None]}

    def demo_image(self, model, adapter, image, pixels):
        from transformers import LlavaOnevisionImageProcessorPil

        side = model.config.vision_config.image_size
        proc = LlavaOnevisionImageProcessorPil(
            size={"height": side, "width": side}, image_grid_pinpoints=model.config.image_grid_pinpoints
        )
        pix = proc(image, return_tensors="pt")
        return pix, [IMAGE_TOKEN] * adapter.image_token_count(pix["image_sizes"][0], crops=True)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_type = "llava_onevision"
    videos = True
    #: lmms-eval 0.7.3's HF LLaVA wrapper loads OneVision checkpoints (its `llava_onevision` one needs the LLaVA repo)
    lmms_model = "llava_hf"
    vision_cls = False
    #: ``batch_num_images`` decides which images get crops; ``pixel_values_videos`` is read for its frame count only
    grid_keys = ("image_sizes", "batch_num_images", "pixel_values_videos")
    vision_methods = ("get_image_features", "get_video_features")
    template_markers = ("<|im_end|>",)
    spec = LlavaOnevisionSpec()

    def __init__(self, model) -> None:
        super().__init__(model)
        self._view_shapes: dict[tuple[int, int], tuple[int, int]] = {}

    def check_config(self) -> None:
        strategy = self.config.vision_feature_select_strategy
        if strategy != "full":
            raise ValueError(
                f"{self.model_type}: vision_feature_select_strategy={strategy!r} is not supported; SigLIP has no CLS "
                "token, so 'default' would drop a patch; vtprune lays out the 'full' grids every released checkpoint uses"
            )

    @property
    def feature_vision_layer(self) -> int:
        feature = self.config.vision_feature_layer
        if not isinstance(feature, int):  # the layout does not depend on it; only a default ViT layer does
            raise ValueError(
                f"{self.model_type}: vision_feature_layer={feature!r} concatenates several ViT layers, so there is "
                "no one feature layer to default to; give the policy's ViT layer explicitly"
            )
        return super().feature_vision_layer

    # --- geometry ------------------------------------------------------------
    @property
    def pooled_side(self) -> int:
        """Tokens per side of a video frame after the model's 2x bilinear pooling (``apply_pooling``)."""
        return math.ceil(self.grid_side / 2)

    def num_crops(self, image_size) -> int:
        """Views of an image with anyres crops: the base view plus the crops of its best grid pinpoint."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        size = [int(x) for x in image_size]
        return image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)

    def hires_shape(self, image_size: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of the high-resolution view as the model packs it (unpadded, shrunk past anyres_max).

        Read from the model's own `pack_image_features` applied to a marker
        tensor (1 at the newlines), so the layout is the model's by construction.
        """
        key = (int(image_size[0]), int(image_size[1]))
        if key not in self._view_shapes:
            base = self.grid_side**2
            marker = torch.zeros(self.num_crops(key), base, 1)
            packed, _ = self.base.pack_image_features(
                [marker],
                torch.tensor([key]),
                image_newline=torch.ones(1),
                vision_aspect_ratio=self.config.vision_aspect_ratio,
            )
            hires = packed[0][base:, 0]
            rows = int(hires.sum())
            self._view_shapes[key] = rows, hires.numel() // rows - 1
        return self._view_shapes[key]

    def image_token_count(self, image_size, crops: bool) -> int:
        """Placeholder tokens of one image: base view + (rows of the high-resolution view + newlines, or one newline)."""
        if not crops:
            return self.grid_side**2 + 1
        rows, cols = self.hires_shape(torch.as_tensor(image_size))
        return self.grid_side**2 + rows * (cols + 1)

    def video_token_count(self, frames: int) -> int:
        """Placeholder tokens of a video of ``frames`` frames: pooled grids plus one newline."""
        return frames * self.pooled_side**2 + 1

    def _with_crops(self, counts) -> list[bool] | None:
        """Per image (in the order of ``counts``' samples), whether it has anyres crops; None: all do."""
        if counts is None:
            return None
        return [int(n) == 1 for n in torch.as_tensor(counts).tolist() for _ in range(int(n))]

    # --- layouts -------------------------------------------------------------
    def visual_token_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids == self.config.image_token_id) | (ids == self.config.video_token_id)

    def find_images(self, captured: dict[str, Any], ids: torch.Tensor, counter: dict[str, int]) -> list[ImageLayout]:
        visual = torch.nonzero(self.visual_token_mask(ids)).flatten()
        images: list[ImageLayout] = []
        cursor = 0
        while cursor < visual.numel():
            kind = "video" if int(ids[visual[cursor]]) == self.config.video_token_id else "image"
            need = self._video_need(captured, counter) if kind == "video" else self._image_need(captured, counter)
            span = visual[cursor : cursor + need]
            token = self.config.video_token_id if kind == "video" else self.config.image_token_id
            if span.numel() != need or bool((ids[span] != token).any()):
                raise ValueError(
                    f"{self.model_type}: {kind} {counter[kind]} needs {need} consecutive {kind} placeholder tokens, "
                    f"the prompt has {int((ids[visual[cursor:]] == token).cumprod(0).sum())}; inputs and "
                    f"{'pixel_values_videos' if kind == 'video' else 'image_sizes / batch_num_images'} do not match"
                )
            images.append(self._layout(len(images), span, kind, captured, counter))
            cursor += need
            counter[kind] += 1
        return images

    def _image_need(self, captured, counter) -> int:
        sizes = captured.get("image_sizes")
        if sizes is None or counter["image"] >= len(sizes):
            raise ValueError(f"{self.model_type}: the prompt holds more image placeholders than `image_sizes` describes")
        flags = self._with_crops(captured.get("batch_num_images"))
        if flags is not None and counter["image"] >= len(flags):
            raise ValueError(f"{self.model_type}: the prompt holds more images than `batch_num_images` counts")
        crops = True if flags is None else flags[counter["image"]]
        return self.image_token_count(sizes[counter["image"]], crops)

    def _video_need(self, captured, counter) -> int:
        pixels = captured.get("pixel_values_videos")
        source = captured.get("image_source")  # generate() repeated the samples after encoding
        videos = 0 if pixels is None else len(source["video"]) if source else pixels.shape[0]
        if counter["video"] >= videos:
            raise ValueError(
                f"{self.model_type}: the prompt holds more video placeholders than `pixel_values_videos` holds videos"
            )
        return self.video_token_count(pixels.shape[1])

    def _layout(self, index: int, span: torch.Tensor, kind: str, captured, counter) -> ImageLayout:
        side, base = self.grid_side, self.grid_side**2
        if kind == "video":
            frames, pooled = (span.numel() - 1) // self.pooled_side**2, self.pooled_side
            grids = [SubGrid(f * pooled * pooled, pooled, pooled) for f in range(frames)]
            return ImageLayout(index=index, positions=span[:-1], grids=grids, newline_positions=span[-1:], kind="video")
        if span.numel() == base + 1:  # a base view and its newline
            return ImageLayout(index=index, positions=span[:base], grids=[SubGrid(0, side, side)], newline_positions=span[base:])
        rows, cols = self.hires_shape(torch.as_tensor(captured["image_sizes"][counter["image"]]))
        hires = span[base:].view(rows, cols + 1)
        return ImageLayout(
            index=index,
            positions=torch.cat([span[:base], hires[:, :cols].flatten()]),
            grids=[SubGrid(0, side, side), SubGrid(base, rows, cols)],
            newline_positions=hires[:, cols],
        )

    def expand_grid_value(self, key: str, value, source: dict[str, list[int]], expand: int):
        if key == "batch_num_images":  # one count per sample: each sample is repeated `expand` times
            return torch.as_tensor(value).repeat_interleave(expand)
        if key == "pixel_values_videos":  # read for its frame count only (equal for every video of a batch)
            return value
        return super().expand_grid_value(key, value, source, expand)

    # --- features ------------------------------------------------------------
    def vision_cls_attention(self, layer: int, call: LayerCall) -> torch.Tensor:
        return Adapter.vision_cls_attention(self, layer, call)  # SigLIP has no CLS token: a clear error

    def vision_token_values(self, captured, layouts, b, i, per_call):
        rows = self._call_rows(captured, layouts[b].images[i].kind, per_call)  # no CLS to drop
        if rows.dim() == 3:
            return self._pack(captured, layouts, b, i, rows)
        return self._pack(captured, layouts, b, i, rows[..., None])[:, 0]

    def pre_projector_features(self, captured: dict[str, Any], layouts: list[SampleLayout], b: int, i: int) -> torch.Tensor:
        rows = self._call_rows(captured, layouts[b].images[i].kind, captured["pre_projector"])
        return self._pack(captured, layouts, b, i, rows)

    @staticmethod
    def _call_rows(captured, kind: str, per_call: list[torch.Tensor]) -> torch.Tensor:
        """The per-view rows of the encoder call for `kind` (one call per vision method, in call order)."""
        method = "get_image_features" if kind == "image" else "get_video_features"
        for call, rows in zip(captured["vision_calls"], per_call):
            if call["method"] == method:
                return rows
        raise RuntimeError(f"no captured vision encoder call for the {kind}s of this batch")

    def _pack(self, captured, layouts, b, i, views: torch.Tensor) -> torch.Tensor:
        """Per-view rows ``(views, side^2, D)`` of every image (video frame) of one call -> image i's tokens, span order."""
        kind = layouts[b].images[i].kind
        g = self.global_image_index(layouts, b, i, kind, captured=captured)
        if kind == "video":
            frames = self.encoded(captured, "pixel_values_videos").shape[1]
            pooled = self.base.apply_pooling(views[g * frames : (g + 1) * frames])
            return pooled.flatten(0, 1)
        sizes = self.encoded(captured, "image_sizes")
        crops = self._image_crops(captured)
        start = sum(crops[:g])
        packed, _ = self.base.pack_image_features(
            [views[start : start + crops[g]]],
            torch.as_tensor(sizes[g : g + 1]),
            vision_aspect_ratio=self.config.vision_aspect_ratio,
        )
        return packed[0]

    def _image_crops(self, captured) -> list[int]:
        sizes = self.encoded(captured, "image_sizes")
        flags = self._with_crops(self.encoded(captured, "batch_num_images")) or [True] * len(sizes)
        return [self.num_crops(s) if c else 1 for s, c in zip(sizes, flags)]

    # --- pruning before and inside the encoder ---------------------------------------------------------------
    def _call_units(self, captured, kind: str, per_call: list[torch.Tensor]) -> torch.Tensor:
        return self._call_rows(captured, kind, per_call)

    def _mixing(self, captured, layouts, b: int, i: int) -> str | None:
        """A video (frames pooled 2x2) or an image whose high-resolution view the model shrinks (past anyres_max)."""
        image = layouts[b].images[i]
        if image.kind == "video":
            side = self.grid_side
            return (
                f"video {self.global_image_index(layouts, b, i, 'video', captured=captured)}: the model pools each "
                f"frame's {side} x {side} patches bilinearly to {self.pooled_side} x {self.pooled_side} tokens"
            )
        if len(image.grids) < 2:  # a base view (and its newline)
            return None
        g = self.global_image_index(layouts, b, i, captured=captured)
        size = torch.as_tensor(self.encoded(captured, "image_sizes")[g])
        rows, cols = self.hires_shape(size)
        full = LlavaNextAdapter.hires_shape(self, size)
        if (rows, cols) == full:
            return None
        return (
            f"image {g} ({int(size[0])} x {int(size[1])} px): its high-resolution view of {full[0]} x {full[1]} patches "
            f"is past {self.config.vision_aspect_ratio}, and the model shrinks it bilinearly to {rows} x {cols} tokens"
        )
