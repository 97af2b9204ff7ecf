"""PixelPrune: the 2-D predictor against a brute-force scan, and the vision tower run on the kept units only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import SampleSpec, gen_kwargs, inputs, model_for, sample_alone, token_patches, unmixed_specs
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

import vtprune
from vtprune.checks import BadValue
from vtprune.ops.pixel import pred2d_keep
from vtprune.patches import adapter_for, supported_pixel_prune
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
ANYRES = ["llava_next", "llava_onevision"]  # a base view and tiles, each crop one tower image


def is_qwen(model) -> bool:
    return hasattr(model.model, "visual")


def first_image_units(model, batch) -> int:
    """Tokens of the batch's first image: merge units (Qwen: 2x2 patches; CLIP: patches; LLaVA-NeXT and OneVision:
    the patches of its base view and of its tiles that the unpadded view holds)."""
    if is_qwen(model):
        return int(batch["image_grid_thw"][0].prod()) // 4
    if "image_sizes" in batch:
        return token_patches(model, batch["image_sizes"][0], crops=True).numel()
    return (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2


def crop_patches(crop: torch.Tensor, patch: int) -> torch.Tensor:
    """One crop's pixels ``(3, H, W)`` -> its patches ``(H/p * W/p, 3, p, p)``, raster order (a view for writing)."""
    c, h, w = crop.shape
    return crop.view(c, h // patch, patch, w // patch, patch).permute(1, 3, 0, 2, 4).reshape(-1, c, patch, patch)


def put_patches(crop: torch.Tensor, patches: torch.Tensor) -> None:
    c, h, w = crop.shape
    p = patches.shape[-1]
    crop.copy_(patches.view(h // p, w // p, c, p, p).permute(2, 0, 3, 1, 4).reshape(c, h, w))


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
    else:  # LLaVA-NeXT, OneVision: the first image's base view, its first tokens
        patch = model.config.vision_config.patch_size
        view = pv[0, 0] if pv.dim() == 5 else pv[0]
        width = view.shape[-1] // patch
        image = crop_patches(view, patch)
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
        put_patches(view, image)
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


def kept_embeddings(tower, pixel_values, grid_thw, keep_units):
    """(patch embeddings plus the interpolated absolute positions where the tower has them, rotary cos, sin) of the
    kept units' patches, each gathered from the whole grid's, raster order."""
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
    cos, sin = (x[rows] for x in tower.rotary_pos_emb(hidden, positions))
    return hidden, cos, sin


def hand_run_tower(tower, pixel_values, grid_thw, keep_units):
    """The tower's blocks run by hand on the gathered patches, at their whole-grid positions.

    Patch embeddings of the kept patches; the whole grid's rotary table and
    (where the tower has one) its interpolated absolute position table,
    gathered; one attention segment per image holding its kept patches
    (`window_order`: the windows of Qwen2.5-VL's window-attention blocks).
    Returns the merger's output per kept unit (raster order).
    """
    unit = tower.spatial_merge_size**2
    hidden, *rotary = kept_embeddings(tower, pixel_values, grid_thw, keep_units)
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
    batch = inputs(model, unmixed_specs(family))  # random pixels: no unit equals a neighbour
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
    batch, dropped = with_pattern(model, inputs(model, unmixed_specs(family)), pattern)
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
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ANYRES])
@pytest.mark.parametrize("pattern", ["duplicates", "flat"])
def test_language_model_sees_kept_units_at_original_positions(family, attn, pattern):
    """The language model's input: the unpruned one at the kept rows (positions, text), the hand-run tower's units."""
    model = model_for(family, attn)
    batch, dropped = with_pattern(model, inputs(model, unmixed_specs(family)), pattern)
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
    batch, dropped = with_pattern(model, inputs(model, unmixed_specs(family)), "duplicates")
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

    (HiPrune and VisionZip after PixelPrune: tests/policies/test_after_pixelprune.py.)
    """
    model = model_for(family, "sdpa")
    batch, dropped = with_pattern(model, inputs(model, unmixed_specs(family)), "duplicates")
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


@torch.no_grad()
@pytest.mark.parametrize(
    "sample,why",
    [
        # 64 x 64: a 2 x 2 grid of tiles, 16 x 16 patches, past the tiny model's anyres_max_2
        (SampleSpec(images=((64, 64),)), r"image 0 \(64 x 64 px\): .* 16 x 16 patches .* shrinks it bilinearly to"),
        (SampleSpec(videos=((2, 32, 32),)), r"video 0: the model pools each frame's 8 x 8 patches bilinearly to 4 x 4"),
    ],
    ids=["shrunk_view", "video"],
)
def test_onevision_refuses_tokens_that_mix_patches(sample, why):
    """A OneVision token that mixes several patches (a shrunk high-resolution view, a pooled video frame) would mix a
    dropped patch's zeros into a kept token: refused at the call, naming the input and why."""
    model = model_for("llava_onevision")
    batch = inputs(model, [sample])
    batch, _ = with_pattern(model, batch, "duplicates") if "pixel_values" in batch else (batch, None)
    vtprune.wrap(model, "pixelprune")
    with pytest.raises(BadValue, match=why):
        model(**batch)
    vtprune.unwrap(model)
    vtprune.wrap(model, "random", keep=4, vit_layer=1)
    with pytest.raises(BadValue, match=why):
        model(**batch)


# ----------------------------------------------------------------- LLaVA-NeXT, OneVision: crops
def with_crop_pattern(model, batch: dict) -> tuple[dict, torch.Tensor]:
    """The `duplicates` pattern in the base view and in the first tile of the batch's first image.

    Returns the batch and the keep mask the predictor must give that image's crops ``(crops, P)``: in each of the two
    crops units 1 and 2 copy unit 0 and the unit at row 1, column 1 copies its left neighbour.
    """
    batch = dict(batch)
    pv = batch["pixel_values"].clone()
    patch = model.config.vision_config.patch_size
    side = model.config.vision_config.image_size // patch
    crops = token_patches(model, batch["image_sizes"][0], crops=True).max() // side**2 + 1
    keep = torch.ones(int(crops), side * side, dtype=torch.bool)
    for crop in (0, 1):
        units = crop_patches(pv[0, crop], patch)
        units[1] = units[0]
        units[2] = units[0]
        units[side + 1] = units[side]
        put_patches(pv[0, crop], units)
        keep[crop, [1, 2, side + 1]] = False
    batch["pixel_values"] = pv
    return batch, keep


def hand_run_crop(model, crop: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The tower's hidden states at the feature layer for one crop's kept patches, run by hand on them alone.

    The whole crop's embeddings (patch embedding plus position table; CLIP: CLS first), the kept rows gathered (CLIP:
    CLS too), CLIP's pre-layernorm, then every block. Returns ``(kept patches, D)`` (CLS dropped).
    """
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    cls = hasattr(tower, "pre_layrnorm")  # CLIP; SigLIP has no CLS token and no pre-layernorm
    index = torch.nonzero(keep).flatten() + int(cls)
    if cls:
        index = torch.cat([torch.zeros(1, dtype=torch.long), index])
    hidden = tower.embeddings(crop[None])[:, index]
    if cls:
        hidden = tower.pre_layrnorm(hidden)
    states = [hidden]
    for layer in tower.encoder.layers:
        hidden = layer(hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        states.append(hidden)
    return states[model.config.vision_feature_layer][0, int(cls) :]


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ANYRES)
def test_anyres_tower_and_language_model_see_the_kept_patches(family, attn):
    """Each crop is one tower image: the tower's features for the kept patches of every crop equal a hand run of the
    tower on them alone (zero where dropped); the language model gets exactly the tokens of kept patches (text and
    newlines as unpruned, at the unpruned positions), each the projected hand-run feature of its patch."""
    model = model_for(family, attn)
    batch, keep = with_crop_pattern(model, inputs(model, unmixed_specs(family)))
    seen = {}

    def grab(_m, args, kwargs):
        x, positions = (*args, *kwargs.values())[:2]
        seen.setdefault("embeds", x)
        seen.setdefault("positions", positions)

    handle = model.model.language_model.rotary_emb.register_forward_pre_hook(grab, with_kwargs=True)
    model(**batch)
    full_embeds, full_positions = seen.pop("embeds"), seen.pop("positions")
    outs = []
    tower_hook = model.model.vision_tower.register_forward_hook(lambda _m, _a, out: outs.append(out))
    vtprune.wrap(model, "pixelprune")
    model(**batch)
    handle.remove()
    tower_hook.remove()
    # the tower: the first image's crops are the call's first rows
    feature = outs[0].hidden_states[model.config.vision_feature_layer]
    cls = int(hasattr(getattr(model.model.vision_tower, "vision_model", model.model.vision_tower), "pre_layrnorm"))
    hand = []
    for c in range(keep.shape[0]):
        want = hand_run_crop(model, batch["pixel_values"][0, c], keep[c])
        torch.testing.assert_close(feature[c, cls:][keep[c]], want, rtol=1e-5, atol=1e-5)
        assert not feature[c, cls:][~keep[c]].any()
        hand.append(want)
    # the language model: image 0 is the first image span of sample 0
    codes = token_patches(model, batch["image_sizes"][0], crops=True)
    per = keep.shape[1]
    kept_token = keep.flatten()[codes]
    ids, mask = batch["input_ids"][0], batch["attention_mask"][0].bool()
    span = torch.nonzero(ids == model.config.image_token_id).flatten()
    cols = unpad_cols(model, batch["image_sizes"][0])
    n_rows = (codes.numel() - per) // cols
    span = span[: per + n_rows * (cols + 1)]  # base view, then each row of the unpadded view and its newline
    hires_pos = span[per:].view(n_rows, cols + 1)
    patch_pos = torch.cat([span[:per], hires_pos[:, :cols].flatten()])
    drop = patch_pos[~kept_token]
    keep_pos = torch.tensor([p for p in torch.nonzero(mask).flatten().tolist() if p not in set(drop.tolist())])
    length = seen["embeds"].shape[1]
    got = seen["embeds"][0][length - keep_pos.numel() :]  # left padded
    torch.testing.assert_close(seen["positions"][..., 0, length - keep_pos.numel() :], full_positions[..., 0, keep_pos])
    is_patch = torch.isin(keep_pos, patch_pos)
    torch.testing.assert_close(got[~is_patch], full_embeds[0, keep_pos[~is_patch]])  # text and newlines
    rank = keep.long().cumsum(1) - 1  # a kept patch's row in its crop's hand run
    want = torch.stack([hand[int(code) // per][rank[int(code) // per, int(code) % per]] for code in codes[kept_token]])
    torch.testing.assert_close(got[is_patch], model.model.multi_modal_projector(want), rtol=1e-5, atol=1e-5)
    image = vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]["vision"]
    assert (image["before"], image["after"]) == (codes.numel(), int(kept_token.sum()))
    assert image["kept"] == torch.nonzero(kept_token).flatten().tolist()


def unpad_cols(model, image_size) -> int:
    """Columns of the unpadded high-resolution view (tokens per row before its newline)."""
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    rows, cols = get_anyres_image_grid_shape(image_size.tolist(), config.image_grid_pinpoints, config.vision_config.image_size)
    return unpad_image(torch.zeros(1, rows * side, cols * side), image_size).shape[-1]


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_vit_signals_after_pixelprune_do_not_depend_on_the_batch(family):
    """ViT attention read over the kept units: the same alone as in a batch (CLIP pads images to the longest kept
    set; the probe leaves the padding out)."""
    model = model_for(family, "sdpa")
    batch, _ = with_pattern(model, inputs(model, unmixed_specs(family)), "duplicates")
    vtprune.wrap(model, Pipeline([PixelPrune(), IDPruner(keep=5, per_image=True, importance="received", lam=1.0)]))
    model(**batch)
    together = [[list(i["stages"].values())[-1]["kept"] for i in s["images"]] for s in vtprune.report(model).to_dict()["samples"]]
    for b in range(batch["input_ids"].shape[0]):
        model(**sample_alone(batch, b, family))
        alone = [list(i["stages"].values())[-1]["kept"] for i in vtprune.report(model).to_dict()["samples"][0]["images"]]
        assert alone == together[b]


@torch.no_grad()
def test_pixels_the_patch_embedding_never_sees_are_ignored():
    """SigLIP at 384 px and 14 px patches sees 27 x 27 patches: the last 6 pixel rows and columns are outside every
    patch, so they decide nothing (here 30 px at 4 px: 7 x 7 patches and 2 pixels unseen)."""
    model = model_for("llava_onevision", image_size=30)
    pixels = torch.zeros(1, 3, 30, 30)
    pixels[..., 28:, :] = torch.rand(3, 2, 30)
    pixels[..., :, 28:] = torch.rand(3, 30, 2)
    keep = adapter_for(model).unit_keep(pixels, None, 0.0)
    assert keep.shape == (1, 49) and keep.sum() == 1 and keep[0, 0]  # one flat grid of 7 x 7: its anchor only
    vtprune.wrap(model, "pixelprune")
    batch = inputs(model, [SampleSpec(images=((30, 30), (30, 30)))])  # two images: one base view each
    batch["pixel_values"][0, 0] = pixels[0]
    model(**batch)
    kept = vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]["vision"]
    assert (kept["before"], kept["after"]) == (49, 1)
