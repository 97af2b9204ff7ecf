"""Small random-weight models of every supported family, built from configs (no downloads).

Used by the tests, the demo and the CPU benchmark. ``tiny_model(family)``
gives a model with real geometry knobs (image size, patch size, widths) and
``make_inputs`` builds matching inputs (placeholder tokens, pixel values,
grid metadata) without a processor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    SiglipVisionConfig,
)

from .patches import ADAPTERS, supported_model_types

#: the tiny models follow the one table of supported model types (each needs its config below)
FAMILIES = tuple(supported_model_types())
#: families whose video prompts put a timestamp (text) before every temporal frame, each frame in its own
#: vision span, and the text tokens of one timestamp in the tiny inputs (Qwen3-VL's processor writes
#: ``<1.0 seconds>``)
TIMESTAMP_FAMILY_TOKENS = {"qwen3_5": 1, "qwen3_vl": 3, "qwen3_vl_moe": 3}
TIMESTAMPED_VIDEO = tuple(TIMESTAMP_FAMILY_TOKENS)
TIMESTAMP_TOKENS = TIMESTAMP_FAMILY_TOKENS["qwen3_vl"]
VOCAB = 128
IMAGE_TOKEN = 100
VIDEO_TOKEN = 101
VISION_START = 102
VISION_END = 103
#: the M-RoPE (Qwen) families
QWEN = tuple(t for t, adapter in ADAPTERS.items() if adapter.mrope)


@dataclass
class Geometry:
    """Sizes of a tiny model. ``image_size``/``patch`` set the token grid."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    image_size: int = 32
    patch: int = 4


def _text_kwargs(g: Geometry) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=g.hidden,
        intermediate_size=g.intermediate,
        num_hidden_layers=g.layers,
        num_attention_heads=g.heads,
        num_key_value_heads=g.kv_heads,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _vit_kwargs(g: Geometry) -> dict:
    """The square-image ViT of the LLaVA families (CLIP, SigLIP)."""
    return dict(
        hidden_size=g.vision_hidden,
        intermediate_size=2 * g.vision_hidden,
        num_hidden_layers=g.vision_layers,
        num_attention_heads=2,
        image_size=g.image_size,
        patch_size=g.patch,
    )


def tiny_config(family: str, geometry: Geometry | None = None):
    g = geometry or Geometry()
    if family in ("llava", "llava_next"):
        vision = CLIPVisionConfig(**_vit_kwargs(g), projection_dim=g.vision_hidden)
        text = LlamaConfig(**_text_kwargs(g))
        common = dict(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
        if family == "llava":
            return LlavaConfig(**common)
        s = g.image_size
        return LlavaNextConfig(image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]], **common)
    if family == "llava_onevision":
        return _onevision_config(g)
    half = g.hidden // g.heads // 2  # M-RoPE splits half the head dim into (t, h, w) sections
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = dict(
        _text_kwargs(g),
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
    ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)
    if family == "qwen2_vl":
        vision.pop("out_hidden_size")
        vision.pop("intermediate_size")
        vision.update(mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=dict(vision, hidden_size=g.hidden), **ids)
    if family == "qwen2_5_vl":
        vision.update(window_size=4 * g.patch * 2, fullatt_block_indexes=[g.vision_layers - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    if family == "qwen3_5":
        return _qwen3_5_config(g, ids)
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        return _qwen3_vl_config(family, g, text, vision, ids)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def _onevision_config(g: Geometry) -> LlavaOnevisionConfig:
    """LLaVA-OneVision: a SigLIP tower (no CLS token) and a Qwen2 decoder, as the released checkpoints.

    The real geometry is 384 px crops of 27 x 27 = 729 tokens and ``anyres_max_9``; here the crops are
    ``image_size`` square and the maximum is 2 crops, so the tiny 2 x 2 crop grid (256 tokens) is
    downsampled by the model as a large real image is (the ``anyres_max`` path), while 1 x 2 grids are not.
    Features: the last layer's output, every token ("full"), as the checkpoints.
    """
    vision = SiglipVisionConfig(**_vit_kwargs(g), vision_use_head=False)
    text = Qwen2Config(**_text_kwargs(g))
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


def _qwen3_5_config(g: Geometry, ids: dict) -> Qwen3_5Config:
    """Qwen3.5: Gated DeltaNet (linear attention) layers with full attention at every odd layer.

    One layer more than the other families (5 by default: linear, full,
    linear, full, linear): three linear layers, two full-attention ones, and
    layer 3 full as in the real 3:1 pattern (full attention at 3, 7, 11, ...),
    so the zoo's FastV / EntropyPrune default (K-1 = 3) fits. Gated
    attention with partial RoPE (a quarter of the head dim, as the real
    models) and interleaved M-RoPE sections over the rotated dims.
    """
    layers = g.layers + 1
    head_dim = 2 * g.hidden // g.heads
    text = dict(
        _text_kwargs(g),
        num_hidden_layers=layers,
        head_dim=head_dim,
        layer_types=["full_attention" if i % 2 else "linear_attention" for i in range(layers)],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=g.hidden // g.heads,
        linear_value_head_dim=g.hidden // g.heads,
        linear_num_key_heads=g.kv_heads,
        linear_num_value_heads=g.heads,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    )
    side = 2 * g.image_size // g.patch  # the learned position table is resampled to each grid
    vision = dict(depth=g.vision_layers, hidden_size=g.vision_hidden, intermediate_size=2 * g.vision_hidden, num_heads=2,
                  patch_size=g.patch, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=g.hidden,
                  num_position_embeddings=side * side)
    return Qwen3_5Config(text_config=text, vision_config=vision, **ids)


def _qwen3_vl_config(family: str, g: Geometry, text: dict, vision: dict, ids: dict):
    """Qwen3-VL: q/k norms per head, interleaved M-RoPE, a learned ViT position table and three DeepStack taps.

    The real models tap ViT blocks 8/16/24 of 27 and add the taps after decoder
    layers 0-2; the tiny ViT taps its first three blocks (at least three
    blocks), so ``at_layer`` 1 and 2 prune inside the DeepStack range here too.
    """
    head_dim = g.hidden // g.heads
    half = head_dim // 2  # interleaved sections (as 24/20/20 of 64): h at 1::3, w at 2::3, t on the rest
    hw = half // 3
    text.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [half - 2 * hw, hw, hw], "mrope_interleaved": True})
    depth = max(g.vision_layers, 3)
    side = max(g.image_size // g.patch, 2)
    vision.update(depth=depth, deepstack_visual_indexes=[0, 1, 2], num_position_embeddings=side * side)
    for key in ("embed_dim", "in_chans"):
        vision.pop(key)
    if family == "qwen3_vl":
        return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=g.intermediate // 2, decoder_sparse_step=1)
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids)


_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "qwen3_5": Qwen3_5ForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
    "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
}


def tiny_model(family: str, geometry: Geometry | None = None, attn: str = "sdpa", seed: int = 0,
               dtype: torch.dtype = torch.float32):
    """A random-weight model of `family` in eval mode (deterministic for a seed)."""
    config = tiny_config(family, geometry)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = _CLASSES[family]._from_config(config, attn_implementation=attn, dtype=dtype)
    return model.eval()


@dataclass
class SampleSpec:
    """One sample of a synthetic batch.

    ``images``: a list of image sizes in pixels ``(height, width)`` (LLaVA
    ignores the size: its images are always ``image_size`` square);
    ``videos``: ``(frames, height, width)`` in pixels (Qwen; LLaVA-OneVision reads only the frame count;
    the `TIMESTAMPED_VIDEO` families put a timestamp of text tokens before each temporal frame);
    ``prefix``/``question``: text tokens before the first and after the last image.
    """

    images: tuple[tuple[int, int], ...] = ()
    videos: tuple[tuple[int, int, int], ...] = ()
    prefix: int = 3
    question: int = 5


def make_inputs(model, specs: list[SampleSpec], seed: int = 0, pad_left: bool = True) -> dict:
    """Inputs for a tiny model: placeholder tokens, pixels and grid metadata, left padding."""
    from .patches import adapter_for

    family = model.config.model_type
    adapter = adapter_for(model)
    gen = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    rows, pixels, videos, sizes, grids, vgrids = [], [], [], [], [], []

    def text(n: int) -> list[int]:
        return torch.randint(3, 90, (n,), generator=gen).tolist()

    counts = []  # images per sample (LLaVA-OneVision's batch_num_images)
    for spec in specs:
        ids = [1] + text(spec.prefix)
        counts.append(len(spec.images))
        for h, w in spec.images:
            if family == "llava_onevision":
                # as its processor: the image of a one-image prompt gets anyres crops, those of a multi-image one a base view
                crops = adapter.num_crops([h, w]) if len(spec.images) == 1 else 1
                pixels.append(torch.randn(crops, 3, vision.image_size, vision.image_size, generator=gen))
                sizes.append([h, w])
                ids += [IMAGE_TOKEN] * adapter.image_token_count([h, w], crops > 1)
            elif family == "llava":
                pixels.append(torch.randn(3, vision.image_size, vision.image_size, generator=gen))
                ids += [IMAGE_TOKEN] * adapter.grid_side**2
            elif family == "llava_next":
                from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

                n_crops = image_size_to_num_patches([h, w], model.config.image_grid_pinpoints, vision.image_size)
                pixels.append(torch.randn(n_crops, 3, vision.image_size, vision.image_size, generator=gen))
                sizes.append([h, w])
                rh, rw = adapter._views(torch.tensor([h, w]))
                ids += [IMAGE_TOKEN] * (adapter.grid_side**2 + rh * (rw + 1))
            else:
                gh, gw = h // vision.patch_size, w // vision.patch_size
                grids.append([1, gh, gw])
                pixels.append(torch.randn(gh * gw, 3 * vision.temporal_patch_size * vision.patch_size**2, generator=gen))
                ids += [VISION_START] + [IMAGE_TOKEN] * (gh * gw // 4) + [VISION_END]
            ids += text(2)
        for t, h, w in spec.videos:
            if family == "llava_onevision":  # every frame one square view; `h`, `w` are ignored
                videos.append(torch.randn(t, 3, vision.image_size, vision.image_size, generator=gen))
                ids += [VIDEO_TOKEN] * adapter.video_token_count(t) + text(2)
                continue
            gt, gh, gw = t // vision.temporal_patch_size, h // vision.patch_size, w // vision.patch_size
            vgrids.append([gt, gh, gw])
            videos.append(torch.randn(gt * gh * gw, 3 * vision.temporal_patch_size * vision.patch_size**2, generator=gen))
            if family in TIMESTAMPED_VIDEO:  # every frame: its timestamp (text), then its own vision span
                for _ in range(gt):
                    ids += text(TIMESTAMP_FAMILY_TOKENS[family]) + [VISION_START] + [VIDEO_TOKEN] * (gh * gw // 4) + [VISION_END]
                ids += text(2)
            else:
                ids += [VISION_START] + [VIDEO_TOKEN] * (gt * gh * gw // 4) + [VISION_END] + text(2)
        ids += text(spec.question)
        rows.append(ids)

    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(width - len(r), width) if pad_left else slice(0, len(r))
        input_ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    if pixels:
        if family == "llava":
            out["pixel_values"] = torch.stack(pixels)
        elif family in ("llava_next", "llava_onevision"):
            most = max(p.shape[0] for p in pixels)
            padded = torch.zeros(len(pixels), most, *pixels[0].shape[1:])
            for i, p in enumerate(pixels):
                padded[i, : p.shape[0]] = p
            out["pixel_values"] = padded
            out["image_sizes"] = torch.tensor(sizes)
            if family == "llava_onevision":
                out["batch_num_images"] = torch.tensor(counts)
        else:
            out["pixel_values"] = torch.cat(pixels)
            out["image_grid_thw"] = torch.tensor(grids)
    if videos and family == "llava_onevision":
        out["pixel_values_videos"] = torch.stack(videos)  # (videos, frames, 3, H, W): equal frame counts
    elif videos:
        out["pixel_values_videos"] = torch.cat(videos)
        out["video_grid_thw"] = torch.tensor(vgrids)
    if ADAPTERS[family].mrope:  # the Qwen families
        out["mm_token_type_ids"] = (
            (input_ids == IMAGE_TOKEN).long() + 2 * (input_ids == VIDEO_TOKEN).long()
        ).int()
    return out


# ---------------------------------------------------------------- batches and their samples, for checks
def single_spec(family: str) -> SampleSpec:
    return SampleSpec(images=((32, 48),) if family != "llava" else ((32, 32),), question=6)


def mixed_specs(family: str) -> list[SampleSpec]:
    """Unequal samples: different image sizes (where the family has them), two images, none, padding."""
    if family == "llava":
        return [SampleSpec(images=((32, 32),), question=4), SampleSpec(images=((32, 32), (32, 32)), question=7),
                SampleSpec(question=9)]
    specs = [SampleSpec(images=((32, 48),), question=4), SampleSpec(images=((48, 32), (32, 32)), question=7),
             SampleSpec(question=9)]
    if family == "llava_onevision":
        # a one-image prompt gets anyres crops (64 x 64: a 2 x 2 grid the model shrinks, anyres_max), the images of a
        # multi-image prompt a base view each; a video of pooled frames after an image
        specs.append(SampleSpec(images=((64, 64),), videos=((2, 32, 32),), question=3))
    if family in QWEN:
        specs.append(SampleSpec(videos=((4, 32, 32),), question=3))
    return specs


def sample_alone(batch, b, family):
    """Sample b of a batch as a batch of one (padding removed, its own pixels and grids)."""
    mask = batch["attention_mask"][b].bool()
    ids = batch["input_ids"][b][mask].unsqueeze(0)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    def count(tok, row):
        return int((batch["input_ids"][row] == tok).sum())

    if family in QWEN:
        out["mm_token_type_ids"] = batch["mm_token_type_ids"][b][mask].unsqueeze(0)
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
    n_before = sum(_images_in_row(batch, r, family) for r in range(b))
    n_mine = _images_in_row(batch, b, family)
    if n_mine:
        out["pixel_values"] = batch["pixel_values"][n_before : n_before + n_mine]
        if family in ("llava_next", "llava_onevision"):
            out["image_sizes"] = batch["image_sizes"][n_before : n_before + n_mine]
        if family == "llava_onevision":
            out["batch_num_images"] = torch.tensor([n_mine])
    if family == "llava_onevision" and "pixel_values_videos" in batch:
        v_before = sum(_runs(batch["input_ids"][r] == VIDEO_TOKEN) for r in range(b))
        v_mine = _runs(batch["input_ids"][b] == VIDEO_TOKEN)
        if v_mine:
            out["pixel_values_videos"] = batch["pixel_values_videos"][v_before : v_before + v_mine]
    return out


def _runs(flags: torch.Tensor) -> int:
    """Runs of True in a 1-D bool tensor (the placeholder spans of a row; text separates them in these specs)."""
    ids = flags.int()
    return int(((ids[1:] - ids[:-1]) == 1).sum()) + int(ids[0])


def _images_in_row(batch, row, family):
    n = int((batch["input_ids"][row] == IMAGE_TOKEN).sum())
    if family == "llava":
        return n // 64
    # llava_next, llava_onevision: count runs of placeholders (images are separated by text in these specs)
    return _runs(batch["input_ids"][row] == IMAGE_TOKEN)


def patch_positions(model, batch, b: int = 0) -> torch.Tensor:
    """Positions of sample b's patch tokens, found independently of the adapters.

    Visual placeholders from the token ids; for LLaVA-NeXT the newline rows
    (LLaVA-OneVision: also the one after a multi-image view or a video) are
    dropped by recognising the learned ``image_newline`` vector in the
    language model's input.
    """
    ids = batch["input_ids"][b]
    visual = torch.nonzero((ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)).flatten()
    if model.config.model_type not in ("llava_next", "llava_onevision"):
        return visual
    embeds = lm_input_embeds(model, batch)
    return visual[~(embeds[b, visual] == model.model.image_newline).all(-1)]


def lm_input_embeds(model, batch) -> torch.Tensor:
    """The merged input embeddings the language model receives for `batch` (before any pruning)."""
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.update(e=kw["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen["e"]
