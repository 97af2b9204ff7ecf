"""PixelPrune: the 2-D predictor against a brute-force scan, and the vision tower run on the kept units only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import gen_kwargs, inputs, mixed_specs, model_for, sample_alone
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

import vtprune
from vtprune.ops.pixel import pred2d_keep
from vtprune.patches import supported_pixel_prune
from vtprune.policies import Fixed, HiPrune, IDPruner, Pipeline, PixelPrune

FAMILIES = supported_pixel_prune()


# ----------------------------------------------------------------- the predictor
def brute_force_keep(g: torch.Tensor, tau: float) -> torch.Tensor:
    """The scan as the paper states it: raster order, neighbours from the reconstruction, max |diff| <= tau."""
    h, w, _ = g.shape
    recon = g.clone()
    keep = torch.zeros(h, w, dtype=torch.bool)

    def same(x, y):
        return float((x - y).abs().max()) <= tau

    for r in range(h):
        for c in range(w):
            if r == 0 and c == 0:
                keep[r, c] = True
                continue
            if r == 0:
                pred = recon[r, c - 1]
            elif c == 0:
                pred = recon[r - 1, c]
            else:
                a, b, cc = recon[r, c - 1], recon[r - 1, c], recon[r - 1, c - 1]
                pred = b if same(cc, a) and not same(cc, b) else a
            if same(g[r, c], pred):
                recon[r, c] = pred
            else:
                keep[r, c] = True
    return keep


@pytest.mark.parametrize("seed", range(6))
def test_predictor_matches_brute_force_scan(seed):
    gen = torch.Generator().manual_seed(seed)
    palette = torch.rand(3, 5, generator=gen)  # few distinct units: many duplicates, edges both ways
    g = palette[torch.randint(0, 3, (7, 9), generator=gen)]
    assert torch.equal(pred2d_keep(g, 0.0), brute_force_keep(g, 0.0))
    noisy = g + 0.01 * torch.rand(g.shape, generator=gen)
    for tau in (0.005, 0.02):
        assert torch.equal(pred2d_keep(noisy, tau), brute_force_keep(noisy, tau))


def test_predictor_known_answers():
    flat = torch.zeros(4, 5, 2)
    assert pred2d_keep(flat).sum() == 1  # one anchor for a flat image
    # a vertical edge at column 2: kept are the top-left anchor and the first unit right of the edge
    edge = torch.zeros(4, 5, 1)
    edge[:, 2:] = 1.0
    keep = pred2d_keep(edge)
    assert torch.nonzero(keep).tolist() == [[0, 0], [0, 2]]
    assert pred2d_keep(torch.rand(3, 3, 4)).all()


# ----------------------------------------------------------------- on the models
QWEN = [f for f in FAMILIES if f.startswith("qwen")]


def is_qwen(model) -> bool:
    return hasattr(model.model, "visual")


def first_image_units(model, batch) -> int:
    """Merge units of the batch's first image (Qwen: 2x2 patches; CLIP: patches)."""
    if is_qwen(model):
        return int(batch["image_grid_thw"][0].prod()) // 4
    return (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2


def with_pattern(model, batch: dict, pattern: str) -> tuple[dict, list[int]]:
    """The batch with repeated units in its first image, and the units PixelPrune must drop there.

    ``duplicates``: units 1 and 2 copy unit 0 along the top row, and the
    unit at row 1, column 1 copies its left neighbour (C equals B there, so
    A predicts it). ``flat``: the whole first image one unit repeated (only
    the top-left is kept; Qwen2.5-VL: a window left empty).
    """
    batch = dict(batch)
    pv = batch["pixel_values"].clone()
    if is_qwen(model):
        width = int(batch["image_grid_thw"][0, 2]) // 2
        units = pv.view(-1, 4, pv.shape[-1])  # a unit's 4 patches are consecutive rows
        image = units[: first_image_units(model, batch)]
    else:
        patch = model.config.vision_config.patch_size
        c, h, w = pv.shape[1:]
        width = w // patch
        image = pv[0].view(c, h // patch, patch, width, patch).permute(1, 3, 0, 2, 4).reshape(-1, c, patch, patch)
    n = image.shape[0]
    dropped = [1, 2, width + 1] if pattern == "duplicates" else list(range(1, n))
    if pattern == "duplicates":
        image[1] = image[0]
        image[2] = image[0]
        image[width + 1] = image[width]
    else:
        image[1:] = image[0]
    if is_qwen(model):
        units[:n] = image
    else:
        patch = model.config.vision_config.patch_size
        pv[0] = image.view(h // patch, width, c, patch, patch).permute(2, 0, 3, 1, 4).reshape(c, h, w)
    batch["pixel_values"] = pv
    return batch, dropped


def hand_run_first_image(model, batch, keep_units) -> torch.Tensor:
    """The projector's output for the first image's kept units, the tower run by hand on them alone."""
    if is_qwen(model):
        grid = batch["image_grid_thw"][:1]
        return hand_run_tower(model.model.visual, batch["pixel_values"][: int(grid.prod())], grid, keep_units)
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    embeddings = tower.embeddings(batch["pixel_values"][:1])  # CLS first, the whole image's position table
    index = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.nonzero(keep_units).flatten()])
    hidden = tower.pre_layrnorm(embeddings[:, index])
    states = [hidden]
    for layer in tower.encoder.layers:
        hidden = layer(hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        states.append(hidden)
    return model.model.multi_modal_projector(states[model.config.vision_feature_layer][0, 1:])


def hand_run_tower(tower, pixel_values, grid_thw, keep_units):
    """The tower's blocks run by hand on the gathered patches, at their whole-grid positions.

    Patch embeddings of the kept patches; the whole grid's rotary table and
    (where the tower has one) its interpolated absolute position table,
    gathered; one attention segment per image holding its kept patches
    (`window_order`: the windows of Qwen2.5-VL's window-attention blocks).
    Returns the merger's output per kept unit (raster order).
    """
    unit = tower.spatial_merge_size**2
    kept_units = torch.nonzero(keep_units).flatten()
    rows = (kept_units[:, None] * unit + torch.arange(unit)).flatten()
    hidden = tower.patch_embed(pixel_values[rows].to(tower.patch_embed.proj.weight.dtype))
    if hasattr(tower, "pos_embed"):
        idx, wts = get_vision_interpolation_indices_and_weights(
            grid_thw,
            num_grid_per_side=tower.num_grid_per_side,
            mode=tower.interpolation_mode,
            align_corners=tower.interpolation_align_corners,
            spatial_merge_size=tower.spatial_merge_size,
        )
        hidden = hidden + (tower.pos_embed(idx) * wts[:, :, None]).sum(1)[rows].to(hidden.dtype)
    positions = get_vision_position_ids(grid_thw, tower.spatial_merge_size)
    rotary = tuple(x[rows] for x in tower.rotary_pos_emb(hidden, positions))
    per_image = (grid_thw.prod(-1) // unit).tolist()
    counts = torch.tensor([int(k.sum()) * unit for k in torch.split(keep_units, per_image)])
    cu = F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
    windows, order = window_order(tower, grid_thw, keep_units)
    hidden, cos, sin = (_units(x, unit)[order].flatten(0, 1) for x in (hidden, *rotary))
    full = getattr(tower, "fullatt_block_indexes", range(len(tower.blocks)))
    for j, blk in enumerate(tower.blocks):
        hidden = blk(hidden, cu_seqlens=cu if j in full else windows, position_embeddings=(cos, sin))
    return tower.merger(hidden)[torch.argsort(order)]


def _units(x, unit):
    return x.reshape(x.shape[0] // unit, unit, *x.shape[1:])


def window_order(tower, grid_thw, keep_units):
    """Kept units in attention-window order and the windows' boundaries in patches (one window per image without
    window attention).

    Qwen2.5-VL: windows of ``window_size // merge // patch`` units a side,
    tiled from each image's top-left; units ordered by image, window row,
    window column, then raster order inside the window; empty windows are
    absent.
    """
    m = tower.spatial_merge_size
    side = tower.window_size // m // tower.patch_size if hasattr(tower, "window_size") else 10**9
    keys, unit_index = [], 0
    for n, (t, h, w) in enumerate(grid_thw.tolist()):
        for f in range(t):
            for r in range(h // m):
                for c in range(w // m):
                    if keep_units[unit_index]:
                        keys.append(((n, f, r // side, c // side), (r, c)))
                    unit_index += 1
    kept_rank = sorted(range(len(keys)), key=lambda k: keys[k])
    sizes = {}
    for window, _ in keys:
        sizes[window] = sizes.get(window, 0) + m * m
    bounds = [0]
    for window in sorted(sizes):
        bounds.append(bounds[-1] + sizes[window])
    return torch.tensor(bounds, dtype=torch.int32), torch.tensor(kept_rank)


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_no_duplicates_is_bit_identical(family, attn):
    model = model_for(family, attn)
    batch = inputs(model, mixed_specs(family))  # random pixels: no unit equals a neighbour
    want = model(**batch).logits
    vtprune.wrap(model, "pixelprune")
    assert torch.equal(model(**batch).logits, want)
    for sample in vtprune.report(model).to_dict()["samples"]:
        for image in sample["images"]:
            assert image["stages"]["vision"]["after"] == image["tokens"]


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("pattern", ["duplicates", "flat"])
def test_qwen_tower_encodes_the_kept_units_only(family, attn, pattern):
    model = model_for(family, attn)
    batch, dropped = with_pattern(model, inputs(model, mixed_specs(family)), pattern)
    tower = model.model.visual
    seen = []
    handle = tower.register_forward_hook(lambda _m, args, out: seen.append((args[0].shape[0], out.pooler_output)))
    vtprune.wrap(model, "pixelprune")
    model(**batch)
    handle.remove()
    grid = batch["image_grid_thw"]
    keep = torch.ones(int(grid.prod(-1).sum()) // 4, dtype=torch.bool)
    keep[dropped] = False
    (fed, pooled), *_ = seen  # the image call: the hook sees the tower's input and its full-length output
    assert fed == batch["pixel_values"].shape[0]
    want = hand_run_tower(tower, batch["pixel_values"], grid, keep)
    torch.testing.assert_close(pooled[keep], want, rtol=1e-5, atol=1e-5)
    assert not pooled[~keep].any()  # dropped units: nothing encoded


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", ["duplicates", "flat"])
def test_language_model_sees_kept_units_at_original_positions(family, attn, pattern):
    """The language model's input: the unpruned one at the kept rows (positions, text), the hand-run tower's units."""
    model = model_for(family, attn)
    batch, dropped = with_pattern(model, inputs(model, mixed_specs(family)), pattern)
    seen = {}

    def grab(_m, args, kwargs):  # the language model's rotary table is built from what its layers get
        x, positions = (*args, *kwargs.values())[:2]
        seen.setdefault("embeds", x)
        seen.setdefault("positions", positions)

    handle = model.model.language_model.rotary_emb.register_forward_pre_hook(grab, with_kwargs=True)
    model(**batch)
    full_embeds, full_positions = seen.pop("embeds"), seen.pop("positions")
    vtprune.wrap(model, "pixelprune")
    model(**batch)
    handle.remove()
    units = first_image_units(model, batch)
    ids = batch["input_ids"][0]
    mask = batch["attention_mask"][0].bool()
    image_pos = torch.nonzero(ids == model.config.image_token_id).flatten()[:units]
    drop = image_pos[dropped]
    keep_pos = torch.tensor([p for p in torch.nonzero(mask).flatten().tolist() if p not in drop.tolist()])
    length = seen["embeds"].shape[1]
    got = seen["embeds"][0][length - keep_pos.numel() :]  # left padded
    if full_positions.shape[-2] == 1:  # one row of positions for the batch (the model's own arange)
        full_positions = full_positions.expand(*full_positions.shape[:-2], batch["input_ids"].shape[0], -1)
    torch.testing.assert_close(seen["positions"][..., 0, length - keep_pos.numel() :], full_positions[..., 0, keep_pos])
    visual = torch.isin(keep_pos, image_pos)
    torch.testing.assert_close(got[~visual], full_embeds[0, keep_pos[~visual]])
    keep = torch.ones(units, dtype=torch.bool)
    keep[dropped] = False
    torch.testing.assert_close(got[visual], hand_run_first_image(model, batch, keep), rtol=1e-5, atol=1e-5)
    image = vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]["vision"]
    assert (image["before"], image["after"]) == (units, units - len(dropped))
    assert image["kept"] == [k for k in range(units) if k not in dropped]


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_alone_and_cache_equals_recomputation(family):
    model = model_for(family, "sdpa")
    batch, dropped = with_pattern(model, inputs(model, mixed_specs(family)), "duplicates")
    vtprune.wrap(model, "pixelprune")
    together = model(**batch).logits[:, -1]
    kept = [[i["stages"]["vision"]["kept"] for i in s["images"]] for s in vtprune.report(model).to_dict()["samples"]]
    assert kept[0][0] == [k for k in range(first_image_units(model, batch)) if k not in dropped]
    for b in range(batch["input_ids"].shape[0]):
        alone = model(**sample_alone(batch, b, family)).logits[:, -1]
        alone_kept = [i["stages"]["vision"]["kept"] for i in vtprune.report(model).to_dict()["samples"][0]["images"]]
        assert alone_kept == kept[b]
        torch.testing.assert_close(alone[0], together[b], rtol=1e-4, atol=1e-5)
    kw = gen_kwargs(4)
    assert torch.equal(model.generate(**batch, **kw), model.generate(**batch, use_cache=False, **kw))


@torch.no_grad()
@pytest.mark.parametrize("later", ["idpruner", "idpruner_received"])
@pytest.mark.parametrize("family", FAMILIES)
def test_later_policy_sees_only_kept_units(family, later):
    """A later policy picks among the kept units; one reading the ViT's layers reads them as the tower ran.

    (HiPrune and VisionZip read each image's whole grid: a Pipeline refuses them after PixelPrune.)
    """
    model = model_for(family, "sdpa")
    batch, dropped = with_pattern(model, inputs(model, mixed_specs(family)), "duplicates")
    second = {
        "idpruner": IDPruner(keep=5, per_image=True),
        "idpruner_received": IDPruner(keep=5, per_image=True, importance="received"),
    }[later]
    vtprune.wrap(model, Pipeline([PixelPrune(), second]))
    cached = model.generate(**batch, **gen_kwargs(3))
    stages = vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]
    first, then = stages["vision"], list(stages.values())[-1]
    assert first["after"] == first_image_units(model, batch) - len(dropped) and then["after"] == 5
    assert set(then["kept"]) <= set(first["kept"])
    # the sequence the language model gets depends on the keep sets only: replayed with `fixed`, the same tokens
    vtprune.wrap(
        model,
        Pipeline(
            [
                PixelPrune(),
                Fixed(
                    kept=[
                        [i["stages"][list(i["stages"])[-1]]["kept"] for i in s["images"]]
                        for s in vtprune.report(model).to_dict()["samples"]
                    ]
                ),
            ]
        ),
    )
    assert torch.equal(model.generate(**batch, **gen_kwargs(3)), cached)


def test_refusals():
    with pytest.raises(ValueError, match="put it first"):
        Pipeline([HiPrune(keep=3), PixelPrune()])
    with pytest.raises(ValueError, match="takes no keep"):
        PixelPrune(keep=0.5)
    with pytest.raises(ValueError, match="tau"):
        PixelPrune(tau=-0.1)
    for family in ("llava_next", "llava_onevision"):
        if family in FAMILIES:
            continue
        with pytest.raises(ValueError, match="supported: " + ", ".join(FAMILIES)):
            vtprune.wrap(model_for(family), "pixelprune")


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_vit_signals_after_pixelprune_do_not_depend_on_the_batch(family):
    """ViT attention read over the kept units: the same alone as in a batch (CLIP pads images to the longest kept
    set; the probe leaves the padding out)."""
    model = model_for(family, "sdpa")
    batch, _ = with_pattern(model, inputs(model, mixed_specs(family)), "duplicates")
    vtprune.wrap(model, Pipeline([PixelPrune(), IDPruner(keep=5, per_image=True, importance="received", lam=1.0)]))
    model(**batch)
    together = [[list(i["stages"].values())[-1]["kept"] for i in s["images"]] for s in vtprune.report(model).to_dict()["samples"]]
    for b in range(batch["input_ids"].shape[0]):
        model(**sample_alone(batch, b, family))
        alone = [list(i["stages"].values())[-1]["kept"] for i in vtprune.report(model).to_dict()["samples"][0]["images"]]
        assert alone == together[b]
