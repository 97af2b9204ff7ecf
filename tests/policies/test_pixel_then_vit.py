"""PixelPrune before the vision encoder, then a ``vit_layer=k`` policy inside it (the Qwen ViTs).

Oracle: the tower run by hand from the spec: blocks 0 .. k-1 on the units
PixelPrune kept (their patches, whole-grid rotary and absolute positions
gathered, one attention segment per image, Qwen2.5-VL's windows over the
kept units), then blocks k .. on the subset the second policy kept, then the
merger; each sample run alone; generate with the cache against recomputing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import gen_kwargs, inputs, mixed_specs, model_for, sample_alone
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

import vtprune
from policies.test_pixelprune import _units, first_image_units, window_order, with_pattern
from vtprune.checks import BadValue
from vtprune.patches import supported_pixel_then_vit
from vtprune.policies import Fixed, Pipeline, PixelPrune, Random

FAMILIES = supported_pixel_then_vit()
DEPTH = 4  # ViT blocks of the test models


def image_batch(model, family):
    """The mixed batch's samples with images (0 and 1: one tower call), the first image with duplicate units."""
    batch = inputs(model, mixed_specs(family))
    batch = {
        k: (v[:2] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
        for k, v in batch.items()
        if "video" not in k
    }
    return with_pattern(model, batch, "duplicates")


def stages_of(model) -> list[list[list[list[int]]]]:
    """Per sample, per image: the kept lists of each vision-stage policy, in pipeline order."""
    return [
        [[stage["kept"] for stage in img["stages"].values()] for img in s["images"]]
        for s in vtprune.report(model).to_dict()["samples"]
    ]


def segments(tower, grid, keep):
    """(one attention segment per image over the kept units, the windows, the kept units in window order)."""
    unit = tower.spatial_merge_size**2
    per_image = (grid.prod(-1) // unit).tolist()
    counts = torch.tensor([int(k.sum()) * unit for k in torch.split(keep, per_image)])
    windows, order = window_order(tower, grid, keep)
    return F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0)), windows, order


def hand_run_two_stages(tower, pixel_values, grid, first, at, second):
    """The merger's output per unit of ``second`` (raster order): blocks before ``at`` on ``first``'s units,
    the blocks from ``at`` on ``second``'s (a subset)."""
    unit = tower.spatial_merge_size**2
    raster = torch.nonzero(first).flatten()
    rows = (raster[:, None] * unit + torch.arange(unit)).flatten()
    hidden = tower.patch_embed(pixel_values[rows].to(tower.patch_embed.proj.weight.dtype))
    if hasattr(tower, "pos_embed"):
        idx, wts = get_vision_interpolation_indices_and_weights(
            grid,
            num_grid_per_side=tower.num_grid_per_side,
            mode=tower.interpolation_mode,
            align_corners=tower.interpolation_align_corners,
            spatial_merge_size=tower.spatial_merge_size,
        )
        hidden = hidden + (tower.pos_embed(idx) * wts[:, :, None]).sum(1)[rows].to(hidden.dtype)
    cos, sin = (x[rows] for x in tower.rotary_pos_emb(hidden, get_vision_position_ids(grid, tower.spatial_merge_size)))
    full = getattr(tower, "fullatt_block_indexes", range(len(tower.blocks)))
    state = hidden, cos, sin  # raster order over `first`'s units
    for keep, blocks in ((first, range(at)), (second, range(at, len(tower.blocks)))):
        subset = keep[first]  # which of `first`'s units run these blocks
        cu, windows, order = segments(tower, grid, keep)
        h, c, s = (_units(x, unit)[subset][order].flatten(0, 1) for x in state)
        for j in blocks:
            h = tower.blocks[j](h, cu_seqlens=cu if j in full else windows, position_embeddings=(c, s))
        # back to raster order over the units that ran (the merger acts on each unit alone)
        state = (_units(h, unit)[torch.argsort(order)].flatten(0, 1), *(_units(x, unit)[subset].flatten(0, 1) for x in state[1:]))
    return tower.merger(state[0])


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("at", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_tower_equals_hand_run_of_both_keep_sets(family, at, attn):
    model = model_for(family, attn, vision_layers=DEPTH)
    batch, dropped = image_batch(model, family)
    tower = model.model.visual
    seen = []
    handle = tower.register_forward_hook(lambda _m, args, out: seen.append((args[0].shape[0], out.pooler_output)))
    vtprune.wrap(model, Pipeline([PixelPrune(), Random(keep=0.5, vit_layer=at)]))
    model(**batch)
    handle.remove()
    grid = batch["image_grid_thw"]
    sizes = (grid.prod(-1) // 4).tolist()
    first = torch.ones(sum(sizes), dtype=torch.bool)
    first[dropped] = False
    kept = stages_of(model)
    second = torch.zeros_like(first)
    for g, (pix, inside) in enumerate(img for s in kept for img in s):
        base = sum(sizes[:g])
        assert pix == [k for k in range(sizes[g]) if bool(first[base + k])]  # PixelPrune's own keep set
        assert len(inside) == sizes[g] // 2 and set(inside) <= set(pix)  # half of every image, among those
        second[base + torch.tensor(inside)] = True
    ((fed, pooled),) = seen
    assert fed == batch["pixel_values"].shape[0]  # the hook sees the call's input, the tower's output at full length
    want = hand_run_two_stages(tower, batch["pixel_values"], grid, first, at, second)
    torch.testing.assert_close(pooled[second], want, rtol=1e-5, atol=1e-5)
    assert not pooled[~second].any()


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_alone_and_cache_equals_recomputation(family):
    model = model_for(family, "sdpa", vision_layers=DEPTH)
    batch, dropped = with_pattern(model, inputs(model, mixed_specs(family)), "duplicates")
    vtprune.wrap(model, Pipeline([PixelPrune(), Random(keep=0.5, vit_layer=2)]))
    together = model(**batch).logits[:, -1]
    kept = stages_of(model)
    units = first_image_units(model, batch)
    assert kept[0][0][0] == [k for k in range(units) if k not in dropped]
    for b in range(batch["input_ids"].shape[0]):
        alone = model(**sample_alone(batch, b, family)).logits[:, -1]
        assert stages_of(model)[0] == kept[b]
        torch.testing.assert_close(alone[0], together[b], rtol=1e-4, atol=1e-5)
    kw = gen_kwargs(4)
    assert torch.equal(model.generate(**batch, **kw), model.generate(**batch, use_cache=False, **kw))


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_the_language_model_sees_what_fixed_keep_sets_give(family):
    """The sequence depends on the keep sets only: PixelPrune then Fixed(kept=the same sets, vit_layer=k) gives the
    logits of PixelPrune then Random(vit_layer=k), and the report's counts are before -> after per stage."""
    model = model_for(family, "sdpa", vision_layers=DEPTH)
    batch, _ = with_pattern(model, inputs(model, mixed_specs(family)), "duplicates")
    vtprune.wrap(model, Pipeline([PixelPrune(), Random(keep=0.5, vit_layer=2)]))
    want = model(**batch).logits
    kept = stages_of(model)
    for s in vtprune.report(model).to_dict()["samples"]:
        for img in s["images"]:
            pix, inside = img["stages"].values()
            assert (pix["before"], pix["after"], inside["before"]) == (img["tokens"], len(pix["kept"]), len(pix["kept"]))
            assert inside["after"] == len(inside["kept"]) == img["tokens"] // 2
    vtprune.wrap(model, Pipeline([PixelPrune(), Fixed(kept=[[img[1] for img in s] for s in kept], vit_layer=2)]))
    torch.testing.assert_close(model(**batch).logits, want, rtol=1e-5, atol=1e-5)


def test_refused_where_not_built_and_with_two_before():
    llava = model_for("llava", vision_layers=DEPTH)
    with pytest.raises(BadValue, match="not yet for llava"):
        vtprune.wrap(llava, Pipeline([PixelPrune(), Random(keep=4, vit_layer=1)]))
    assert not hasattr(llava, "_vtprune_runtime")  # the refused wrap left the model as it was
    with pytest.raises(ValueError, match="first"):
        Pipeline([Random(keep=4, vit_layer=1), PixelPrune()])
