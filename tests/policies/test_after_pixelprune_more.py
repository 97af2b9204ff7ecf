"""PruneSID and Pooling after PixelPrune: they select (or pool) among the units the tower encoded.

Oracles: the same policy alone (no duplicate units: PixelPrune keeps the
whole grid, so the Pipeline must be the policy alone, bit for bit); a hand
computation written from each method's description on the signals
restricted to PixelPrune's kept units (PruneSID: the float64 NMS oracle of
test_leaders_vision_ops per view, on CLIP run by hand on CLS and the kept
patches for LLaVA-1.5; Pooling: each window's kept units averaged, standing
at the first of them); the signals read against the tower run by hand on the
kept units; each sample run alone; generate with the cache against
recomputing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import gen_kwargs, inputs, model_for, sample_alone, stages_of, unmixed_specs, visual_positions

import vtprune
from policies.test_after_pixelprune import assert_after_pixelprune_is_alone, spy
from policies.test_leaders_vision_ops import grouped_oracle, prunesid_oracle
from policies.test_pixelprune import hand_run_first_image, is_qwen, with_pattern
from policies.test_views_after_pixelprune import clip_signals_on_kept
from vtprune.ops.leaders import pca_groups, qwen_group_count, scored_groups
from vtprune.patches import supported_pixel_prune
from vtprune.policies import Pipeline, PixelPrune, Pooling, PruneSID, Random
from vtprune.policies.baselines import _window_grid
from vtprune.policies.vision_views import image_views, view_budgets
from vtprune.tiny import SampleSpec

FAMILIES = supported_pixel_prune()
OPTIONS = {
    "prunesid": [dict(), dict(keep=6, reference_budget=False), dict(keep=0.5)],
    "pooling": [dict(keep=6), dict(keep=0.5)],
}
CASES = [(name, o) for name, opts in OPTIONS.items() for o in opts]
IDS = [f"{name}-" + "-".join(f"{k}{v}" for k, v in o.items()) for name, o in CASES]


def make(name: str, **options):
    return PruneSID(**options) if name == "prunesid" else Pooling(**options)


# ----------------------------------------------------------------- no duplicates: the policy alone
@torch.no_grad()
@pytest.mark.parametrize("name,options", CASES, ids=IDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_no_duplicates_is_the_policy_alone(family, name, options):
    model = model_for(family, "sdpa")
    batch = inputs(model, unmixed_specs(family))  # random pixels: PixelPrune keeps every unit
    assert_after_pixelprune_is_alone(model, batch, make(name, **options))


# ----------------------------------------------------------------- duplicates: a hand computation on the kept units
def prunesid_reads(self, ctx, b, i):
    if self.variant == "qwen":
        views = image_views(ctx, b, i, None)[0] if ctx.layouts[b].images[i].kind == "video" else None
        return dict(features=ctx.features(b, i).float().cpu(), views=views)
    layer = self.layer - 1
    return dict(
        pre=ctx.pre_projector(b, i).float().cpu(),
        attention=ctx.vision_cls_attention(b, i, layer).float().cpu(),
        views=[v.cpu() for v in image_views(ctx, b, i, layer)[0]],  # grid indices of each view (crops, frames)
    )


def alive_of(views: list[torch.Tensor], alive: torch.Tensor) -> list[list[int]]:
    """Each view (grid indices) as indices into the alive tokens, the dropped ones left out (written with a dict)."""
    where = {int(g): j for j, g in enumerate(alive.tolist())}
    return [[where[int(g)] for g in v.tolist() if int(g) in where] for v in views]


def prunesid_budget_by_hand(policy, n_tokens: int, n_alive: int) -> int:
    """From the unpruned image's count: the llava variant ``keep`` (or round(f N)); the qwen reference
    ``max(round(N keep / 576), 16)`` (or ``max(round(N f), 16)``), N <= 16 keeping all; capped at the alive units."""
    keep = policy.keep
    if policy.variant == "qwen" and policy.reference_budget:
        t = (
            n_tokens
            if n_tokens <= 16
            else max(round(n_tokens * keep / 576) if isinstance(keep, int) else round(n_tokens * keep), 16)
        )
    else:
        t = keep if isinstance(keep, int) else round(keep * n_tokens)
    return max(1, min(t, n_alive))


def prunesid_qwen_by_hand(policy, r) -> list[int]:
    """The qwen variant over the alive tokens per view (a video's frames): groups of each partial view (one seeded
    call), NMS threshold max(18 t / n, 1) x the upper-triangle mean over that view's n alive tokens."""
    alive, k, feats = r["alive"], r["k"], r["features"]
    n = alive.numel()
    if k >= n:
        return alive.tolist()
    views = alive_of(r["views"], alive) if r["views"] is not None else [list(range(n))]
    budgets = view_budgets(k, [len(v) for v in views])
    partial = [(v, t) for v, t in zip(views, budgets) if 0 < t < len(v)]
    groups = iter(scored_groups([feats[v] for v, _ in partial], [qwen_group_count(t) for _, t in partial], policy.seed))
    kept: list[int] = []
    for v, t in zip(views, budgets):
        if t <= 0:
            continue
        if t >= len(v):
            kept += v
            continue
        group, score = next(groups)
        x = feats[v].double().numpy()
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        theta = max(18 * t / len(v), 1) * np.triu(sim).sum() / sim.size
        picks = grouped_oracle(
            sim, score.double().numpy(), group.tolist(), t, 5 * math.ceil(t / 64), 0, theta, lambda m, rank: m - rank
        )
        kept += [v[j] for j in picks]
    return sorted(alive[kept].tolist())


def prunesid_llava_by_hand(policy, r, pre=None, attention=None) -> list[int]:
    """The llava variant over the alive patches per view: ``t - 1`` patches by the NMS oracle, then the view's
    first alive patch not kept (the CLS slot); groups as the policy draws them (one call, batched when every partial
    view has the same size and budget)."""
    alive, k = r["alive"], r["k"]
    pre = r["pre"] if pre is None else pre
    attention = r["attention"] if attention is None else attention
    n = alive.numel()
    if k >= n:
        return alive.tolist()
    views = alive_of(r["views"], alive)
    budgets = view_budgets(k, [len(v) for v in views])
    partial = [(v, t) for v, t in zip(views, budgets) if 1 < t < len(v)]
    equal = len({(len(v), t) for v, t in partial}) == 1
    groups = iter(pca_groups([pre[v] for v, _ in partial], [int(t / 4) for _, t in partial], policy.seed, batched=equal))
    kept: list[int] = []
    for v, t in zip(views, budgets):
        if t <= 0:
            continue
        if t >= len(v):
            kept += v
            continue
        picks = [v[j] for j in prunesid_oracle(pre[v], attention[v], t, next(groups))] if t > 1 else []
        kept += picks + [min(j for j in v if j not in picks)]
    return sorted(alive[kept].tolist())


def pooling_reads(self, ctx, b, i):
    return dict(features=ctx.features(b, i).float().cpu())


def pooling_by_hand(r) -> tuple[list[int], torch.Tensor]:
    """Windows over the whole grid (budget split over the sub-grids by size); each window's alive members
    averaged, the row at its first alive member; windows with no alive member gone. (kept grid indices, rows)."""
    from vtprune.budget import split_budget

    alive, k, image, feats = r["alive"].tolist(), r["k"], r["image"], r["features"]
    where = {g: j for j, g in enumerate(alive)}
    out = []
    for grid, kg in zip(image.grids, split_budget([g.size for g in image.grids], k)):
        if kg == 0:
            continue
        for r0, r1, c0, c1 in _window_grid(grid.height, grid.width, kg):
            members = [
                grid.offset + row * grid.width + col
                for row in range(r0, r1)
                for col in range(c0, c1)
                if grid.offset + row * grid.width + col in where
            ]
            if members:
                out.append((min(members), feats[[where[g] for g in members]].double().mean(0)))
    out.sort(key=lambda x: x[0])
    return [g for g, _ in out], torch.stack([row for _, row in out]).float()


@torch.no_grad()
@pytest.mark.parametrize("pattern", ["duplicates", "flat"])
@pytest.mark.parametrize("name,options", CASES, ids=IDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_set_is_a_hand_computation_among_the_kept_units(monkeypatch, family, name, options, pattern):
    model = model_for(family, "sdpa")
    batch, dropped = with_pattern(model, inputs(model, unmixed_specs(family)), pattern)
    cls, reads = (PruneSID, prunesid_reads) if name == "prunesid" else (Pooling, pooling_reads)
    records = spy(monkeypatch, cls, reads)
    vtprune.wrap(model, Pipeline([PixelPrune(), make(name, **options)]))
    model(**batch)
    stages = stages_of(model)
    assert sorted(records) == [(b, i) for b, s in enumerate(stages) for i in range(len(s))]  # every image selected
    assert stages[0][0][0] == [u for u in range(len(stages[0][0][0]) + len(dropped)) if u not in dropped]
    for (b, i), r in records.items():
        pixel, got = stages[b][i]
        assert r["alive"].tolist() == pixel  # the policy chose among PixelPrune's units
        assert set(got) <= set(pixel)
        n_tokens = r["image"].num_tokens
        if name == "prunesid":
            assert r["k"] == prunesid_budget_by_hand(r["policy"], n_tokens, len(pixel))
            assert len(got) == r["k"]  # the budget, exactly (the llava variant's CLS slot included)
            by_hand = prunesid_qwen_by_hand if r["policy"].variant == "qwen" else prunesid_llava_by_hand
            assert got == by_hand(r["policy"], r)
        else:
            keep = options["keep"]
            assert r["k"] == min(keep if isinstance(keep, int) else round(keep * n_tokens), len(pixel))
            want, rows = pooling_by_hand(r)
            assert got == want and len(got) <= r["k"]
            torch.testing.assert_close(r["sel"].values.float().cpu(), rows, rtol=1e-5, atol=1e-6)
    first = records[(0, 0)]
    if pattern == "duplicates" and (is_qwen(model) or family == "llava"):  # the rows read: the tower run by hand
        keep = torch.ones(first["image"].num_tokens, dtype=torch.bool)
        keep[dropped] = False
        want = hand_run_first_image(model, batch, keep).float()
        if name == "pooling" or first["policy"].variant == "qwen":
            torch.testing.assert_close(first["features"], want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("k", (5, 9, 16))
def test_prunesid_llava_equals_the_oracle_on_clip_run_by_hand(k):
    """LLaVA-1.5: the signals from CLIP run by hand on CLS and the kept patches (not through vtprune's probe)."""
    model = model_for("llava", "eager")
    batch = inputs(model, [SampleSpec(images=((32, 32), (32, 32)), question=5)])
    batch, dropped = with_pattern(model, batch, "duplicates")
    seen = {}

    def grab(module, args, kwargs):  # the sequence entering decoder layer 0: pruned
        seen["embeds"] = (args[0] if args else kwargs["hidden_states"]).clone()

    vtprune.wrap(model, Pipeline([PixelPrune(), PruneSID(keep=k, seed=3)]))
    handle = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**batch)
    finally:
        handle.remove()
    got = stages_of(model)[0]
    for g in range(2):
        pix, kept = got[g]
        if g == 0:
            assert [u for u in range(pix[-1] + 1) if u not in pix] == dropped
        hidden, cls_sum, _ = clip_signals_on_kept(model, batch["pixel_values"][g], pix)
        group = pca_groups([hidden], int(k / 4), seed=3)[0]
        want = prunesid_oracle(hidden, cls_sum, k, group)
        slot = min(set(range(len(pix))) - set(want))  # the CLS slot: the first kept unit not chosen
        assert kept == sorted(pix[j] for j in want + [slot]) and len(kept) == k
        if g == 0:  # what the language model gets: the projected rows, the CLS feature in the slot
            rows = [hidden[j] for j in sorted(want + [slot])]
            rows[sorted(want + [slot]).index(slot)] = clip_cls_on_kept(model, batch["pixel_values"][0], pix)
            projected = model.model.multi_modal_projector(torch.stack(rows).to(model.dtype)).float()
            start = int(visual_positions("llava", batch["input_ids"])[0])
            torch.testing.assert_close(seen["embeds"][0, start : start + k].float(), projected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def clip_cls_on_kept(model, pixel_values, kept: list[int]) -> torch.Tensor:
    """The CLS row of the feature layer's output, CLIP run by hand on CLS and the ``kept`` patches of one image."""
    tower = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    index = torch.tensor([0] + [j + 1 for j in kept])
    h = tower.pre_layrnorm(tower.embeddings(pixel_values[None])[:, index])
    for block in tower.encoder.layers[: len(tower.encoder.layers) + model.config.vision_feature_layer + 1]:
        h = block(h, None)
    return h[0, 0].float()


@torch.no_grad()
def test_llava_next_every_crop_with_a_dropped_unit(monkeypatch):
    """A 2 x 2 LLaVA-NeXT image whose five crops all lose a unit (the tower call is padded to fewer than a whole
    crop): PruneSID's views are the base view and the four quadrants (written from the layout), each holding its
    kept units, and its keep set is the hand computation over them; SCOPE's views (the same crop reading) keep
    their shares."""
    from policies.test_pixelprune import crop_patches, put_patches
    from vtprune.policies import Scope

    model = model_for("llava_next", "eager")
    side = model.config.vision_config.image_size
    grid = side // model.config.vision_config.patch_size
    batch = inputs(model, [SampleSpec(images=((2 * side, 2 * side),), question=5)])
    pv = batch["pixel_values"].clone()
    for crop in range(pv.shape[1]):  # patch 1 of every crop copies patch 0: PixelPrune drops it
        patches = crop_patches(pv[0, crop], model.config.vision_config.patch_size)
        patches[1] = patches[0]
        put_patches(pv[0, crop], patches)
    batch["pixel_values"] = pv
    base = grid * grid
    hires = torch.arange(4 * base).view(2 * grid, 2 * grid) + base
    regions = [torch.arange(base)] + [
        hires[r * grid : (r + 1) * grid, c * grid : (c + 1) * grid].flatten() for r in range(2) for c in range(2)
    ]
    dropped = sorted(int(region[1]) for region in regions)
    records = spy(monkeypatch, PruneSID, prunesid_reads)
    vtprune.wrap(model, Pipeline([PixelPrune(), PruneSID(keep=12)]))
    model(**batch)
    ((pixel, got),) = stages_of(model)[0]
    assert pixel == [u for u in range(5 * base) if u not in dropped]
    r = records[(0, 0)]
    assert [v.tolist() for v in r["views"]] == [v.tolist() for v in regions]
    assert got == prunesid_llava_by_hand(r["policy"], r) and len(got) == 12
    vtprune.unwrap(model)
    vtprune.wrap(model, Pipeline([PixelPrune(), Scope(keep=12)]))
    model(**batch)
    ((_, scope),) = stages_of(model)[0]
    shares = view_budgets(12, [base - 1] * 5)
    assert [sum(int(g) in region.tolist() for g in scope) for region in regions] == shares


VIDEO_FAMILIES = [f for f in FAMILIES if f.startswith("qwen")]


@torch.no_grad()
@pytest.mark.parametrize("name", ["prunesid", "pooling"])
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_frames_with_holes(monkeypatch, family, name):
    """A Qwen video whose second frame repeats its first unit twice: PruneSID's views (the frames) and Pooling's
    sub-grids hold their kept units, and the result is the hand computation over them."""
    model = model_for(family, "sdpa")
    batch = dict(inputs(model, unmixed_specs(family)))
    t, h, w = batch["video_grid_thw"][0].tolist()
    assert t >= 2
    units = batch["pixel_values_videos"].clone().view(-1, 4, batch["pixel_values_videos"].shape[-1])
    second = h * w // 4  # the first unit of frame 1
    units[second + 1] = units[second]
    units[second + 2] = units[second]
    batch["pixel_values_videos"] = units.view_as(batch["pixel_values_videos"])
    cls, reads = (PruneSID, prunesid_reads) if name == "prunesid" else (Pooling, pooling_reads)
    records = spy(monkeypatch, cls, reads)
    vtprune.wrap(model, Pipeline([PixelPrune(), make(name, keep=8 if name == "pooling" else 64)]))
    model(**batch)
    stages = stages_of(model)
    (b, i), r = next((key, r) for key, r in records.items() if r["image"].kind == "video")
    pixel, got = stages[b][i]
    assert pixel == [u for u in range(r["image"].num_tokens) if u not in (second + 1, second + 2)]
    assert r["alive"].tolist() == pixel and set(got) <= set(pixel)
    if name == "prunesid":
        assert r["k"] == 16 and len(got) == 16  # max(round(32 x 64 / 576), 16) of the unpruned 32
        assert got == prunesid_qwen_by_hand(r["policy"], r)
    else:
        want, rows = pooling_by_hand(r)
        assert got == want
        torch.testing.assert_close(r["sel"].values.float().cpu(), rows, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- batch == alone, cache == recomputation
@torch.no_grad()
@pytest.mark.parametrize("name,options", [CASES[0], CASES[1], CASES[3]], ids=[IDS[0], IDS[1], IDS[3]])
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_alone_and_cache_equals_recomputation(family, name, options):
    model = model_for(family, "sdpa")
    batch, _ = with_pattern(model, inputs(model, unmixed_specs(family)), "duplicates")
    vtprune.wrap(model, Pipeline([PixelPrune(), make(name, **options)]))
    together = model(**batch).logits[:, -1]
    assert torch.isfinite(together).all()
    kept = stages_of(model)
    for b in range(batch["input_ids"].shape[0]):
        alone = model(**sample_alone(batch, b, family)).logits[:, -1]
        assert stages_of(model)[0] == kept[b]
        torch.testing.assert_close(alone[0], together[b], rtol=1e-4, atol=1e-5)
    kw = gen_kwargs(3)
    assert torch.equal(model.generate(**batch, **kw), model.generate(**batch, use_cache=False, **kw))


# ----------------------------------------------------------------- the Pipeline's order rule
def test_only_pixelprune_may_come_before():
    Pipeline([PixelPrune(), PruneSID(keep=8)])
    Pipeline([PixelPrune(), Pooling(keep=8)])
    for second in (PruneSID(keep=8), Pooling(keep=8)):
        with pytest.raises(ValueError, match="put it first in a Pipeline or right after pixelprune"):
            Pipeline([Random(keep=16, where="vision"), second])
        with pytest.raises(ValueError, match="put it first in a Pipeline or right after pixelprune"):
            Pipeline([PixelPrune(), Random(keep=16, where="vision"), second])
