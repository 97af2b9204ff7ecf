"""SCOPE, VisPruner and PruneSID on the tiny models: keep sets against oracles fed with the unwrapped model's tensors.

The signals come from the unwrapped eager ViT (``output_attentions``,
``output_hidden_states``), never from vtprune's probe; the oracles are the
brute-force loops of test_leaders_vision_ops.
"""

from __future__ import annotations

import pytest
import torch
from helpers import inputs, model_for, visual_positions

import vtprune
from policies.test_leaders_vision_ops import prunesid_oracle, scope_oracle, vispruner_oracle
from vtprune.ops.leaders import pca_groups
from vtprune.policies import PruneSID, Scope, VisPruner
from vtprune.policies.vision_views import view_budgets
from vtprune.tiny import SampleSpec


def test_view_budgets():
    assert view_budgets(64, [576, 576, 576, 576, 576]) == [16, 12, 12, 12, 12]
    assert view_budgets(160, [576] * 5) == [32] * 5
    assert view_budgets(10, [2, 100, 3]) == [2, 5, 3]  # the base view's surplus passes on, base first
    assert view_budgets(10, [100, 1, 1]) == [8, 1, 1]  # small crops' surplus returns to the base view
    assert view_budgets(7, [3, 2]) == [3, 2] and view_budgets(0, [4, 4]) == [0, 0]


@torch.no_grad()
def _llava_signals(model, batch):
    tower = model.model.vision_tower
    layer = len(tower.encoder.layers) + model.config.vision_feature_layer  # 0-based; its output is the feature
    out = tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    cls_sum = out.attentions[layer][:, :, 0, 1:].float().sum(1)  # CLS row, summed over heads
    hidden = out.hidden_states[layer + 1].float()  # that layer's output, CLS first
    return hidden, cls_sum, out.attentions[layer][:, :, 0, 1:].float().mean(1)


def _kept(model, policy, batch):
    vtprune.wrap(model, policy)
    try:
        model(**batch)
        return [i["stages"]["vision"]["kept"] for i in vtprune.report(model).to_dict()["samples"][0]["images"]]
    finally:
        vtprune.unwrap(model)


@torch.no_grad()
@pytest.mark.parametrize("k", (5, 16))
def test_scope_and_vispruner_equal_the_oracles_on_the_unwrapped_llava(k):
    model = model_for("llava", "eager")
    batch = inputs(model, [SampleSpec(images=((32, 32), (32, 32)), question=5)])
    hidden, cls_sum, cls_mean = _llava_signals(model, batch)
    scope = _kept(model, Scope(keep=k), batch)
    vis = _kept(model, VisPruner(keep=k), batch)
    vis75 = _kept(model, VisPruner(keep=k, important_ratio=0.75), batch)
    for g in range(2):
        assert scope[g] == scope_oracle(hidden[g, 1:], cls_sum[g], k)
        assert vis[g] == vispruner_oracle(hidden[g, 1:], cls_mean[g], k, 0.5)
        assert vis75[g] == vispruner_oracle(hidden[g, 1:], cls_mean[g], k, 0.75)


@torch.no_grad()
@pytest.mark.parametrize("k", (5, 16))
def test_prunesid_equals_the_oracle_on_the_unwrapped_llava(k):
    """keep counts the CLS slot: k - 1 patches by the oracle, plus the first patch not kept (the CLS feature's slot)."""
    model = model_for("llava", "eager")
    batch = inputs(model, [SampleSpec(images=((32, 32), (32, 32)), question=5)])
    hidden, cls_sum, _ = _llava_signals(model, batch)
    state = torch.get_rng_state()
    kept = _kept(model, PruneSID(keep=k, seed=3), batch)
    assert torch.equal(torch.get_rng_state(), state)  # the user's RNG stream is untouched
    for g in range(2):
        patches = hidden[g, 1:]
        group = pca_groups([patches], int(k / 4), seed=3)[0]
        want = prunesid_oracle(patches, cls_sum[g], k, group)
        slot = min(set(range(patches.shape[0])) - set(want))
        assert kept[g] == sorted(want + [slot]) and len(kept[g]) == k


@torch.no_grad()
def test_prunesid_cls_slot_carries_the_projected_cls_feature():
    model = model_for("llava", "eager")
    batch = inputs(model, [SampleSpec(images=((32, 32),), question=5)])
    hidden, _, _ = _llava_signals(model, batch)
    seen = {}

    def grab(module, args, kwargs):  # the sequence entering decoder layer 0: pruned
        seen["embeds"] = (args[0] if args else kwargs["hidden_states"]).clone()

    kept = _kept(model, PruneSID(keep=6), batch)[0]
    vtprune.wrap(model, PruneSID(keep=6))
    handle = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**batch)
    finally:
        handle.remove()
        vtprune.unwrap(model)
    cls = model.model.multi_modal_projector(hidden[0, :1].to(model.dtype))[0]
    full = model.model.get_image_features(pixel_values=batch["pixel_values"])
    full = (full.pooler_output if hasattr(full, "pooler_output") else full)[0]
    start = int(visual_positions("llava", batch["input_ids"])[0])
    rows = seen["embeds"][0, start : start + 6]  # the kept tokens, compacted in ascending order
    matches_cls = [torch.allclose(r, cls, atol=1e-5) for r in rows]
    assert sum(matches_cls) == 1
    patches = [p for p, m in zip(kept, matches_cls) if not m]
    torch.testing.assert_close(rows[[not m for m in matches_cls]], full[patches])


@torch.no_grad()
def test_llava_next_views_are_the_crops_and_vispruner_selects_in_each():
    """A 2 x 2 grid with nothing to unpad: views = base + the four quadrants; each crop's picks from its own CLS row."""
    model = model_for("llava_next", "eager")
    side = model.config.vision_config.image_size
    batch = inputs(model, [SampleSpec(images=((2 * side, 2 * side),), question=5)])
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    tower = model.model.vision_tower
    layer = len(tower.encoder.layers) + model.config.vision_feature_layer
    out = tower(batch["pixel_values"][0], output_attentions=True, output_hidden_states=True)  # (5 crops, ...)
    hidden = out.hidden_states[layer + 1].float()[:, 1:]
    cls_mean = out.attentions[layer][:, :, 0, 1:].float().mean(1)
    k = 5 * 4 + 2  # 6 for the base view (remainder), 4 per crop
    kept = _kept(model, VisPruner(keep=k), batch)[0]
    assert len(kept) == k
    base = grid * grid
    hires = torch.arange(4 * grid * grid).view(2 * grid, 2 * grid) + base
    regions = [torch.arange(base)] + [
        hires[r * grid : (r + 1) * grid, c * grid : (c + 1) * grid].flatten() for r in range(2) for c in range(2)
    ]
    want = []
    for crop, (region, budget) in enumerate(zip(regions, view_budgets(k, [r.numel() for r in regions]))):
        picks = vispruner_oracle(hidden[crop], cls_mean[crop], budget, 0.5)
        want += region[picks].tolist()
    assert kept == sorted(want)


@torch.no_grad()
def test_prunesid_qwen_variant_equals_the_oracle_on_the_merger_output():
    """Qwen2-VL: t = max(round(M keep / 576), 16) of the image's M merged tokens, chosen from the merger output."""
    import math

    import numpy as np

    from policies.test_leaders_vision_ops import grouped_oracle
    from vtprune.ops.leaders import prunesid_qwen_budget, qwen_groups

    model = model_for("qwen2_vl", "sdpa")
    batch = inputs(model, [SampleSpec(images=((64, 64),), question=5)])
    out = model.model.get_image_features(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    feats = (feats[0] if isinstance(feats, (list, tuple)) else feats).float()
    m = feats.shape[0]
    t = prunesid_qwen_budget(m, 192)
    assert 16 <= t < m
    kept = _kept(model, PruneSID(keep=192), batch)[0]
    group, score = qwen_groups(feats, max(int(t / 4), 4), seed=0)
    v = feats.double().numpy()
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    sim = v @ v.T
    theta = max(18 * t / m, 1) * np.triu(sim).sum() / sim.size
    want = grouped_oracle(
        sim, score.double().numpy(), group.tolist(), t, 5 * math.ceil(t / 64), 0, theta, lambda n, rank: n - rank
    )
    assert kept == want and len(kept) == t
