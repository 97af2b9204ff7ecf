"""Shared test helpers: tiny models, batches, and independent references."""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from vtprune.patches import ADAPTERS
from vtprune.tiny import IMAGE_TOKEN, VIDEO_TOKEN, SampleSpec, make_inputs, tiny_model

QWEN = tuple(t for t, adapter in ADAPTERS.items() if adapter.mrope)  # the M-RoPE (Qwen) families


def model_for(family: str, attn: str = "sdpa", seed: int = 0, **geometry):
    from vtprune.tiny import Geometry

    return tiny_model(family, Geometry(**geometry) if geometry else None, attn=attn, seed=seed)


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


def inputs(model, specs, seed: int = 0):
    return make_inputs(model, specs, seed=seed)


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


def gen_kwargs(n: int, **extra) -> dict:
    """generate() options; the random models must not emit placeholder ids (a no-cache step would read them as images)
    nor stop early (a sample alone would end at eos where the batch pads it: compare n tokens)."""
    from vtprune.tiny import VISION_END, VISION_START

    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
              suppress_tokens=[IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END])
    kw.update(extra)
    return kw


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
    from vtprune.patches import adapter_for  # noqa: F401
    from vtprune.tiny import IMAGE_TOKEN

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
