"""``vit_layer=k``: selection inside the vision encoder after its k-th block, the rest of the tower on the kept tokens.

Oracles: the vision tower run by hand (the unwrapped model's blocks up to k,
then each image / attention segment of the kept rows alone through the
remaining blocks and the merger), the same policy selecting after the
encoder from the same layer's signals, and each sample run alone.
"""

from __future__ import annotations

import pytest
import torch
from helpers import inputs, mixed_specs, model_for, sample_alone

import vtprune
from vtprune.checks import BadType, BadValue
from vtprune.patches import adapter_for, supported_vit_prune
from vtprune.policies import Fixed, Pipeline, Random

FAMILIES = supported_vit_prune()
QWEN_TOWERS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
DEPTH = 4  # ViT blocks of the test models: vit_layer 1..2 (CLIP's feature is layer 3) or 1..3 (Qwen)


def deep_model(family: str, attn: str = "sdpa"):
    return model_for(family, attn, vision_layers=DEPTH)


def kept_of(model) -> list[list[list[int]]]:
    return [[img["stages"]["vision"]["kept"] for img in s["images"]] for s in vtprune.report(model).to_dict()["samples"]]


def tower_output(model, batch):
    """The vision tower's outputs in one call of the model (a forward hook on the tower module)."""
    outs = []
    handle = adapter_for(model).vision_tower().register_forward_hook(lambda _m, _a, out: outs.append(out))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return outs


def block_calls(model, batch):
    """Per ViT block: (input hidden, kwargs) of each call, from the unwrapped model."""
    blocks = adapter_for(model).vision_layers()
    seen = {j: [] for j in range(len(blocks))}
    handles = [
        b.register_forward_pre_hook(lambda _m, a, kw, j=j: seen[j].append((a, dict(kw))), with_kwargs=True)
        for j, b in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def random_fixed_sets(batch_sizes: list[list[int]], seed: int = 0) -> list[list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    return [[sorted(torch.randperm(n, generator=gen)[: max(1, n // 3)].tolist()) for n in sizes] for sizes in batch_sizes]


def token_counts(model, batch) -> list[list[int]]:
    vtprune.wrap(model, "random", keep=1.0)
    with torch.no_grad():
        model(**batch)
    counts = [[img["tokens"] for img in s["images"]] for s in vtprune.report(model).to_dict()["samples"]]
    vtprune.unwrap(model)
    return counts


# ----------------------------------------------------------------- CLIP (LLaVA-1.5)
@torch.no_grad()
@pytest.mark.parametrize("at", [1, 2])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_clip_tower_equals_hand_run_on_kept_rows(at, attn):
    model = deep_model("llava", attn)
    batch = inputs(model, mixed_specs("llava"))
    calls = block_calls(model, batch)
    sets = random_fixed_sets(token_counts(model, batch))
    vtprune.wrap(model, Fixed(kept=sets, vit_layer=at))
    (out,) = tower_output(model, batch)
    assert kept_of(model) == sets
    layers = adapter_for(model).vision_layers()
    feature = adapter_for(model).feature_vision_layer  # hidden_states[feature]: the output of layer feature - 1
    entering = calls[at][0][0][0]  # the input of layer `at`, every patch: (images, 1 + P, D)
    images = [k for s in sets for k in s]
    assert len(images) == entering.shape[0]
    for g, kept in enumerate(images):
        rows = torch.tensor([0] + [k + 1 for k in kept])
        h = entering[g : g + 1, rows]
        for j in range(at, feature):
            h = layers[j](h, None)
        got = out.hidden_states[feature][g]
        torch.testing.assert_close(got[rows], h[0], rtol=1e-5, atol=1e-5)
        dropped = torch.ones(got.shape[0], dtype=torch.bool)
        dropped[rows] = False
        assert not got[dropped].any()  # dropped patches come back as zeros


# ----------------------------------------------------------------- the Qwen ViTs
@torch.no_grad()
@pytest.mark.parametrize("family", QWEN_TOWERS)
@pytest.mark.parametrize("at", [1, 2])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_qwen_tower_equals_hand_run_on_kept_rows(family, at, attn):
    """From block `at` on, each attention segment of the full run (image/frame, Qwen2.5-VL's windows) restricted to
    its kept units goes through each block alone; the merger (and DeepStack taps) then see those rows."""
    model = deep_model(family, attn)
    batch = inputs(model, mixed_specs(family))
    # the samples with images (0 and 1): one tower call
    batch = {
        k: (v[:2] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
        for k, v in batch.items()
        if "video" not in k
    }
    calls = block_calls(model, batch)
    sets = random_fixed_sets(token_counts(model, batch), seed=at)
    vtprune.wrap(model, Fixed(kept=sets, vit_layer=at))
    (out,) = tower_output(model, batch)
    assert kept_of(model) == sets
    adapter = adapter_for(model)
    tower, unit = adapter.vision_tower(), adapter.merge**2
    grid = batch["image_grid_thw"]
    order = adapter.merger_order(grid)  # Qwen2.5-VL: the raster unit at each position of the window order
    n_units = int((grid.prod(-1) // unit).sum())
    order = torch.arange(n_units) if order is None else order
    keep = torch.zeros(n_units, dtype=torch.bool)
    sizes = (grid.prod(-1) // unit).tolist()
    for g, kept in enumerate([k for s in sets for k in s]):
        keep[sum(sizes[:g]) + torch.tensor(kept)] = True
    row_kept = keep[order].repeat_interleave(unit)  # per row of the tower's order
    h, kw = calls[at][0][0][0].clone(), calls[at][0][1]
    cos, sin = kw["position_embeddings"]
    taps = list(getattr(tower, "deepstack_visual_indexes", []))
    want_taps = {}
    for j in range(at, len(tower.blocks)):
        cu = calls[j][0][1]["cu_seqlens"].tolist()  # the segments this block attends within, in the full run
        new = h.clone()
        for a, b in zip(cu[:-1], cu[1:]):
            rows = torch.arange(a, b)[row_kept[a:b]]
            if rows.numel():
                new[rows] = tower.blocks[j](
                    h[rows],
                    cu_seqlens=torch.tensor([0, rows.numel()], dtype=torch.int32),
                    position_embeddings=(cos[rows], sin[rows]),
                )
        h = new
        if j in taps:
            want_taps[j] = tower.deepstack_merger_list[taps.index(j)](h[row_kept])
    merged = tower.merger(h[row_kept])  # kept units in the tower's order
    raster = order[keep[order]]  # their raster unit indices
    pooled = out.pooler_output  # get_image_features splits it per image after the tower returned
    pooled = torch.cat(pooled) if isinstance(pooled, (tuple, list)) else pooled
    torch.testing.assert_close(pooled[raster], merged, rtol=1e-5, atol=1e-5)
    dropped = torch.ones(n_units, dtype=torch.bool)
    dropped[raster] = False
    assert not pooled[dropped].any()
    for j, want in want_taps.items():
        tap = out.deepstack_features[taps.index(j)]
        tap = torch.cat(tap) if isinstance(tap, (tuple, list)) else tap
        torch.testing.assert_close(tap[raster], want, rtol=1e-5, atol=1e-5)
        assert not tap[dropped].any()


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava_onevision"])
def test_fixed_keep_sets_of_images_and_videos_in_one_batch(family):
    """Images and videos run through the tower in separate calls: each call applies its own media's lists."""
    if family not in FAMILIES:
        pytest.skip(f"{family}: vit_layer not built")
    model = deep_model(family)
    batch = inputs(model, mixed_specs(family))
    sets = random_fixed_sets(token_counts(model, batch), seed=3)
    vtprune.wrap(model, Fixed(kept=sets, vit_layer=1))
    model(**batch)
    assert kept_of(model) == sets
    kinds = {img["kind"] for s in vtprune.report(model).to_dict()["samples"] for img in s["images"]}
    assert kinds == {"image", "video"}


# ----------------------------------------------------------------- the selection: the same as after the encoder
SAME_SIGNALS = [
    ("random", dict(keep=5), dict(keep=5, where="vision")),
    ("hiprune", dict(keep=6, object_layer=1), dict(keep=6, object_layer=1, deep_layer="k")),
    ("visionzip", dict(keep=6, contextual=0), dict(keep=6, contextual=0, layer="k", cls_token=False)),
]


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,inside,after", SAME_SIGNALS, ids=[s[0] for s in SAME_SIGNALS])
def test_keep_sets_equal_the_same_signals_read_after_the_encoder(family, name, inside, after):
    """Blocks up to k run on every token in both, so a selection from layer-k signals is the same inside the encoder
    as after it (the runtime builds layouts, attention and keys inside the tower the way the vision stage does)."""
    model = deep_model(family)
    batch = inputs(model, mixed_specs(family))
    k = 2
    vtprune.wrap(model, name, vit_layer=k, **inside)
    model(**batch)
    got = kept_of(model)
    vtprune.unwrap(model)
    vtprune.wrap(model, name, **{key: (k if v == "k" else v) for key, v in after.items()})
    model(**batch)
    assert got == kept_of(model)


# ----------------------------------------------------------------- batch == alone
VIT_POLICIES = [
    ("random", dict(keep=4)),
    ("hiprune", dict(keep=5, object_layer=1)),
    ("visionzip", dict(keep=6)),
    ("scope", dict(keep=5)),
    ("vispruner", dict(keep=5)),
]


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,options", VIT_POLICIES, ids=[p[0] for p in VIT_POLICIES])
def test_batch_equals_alone(family, name, options):
    model = deep_model(family)
    batch = inputs(model, mixed_specs(family))
    vtprune.wrap(model, name, vit_layer=1, **options)
    together = model(**batch).logits[:, -1]
    assert torch.isfinite(together).all()
    kept = kept_of(model)
    budget = options["keep"]
    assert all(len(img) == budget for s in kept for img in s)
    for b in range(batch["input_ids"].shape[0]):
        alone = model(**sample_alone(batch, b, family)).logits[:, -1]
        assert kept_of(model)[0] == kept[b]
        torch.testing.assert_close(alone[0], together[b], rtol=1e-4, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_generate_with_cache_equals_recomputation(family):
    model = deep_model(family)
    batch = inputs(model, mixed_specs(family))
    vtprune.wrap(model, "hiprune", keep=5, object_layer=1, vit_layer=2)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**batch, **kw), model.generate(**batch, use_cache=False, **kw))


@torch.no_grad()
def test_default_is_todays_behaviour():
    """vit_layer=None: the tower runs whole and the logits equal the policy's without the option."""
    model = deep_model("qwen2_5_vl")
    batch = inputs(model, mixed_specs("qwen2_5_vl"))
    vtprune.wrap(model, "hiprune", keep=5, object_layer=1)
    want = model(**batch).logits
    vtprune.unwrap(model)
    vtprune.wrap(model, "hiprune", keep=5, object_layer=1, vit_layer=None)
    assert torch.equal(model(**batch).logits, want)


# ----------------------------------------------------------------- refusals
def test_bad_vit_layer_refused():
    model = deep_model("llava")
    feature = adapter_for(model).feature_vision_layer
    for bad in (0, -1):
        with pytest.raises(BadValue, match="vit_layer"):
            Random(keep=4, vit_layer=bad)
    with pytest.raises(BadType, match="vit_layer"):
        Random(keep=4, vit_layer="2")
    with pytest.raises(BadValue, match=rf"vit_layer={feature} is outside 1..{feature - 1}"):
        vtprune.wrap(model, "random", keep=4, vit_layer=feature)
    with pytest.raises(BadValue, match="cannot be combined with at_layer"):
        Random(keep=4, vit_layer=1, at_layer=2)
    with pytest.raises(BadValue, match="where='projector'"):
        Random(keep=4, vit_layer=1, where="projector")
    with pytest.raises(BadValue, match="deep_layer=3 is read after the selection at vit_layer=1"):
        vtprune.wrap(model, "hiprune", keep=4, object_layer=1, deep_layer=3, vit_layer=1)
    with pytest.raises(BadValue, match="only one policy of a Pipeline can prune inside"):
        vtprune.wrap(model, Pipeline([Random(keep=8, vit_layer=1), Random(keep=4, vit_layer=2)]))
    next_model = model_for("llava_next", vision_layers=DEPTH)
    with pytest.raises(BadValue, match="not yet for llava_next"):
        vtprune.wrap(next_model, "random", keep=4, vit_layer=1)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_vl"])
def test_later_policy_reads_the_vit_as_it_ran(family):
    """A later policy reading ViT attention past k (IDPruner's received importance at the feature layer) gets
    per-token values at full length, so its keep set is a subset of the encoder's and batch == alone holds."""
    from vtprune.policies import IDPruner

    model = deep_model(family)
    batch = inputs(model, mixed_specs(family))
    vtprune.wrap(model, Pipeline([Random(keep=8, vit_layer=1), IDPruner(keep=4, per_image=True, importance="received")]))
    together = model(**batch).logits[:, -1]
    report = vtprune.report(model).to_dict()["samples"]
    for s in report:
        for img in s["images"]:
            first, then = img["stages"]["vision"], list(img["stages"].values())[-1]
            assert first["after"] == 8 and then["after"] == 4 and set(then["kept"]) <= set(first["kept"])
    for b in range(batch["input_ids"].shape[0]):
        alone = model(**sample_alone(batch, b, family)).logits[:, -1]
        torch.testing.assert_close(alone[0], together[b], rtol=1e-4, atol=1e-5)
