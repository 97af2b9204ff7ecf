"""PixelPrune before the vision encoder, then a ``vit_layer=k`` policy inside it (the Qwen ViTs, CLIP, SigLIP).

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
from helpers import gen_kwargs, inputs, mixed_specs, model_for, sample_alone, stages_of, unmixed_specs

import vtprune
from policies.test_pixelprune import _units, first_image_units, kept_embeddings, window_order, with_crop_pattern, with_pattern
from policies.test_vit_layer import crop_keep
from vtprune.checks import BadValue
from vtprune.patches import adapter_for, supported_pixel_then_vit
from vtprune.policies import Fixed, Pipeline, PixelPrune, Random

FAMILIES = supported_pixel_then_vit()
QWEN = [f for f in FAMILIES if f.startswith("qwen")]
LLAVA = [f for f in FAMILIES if f.startswith("llava")]  # CLIP and SigLIP: each image (crop) one tower image
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
    full = getattr(tower, "fullatt_block_indexes", range(len(tower.blocks)))
    state = kept_embeddings(tower, pixel_values, grid, first)  # raster order over `first`'s units
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
@pytest.mark.parametrize("family", QWEN)
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
    batch, dropped = with_pattern(model, inputs(model, unmixed_specs(family)), "duplicates")
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
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "llava_onevision"])
def test_the_language_model_sees_what_fixed_keep_sets_give(family):
    """The sequence depends on the keep sets only: PixelPrune then Fixed(kept=the same sets, vit_layer=k) gives the
    logits of PixelPrune then Random(vit_layer=k), and the report's counts are before -> after per stage."""
    model = model_for(family, "sdpa", vision_layers=DEPTH)
    batch, _ = with_pattern(model, inputs(model, unmixed_specs(family)), "duplicates")
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


def test_refused_where_not_built_and_with_two_before(monkeypatch):
    from vtprune.patches.llava import LlavaAdapter

    llava = model_for("llava", vision_layers=DEPTH)
    monkeypatch.setattr(LlavaAdapter, "pixel_then_vit", False)  # every family has it built today
    with pytest.raises(BadValue, match="not yet for llava"):
        vtprune.wrap(llava, Pipeline([PixelPrune(), Random(keep=4, vit_layer=1)]))
    assert not hasattr(llava, "_vtprune_runtime")  # the refused wrap left the model as it was
    monkeypatch.undo()
    with pytest.raises(ValueError, match="first"):
        Pipeline([Random(keep=4, vit_layer=1), PixelPrune()])


# ----------------------------------------------------------------- CLIP and SigLIP (LLaVA-1.5, -NeXT, -OneVision)
def hand_run_crop_two_stages(model, crop: torch.Tensor, first: torch.Tensor, at: int, second: torch.Tensor):
    """One tower image run by hand: its embeddings (patch embedding plus position table; CLIP: CLS first) gathered to
    ``first``'s patches (CLIP: and CLS), CLIP's pre-layernorm, blocks 0 .. at-1 on those, blocks at .. on the rows of
    ``second`` (a subset; CLIP: and CLS). Returns the feature layer's rows of ``second``'s patches ``(m, D)``."""
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    cls = int(hasattr(tower, "pre_layrnorm"))  # CLIP; SigLIP has neither CLS nor a pre-layernorm
    index = torch.cat([torch.zeros(cls, dtype=torch.long), torch.nonzero(first).flatten() + cls])
    hidden = tower.embeddings(crop[None])[:, index]
    if cls:
        hidden = tower.pre_layrnorm(hidden)
    rows = torch.cat([torch.ones(cls, dtype=torch.bool), second[first]])  # `second`'s rows among `first`'s
    states = [hidden]
    for j, layer in enumerate(tower.encoder.layers):
        if j == at:
            hidden = hidden[:, rows]
        hidden = layer(hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        states.append(hidden)
    return states[model.config.vision_feature_layer][0, cls:]


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("at", [1, 2])
@pytest.mark.parametrize("family", LLAVA)
def test_clip_siglip_tower_equals_hand_run_of_both_keep_sets(family, at, attn):
    """Every tower image (LLaVA-NeXT, OneVision: every crop) runs its first blocks on the patches PixelPrune kept and
    the blocks from `at` on the patches behind the second policy's tokens; zero at every other patch."""
    model = model_for(family, attn, vision_layers=DEPTH)
    batch = inputs(model, unmixed_specs(family))
    if "image_sizes" in batch:
        batch, first0 = with_crop_pattern(model, batch)  # the first image's base view and first tile
    else:
        batch, dropped = with_pattern(model, batch, "duplicates")
        first0 = torch.ones(1, first_image_units(model, batch), dtype=torch.bool)
        first0[0, dropped] = False
    outs = []
    handle = model.model.vision_tower.register_forward_hook(lambda _m, _a, out: outs.append(out))
    vtprune.wrap(model, Pipeline([PixelPrune(), Random(keep=0.5, vit_layer=at)]))
    model(**batch)
    handle.remove()
    second = crop_keep(model, batch, [[img[1] for img in s] for s in stages_of(model)])
    first = torch.ones_like(second)
    first[: first0.shape[0]] = first0  # random pixels elsewhere: PixelPrune keeps every other patch
    assert not (second & ~first).any() and (first & ~second).any()
    pixels = batch["pixel_values"]
    crops = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels  # the tower's images, as the model lists them
    if pixels.dim() == 5:  # the padded crops of images with fewer tiles are no tower image
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        counts, config = batch.get("batch_num_images"), model.config
        flags = [True] * len(batch["image_sizes"]) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
        real = [
            image_size_to_num_patches(size.tolist(), config.image_grid_pinpoints, config.vision_config.image_size) if crop else 1
            for size, crop in zip(batch["image_sizes"], flags)
        ]
        crops = torch.cat([pixels[g, :n] for g, n in enumerate(real)])
    feature = outs[0].hidden_states[model.config.vision_feature_layer]
    cls = int(adapter_for(model).vision_cls)
    assert feature.shape[0] == crops.shape[0] == second.shape[0]
    for c in range(second.shape[0]):
        got = feature[c, cls:]
        want = hand_run_crop_two_stages(model, crops[c], first[c], at, second[c])
        torch.testing.assert_close(got[second[c]], want, rtol=1e-5, atol=1e-5)
        assert not got[~second[c]].any()


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_reported_ms_include_the_choice_made_inside_the_tower(family, monkeypatch):
    """PixelPrune's predictor and a vit_layer selection run inside the tower call; their stages' ms count them."""
    import time

    import vtprune.encoder as encoder_module

    model = model_for(family, "sdpa", vision_layers=DEPTH)
    batch, _ = with_pattern(model, inputs(model, mixed_specs(family)), "duplicates")
    slow_keep, slow_select = 0.05, 0.08

    def keep_slowly(self, adapter, pixel_values, grid_thw):
        time.sleep(slow_keep)
        return adapter.unit_keep(pixel_values, grid_thw, self.tau)

    real_selection = encoder_module.encoder_selection

    def select_slowly(*args, **kwargs):
        time.sleep(slow_select)
        return real_selection(*args, **kwargs)

    monkeypatch.setattr(PixelPrune, "encoder_keep", keep_slowly)
    monkeypatch.setattr(encoder_module, "encoder_selection", select_slowly)
    vtprune.wrap(model, Pipeline([PixelPrune(), Random(keep=0.5, vit_layer=2)]))
    model(**batch)
    calls = 2 if family.startswith("qwen") else 1  # Qwen: one tower call for the images, one for the video
    for sample in vtprune.report(model).to_dict()["samples"]:
        for img in sample["images"]:
            pix, inside = img["stages"].values()
            assert pix["ms"] >= 1000 * slow_keep * calls * 0.99
            assert inside["ms"] >= 1000 * slow_select * calls * 0.99
            assert pix["ms"] < 1000 * slow_select * calls  # each stage counts its own part only
