"""VisionZip: the budget split, grouping and merging, and a brute-force recomputation on the tiny models."""

from __future__ import annotations

import pytest
import torch
from helpers import QWEN, eager_vit_received, hooks_left, inputs, lm_input_embeds, model_for, visual_positions
from transformers.vision_utils import get_vision_window_index

import vtprune
from vtprune.patches import adapter_for
from vtprune.policies import VisionZip
from vtprune.policies.visionzip import contextual_groups, merge_groups
from vtprune.tiny import SampleSpec


@pytest.mark.parametrize(
    ("family", "keep", "n", "want"),
    [
        ("llava", 64, 576, (54, 10)),
        ("llava", 128, 576, (108, 20)),
        ("llava", 192, 576, (162, 30)),
        ("llava_next", 160, 2880, (135, 25)),
        ("llava_next", 320, 2880, (270, 50)),
        ("llava_next", 640, 2880, (540, 100)),
        ("qwen2_5_vl", 700, 1000, (650, 50)),  # the Qwen reference: int(0.65 N) + max(int(0.05 N), 1)
        ("qwen2_5_vl", 500, 1000, (450, 50)),
        ("qwen2_vl", 3, 24, (2, 1)),
        ("llava_onevision", 64, 7290, (54, 10)),  # the LLaVA split of a count budget (zoo: no OneVision reference)
    ],
)
def test_budget_split_follows_the_references(family, keep, n, want):
    policy = VisionZip(keep=keep).bind(adapter_for(model_for(family)))
    assert policy.split(keep, n) == want


def test_explicit_splits():
    adapter = adapter_for(model_for("llava"))
    for options, want in [
        ({"contextual": 5}, (59, 5)),
        ({"contextual": 0.5}, (32, 32)),
        ({"contextual": 0}, (64, 0)),
        ({"contextual": 64}, (0, 64)),  # more than keep is refused at construction (test_refusals)
        ({"contextual_fraction": 0.1}, (7, 57)),
    ]:
        policy = VisionZip(keep=64, **options).bind(adapter)
        assert policy.split(64, 576) == want, options


def test_groups_and_merges_known_answer():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # rows 0 and 3 are the targets (step 6 // 2 = 3); 1, 2 lean to e2, 4, 5 to e1
    keys = torch.stack([e1, e2 + 0.1 * e1, 2 * e2, e2, 3 * e1 + e2, e1 + 0.2 * e2])
    targets, group = contextual_groups(keys, 2)
    assert targets.tolist() == [0, 3] and group.tolist() == [0, 1, 1, 1, 0, 0]
    feats = torch.arange(12, dtype=torch.float32).view(6, 2)
    mean = merge_groups(feats, targets, group, "mean")
    torch.testing.assert_close(mean, torch.stack([feats[[0, 4, 5]].mean(0), feats[[3, 1, 2]].mean(0)]))
    reference = merge_groups(feats, targets, group, "reference")
    torch.testing.assert_close(reference, torch.stack([feats[0] + feats[[4, 5]].mean(0), feats[3] + feats[[1, 2]].mean(0)]))
    # a target nobody joins stays itself; equal similarity goes to the first target
    targets, group = contextual_groups(torch.stack([e1, e2, e1 + e2]), 2)
    assert targets.tolist() == [0, 1] and group.tolist() == [0, 1, 0]
    lone = merge_groups(torch.eye(3), torch.tensor([0, 2]), torch.tensor([0, 0, 1]), "reference")
    torch.testing.assert_close(lone[1], torch.eye(3)[2])


def _brute_visionzip(score, keys, feats, dominant_count, contextual_count, merge, cls=None):
    """VisionZip for one image with plain loops: kept indices -> fp64 value of each contextual token.

    With ``cls`` (the CLS feature), the CLS token is one of the dominant tokens (the LLaVA reference:
    CLS + d - 1 patches) and takes the slot of the first patch not otherwise kept.
    """
    n = score.numel()
    order = sorted(range(n), key=lambda j: (-float(score[j]), j))
    dominant = sorted(order[: dominant_count - (cls is not None)])
    rest = [j for j in range(n) if j not in dominant]
    step = max(1, len(rest) // contextual_count)
    targets = list(range(0, len(rest), step))[:contextual_count]
    keys = keys.double()
    unit = [k / k.norm() for k in keys]
    joined = {t: [] for t in targets}
    for r in range(len(rest)):
        if r in targets:
            continue
        sims = [float(unit[rest[r]] @ unit[rest[t]]) for t in targets]
        best = max(range(len(targets)), key=lambda a: (sims[a], -a))
        joined[targets[best]].append(rest[r])
    merged = {}
    for t in targets:
        target, others = feats[rest[t]].double(), [feats[j].double() for j in joined[t]]
        if merge == "reference":
            merged[rest[t]] = target + (sum(others) / len(others) if others else 0)
        else:
            merged[rest[t]] = (target + sum(others, torch.zeros_like(target))) / (1 + len(others))
    kept = dominant + [rest[t] for t in targets]
    if cls is not None:
        slot = min(j for j in range(n) if j not in kept)
        merged[slot] = cls.double()
        kept.append(slot)
    return sorted(kept), merged


def _pruned_embeds(model, batch):
    """What the first decoder layer receives: the pruned sequence (merged values written), sample 0."""
    seen = {}
    layer = model.model.language_model.layers[0]
    handle = layer.register_forward_pre_hook(
        lambda _m, args, kw: seen.update(h=args[0] if args else kw["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen["h"][0]


def _check_against_brute_force(model, batch, items, policy, dominant_count, contextual_count, project=None):
    """``items``: per image, (positions in the sequence, score, keys, features to merge, unwrapped embeddings[, CLS])."""
    vtprune.wrap(model, policy)
    pruned = _pruned_embeds(model, batch)
    images = vtprune.report(model).to_dict()["samples"][0]["images"]
    keep_mask = torch.ones(batch["input_ids"].shape[1], dtype=torch.bool)
    expected = []
    for (positions, score, keys, feats, embeds, *cls), image in zip(items, images, strict=True):
        kept, merged = _brute_visionzip(score, keys, feats, dominant_count, contextual_count, policy.merge, *cls)
        assert image["stages"]["vision"]["kept"] == kept
        keep_mask[positions] = False
        keep_mask[positions[kept]] = True
        for j in kept:
            if j in merged:
                value = merged[j].to(feats.dtype)
                want = project(value[None])[0] if project is not None else value
            else:
                want = embeds[j]
            expected.append((int(positions[j]), want))
    new_index = torch.cumsum(keep_mask.long(), 0) - 1
    for position, want in expected:
        torch.testing.assert_close(pruned[new_index[position]], want.to(pruned.dtype), rtol=1e-4, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("merge", ["reference", "mean"])
def test_llava_equals_brute_force_from_eager_cls_attention(merge):
    """CLS attention and keys of the feature layer from the eager ViT; ViT features merged, then projected."""
    model = model_for("llava", "eager")
    batch = inputs(model, [SampleSpec(images=((32, 32), (32, 32)), question=5)])
    tower = model.model.vision_tower
    layer = len(tower.encoder.layers) + model.config.vision_feature_layer  # 0-based; its output is the feature
    out = tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    attn_layer = tower.encoder.layers[layer]
    cls = out.attentions[layer][:, :, 0, 1:].sum(1)  # summed over heads, as the reference
    k = attn_layer.self_attn.k_proj(attn_layer.layer_norm1(out.hidden_states[layer]))
    keys = k.view(*k.shape[:2], attn_layer.self_attn.num_heads, -1).mean(2)[:, 1:]
    feats = out.hidden_states[layer + 1][:, 1:]  # the pre-projector features (CLS dropped)
    cls_feature = out.hidden_states[layer + 1][:, 0]  # the reference passes the CLS token on too
    embeds = lm_input_embeds(model, batch)[0]
    visual = visual_positions("llava", batch["input_ids"]).view(2, -1)
    project = model.model.multi_modal_projector
    items = [(visual[g], cls[g], keys[g], feats[g], embeds[visual[g]], cls_feature[g]) for g in range(2)]
    policy = VisionZip(keep=12, contextual=4, merge=merge)  # CLS + 7 dominant patches + 4 contextual, as the reference
    _check_against_brute_force(model, batch, items, policy, 8, 4, project=project)
    items = [item[:5] for item in items]
    _check_against_brute_force(
        model, batch, items, VisionZip(keep=12, contextual=4, merge=merge, cls_token=False), 8, 4, project=project
    )


@torch.no_grad()
@pytest.mark.parametrize("merge", ["reference", "mean"])
@pytest.mark.parametrize("family", QWEN)
def test_qwen_equals_brute_force_from_eager_weights(family, merge):
    """Attention received at the last block from its eager weights; rotated keys; merger outputs merged."""
    from importlib import import_module

    rotary = import_module(f"transformers.models.{family}.modeling_{family}").apply_rotary_pos_emb_vision
    model = model_for(family, "eager")
    batch = inputs(model, [SampleSpec(images=((32, 48), (48, 32)), videos=((4, 32, 32),), question=5)])
    received, seen = eager_vit_received(model, batch)
    last = len(model.model.visual.blocks) - 1
    block = model.model.visual.blocks[last]
    vision = model.config.vision_config
    per_item = []
    for call, key in enumerate(("image_grid_thw", "video_grid_thw")):
        hidden, kwargs = seen[last][call]
        x = block.norm1(hidden)
        q, k, _ = block.attn.qkv(x).reshape(x.shape[0], 3, block.attn.num_heads, -1).unbind(1)
        _, k = rotary(q, k, *kwargs["position_embeddings"])
        rows = torch.cat([received[last][call][:, None], k.float().mean(1)], dim=1).view(-1, 4, 1 + k.shape[-1]).mean(1)
        grid = batch[key]
        if getattr(vision, "window_size", None):  # Qwen2.5-VL's windows: merge units in window order
            window_index, _ = get_vision_window_index(grid, vision.spatial_merge_size, vision.window_size, vision.patch_size)
            rows = rows[torch.argsort(window_index)]
        per_item.extend(torch.split(rows, (grid.prod(-1) // 4).tolist()))
    embeds = lm_input_embeds(model, batch)[0]
    visual = visual_positions(family, batch["input_ids"])
    items, start = [], 0
    for rows in per_item:
        positions = visual[start : start + rows.shape[0]]
        start += rows.shape[0]
        items.append((positions, rows[:, 0], rows[:, 1:], embeds[positions], embeds[positions]))
    _check_against_brute_force(model, batch, items, VisionZip(keep=8, contextual=3, merge=merge), 5, 3)


@torch.no_grad()
def test_default_split_on_qwen_keeps_the_reference_counts():
    """int(0.65 N) + max(int(0.05 N), 1) at keep=0.7, as the Qwen2.5-VL reference; exact_keep=True: round(0.7 N)."""
    model = model_for("qwen2_5_vl", "sdpa")
    batch = inputs(model, [SampleSpec(images=((32, 48),), videos=((4, 32, 32),), question=5)])
    vtprune.wrap(model, VisionZip(keep=0.7))
    model(**batch)
    images = vtprune.report(model).to_dict()["samples"][0]["images"]
    want = [int(0.65 * i["tokens"]) + max(int(0.05 * i["tokens"]), 1) for i in images]
    assert [i["stages"]["vision"]["after"] for i in images] == want
    vtprune.wrap(model, VisionZip(keep=0.7, exact_keep=True))
    model(**batch)
    images = vtprune.report(model).to_dict()["samples"][0]["images"]
    assert [i["stages"]["vision"]["after"] for i in images] == [round(0.7 * i["tokens"]) for i in images]


def test_reference_counts_at_the_papers_sizes():
    """LLaVA: CLS + 53 + 10 = 64 of 576; Qwen: 178 of 256 at keep=0.7 (round(0.7 * 256) would be 179)."""
    from types import SimpleNamespace

    from vtprune.layout import SampleLayout
    from vtprune.patches.base import single_grid_image

    llava = VisionZip(keep=64).bind(adapter_for(model_for("llava")))
    assert llava.cls_token and llava.split(64, 576) == (54, 10)  # 54 dominant tokens: CLS + 53 patches
    qwen = VisionZip(keep=0.7).bind(adapter_for(model_for("qwen2_5_vl")))
    layout = SampleLayout([single_grid_image(0, torch.arange(256), 16, 16)], torch.arange(0), torch.ones(256).bool())
    ctx = SimpleNamespace(alive=[[torch.arange(256)]], layouts=[layout])
    assert qwen.image_budget(ctx, 0, 0) == 178 and qwen.split(178, 256) == (166, 12)


def test_bad_options_leave_the_model_untouched():
    model = model_for("qwen2_5_vl", "sdpa")
    for options, words in [
        ({"dominant_score": "cls"}, "CLS token"),
        ({"layer": 3}, r"layer=3 is outside this ViT's layers 1..2"),
        ({"contextual": 1.5}, "contextual must be"),
        ({"contextual": 2, "contextual_fraction": 0.1}, "not both"),
        ({"contextual_fraction": 0}, "contextual_fraction"),
        ({"merge": "sum"}, "merge must be"),
        ({"dominant_score": "norm"}, "dominant_score"),
    ]:
        with pytest.raises(ValueError, match=words):
            vtprune.wrap(model, "visionzip", keep=4, **options)
        assert not vtprune.is_wrapped(model) and not hooks_left(model)
