"""Shared test helpers: tiny models, batches, and independent references."""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from vtprune.tiny import (  # noqa: F401  (re-exported for the tests)
    IMAGE_TOKEN,
    QWEN,
    VIDEO_TOKEN,
    SampleSpec,
    lm_input_embeds,
    make_inputs,
    mixed_specs,
    patch_positions,
    sample_alone,
    single_spec,
    tiny_model,
)

ATTNS = ("eager", "sdpa", "vtprune_noweights")  # the no-weights backend is registered by conftest.py


def model_for(family: str, attn: str = "sdpa", seed: int = 0, **geometry):
    from vtprune.tiny import Geometry

    return tiny_model(family, Geometry(**geometry) if geometry else None, attn=attn, seed=seed)


def inputs(model, specs, seed: int = 0):
    return make_inputs(model, specs, seed=seed)


def unmixed_specs(family: str) -> list:
    """`mixed_specs` without LLaVA-OneVision's last sample, whose shrunk high-resolution view and pooled video frames
    give tokens that mix several patches (pruning before or inside the vision encoder refuses them)."""
    specs = mixed_specs(family)
    return specs[:3] if family == "llava_onevision" else specs


def token_patches(model, image_size, crops: bool) -> torch.Tensor:
    """The patch behind each token of one anyres image, span order (newlines skipped), as ``crop * P + p``.

    Written from the layout LLaVA-NeXT describes: the base view's patches in
    raster order, then the tiles (crops 1..) placed side by side into one
    grid of patches, the rows or columns the processor padded cut away
    (transformers' ``unpad_image`` on that grid of indices), row by row.
    """
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    per = side * side
    base = torch.arange(per)
    if not crops:
        return base
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    rows, cols = get_anyres_image_grid_shape(image_size.tolist(), config.image_grid_pinpoints, config.vision_config.image_size)
    grid = torch.zeros(rows * side, cols * side, dtype=torch.long)
    for a in range(rows):
        for c in range(cols):
            crop = 1 + a * cols + c
            grid[a * side : (a + 1) * side, c * side : (c + 1) * side] = crop * per + torch.arange(per).view(side, side)
    return torch.cat([base, unpad_image(grid[None], image_size)[0].flatten()])


def visual_positions(family: str, input_ids: torch.Tensor) -> torch.Tensor:
    """Positions of every visual placeholder, found directly from the token ids (independent of adapters)."""
    row = input_ids[0] if input_ids.dim() == 2 else input_ids
    return torch.nonzero((row == IMAGE_TOKEN) | (row == VIDEO_TOKEN)).flatten()


def hooks_left(model) -> list[str]:
    """Names of modules that still carry hooks or an instance-bound forward."""
    left = []
    for name, module in model.named_modules():
        bound = {"forward", "get_image_features", "get_video_features"} & set(module.__dict__)
        if module._forward_hooks or module._forward_pre_hooks or bound:
            left.append(name or "<root>")
    return left


def stages_of(model) -> list[list[list[list[int]]]]:
    """Per sample, per image of the wrapped model's last report: the kept lists of each stage, in pipeline order."""
    import vtprune

    return [
        [[stage["kept"] for stage in img["stages"].values()] for img in s["images"]]
        for s in vtprune.report(model).to_dict()["samples"]
    ]


def gen_kwargs(n: int, **extra) -> dict:
    """generate() options; the random models must not emit placeholder ids (a no-cache step would read them as images)
    nor stop early (a sample alone would end at eos where the batch pads it: compare n tokens)."""
    from vtprune.tiny import VISION_END, VISION_START

    kw = dict(
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        suppress_tokens=[IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END],
    )
    kw.update(extra)
    return kw


_RECORDED: list = []


def _recording_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The Qwen ViT's own eager attention, one call per attention segment, with its weights recorded."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

    out, weights = eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    _RECORDED.append((module, weights.detach()))
    return out, weights


AttentionInterface.register("vtprune_test_record", _recording_attention)


def eager_vit_received(model, batch) -> tuple[dict, dict]:
    """Brute force from the ViT's own eager weights: per block, the attention each patch receives, per call.

    Returns ``{block: [received of the image call, of the video call]}`` (the
    block's token order, summed over the queries of every segment the block
    attended within, mean over heads) and ``{block: [LayerCall-like (hidden,
    kwargs) per call]}`` from a pre-hook.
    """
    visual = model.model.visual
    blocks = list(visual.blocks)
    seen: dict = {j: [] for j in range(len(blocks))}
    handles = [
        blk.register_forward_pre_hook(lambda _m, a, kw, _j=j: seen[_j].append((a[0], kw)), with_kwargs=True)
        for j, blk in enumerate(blocks)
    ]
    previous = visual.config._attn_implementation
    visual.config._attn_implementation = "vtprune_test_record"
    _RECORDED.clear()
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        visual.config._attn_implementation = previous
        for h in handles:
            h.remove()
    owner = {id(blk.attn): j for j, blk in enumerate(blocks)}
    segments: dict = {j: [] for j in range(len(blocks))}
    for module, weights in _RECORDED:
        segments[owner[id(module)]].append(weights[0].float().mean(0).sum(0))  # (len,): column sums, mean over heads
    received = {}
    for j, segs in segments.items():
        flat = torch.cat(segs)
        sizes = [hidden.shape[0] for hidden, _ in seen[j]]
        received[j] = list(torch.split(flat, sizes))
    return received, seen
