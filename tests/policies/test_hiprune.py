"""HiPrune and the ViT attention probe."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import QWEN, eager_vit_received, gen_kwargs, hooks_left, inputs, mixed_specs, model_for, sample_alone
from transformers.vision_utils import get_vision_window_index

import vtprune
from vtprune.context import StageContext
from vtprune.layout import SampleLayout
from vtprune.patches.attention import packed_vit_attention_received, vit_attention_received
from vtprune.patches.base import single_grid_image
from vtprune.policies import HiPrune


@torch.no_grad()
def test_vit_probe_equals_eager_attention_column_sums():
    model = model_for("llava", "eager")
    pixels = inputs(model, mixed_specs("llava"))["pixel_values"]
    layer = model.model.vision_tower.encoder.layers[1]
    seen = {}
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.update(h=args[0]))
    out = model.model.vision_tower(pixels, output_attentions=True)
    handle.remove()
    want = out.attentions[1].sum(dim=2).mean(dim=1)  # (images, T): received, summed over queries, mean over heads
    torch.testing.assert_close(vit_attention_received(layer, seen["h"], chunk=7), want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("family", QWEN)
def test_packed_vit_probe_equals_eager_weights_of_every_block(family):
    """Windowed and full-attention blocks, several images of different sizes and a video, chunked probe."""
    model = model_for(family, "eager")
    batch = inputs(model, mixed_specs(family))
    received, seen = eager_vit_received(model, batch)
    blocks = model.model.visual.blocks
    for j, block in enumerate(blocks):
        for (hidden, kwargs), want in zip(seen[j], received[j], strict=True):
            for chunk in (3, 256):
                got = packed_vit_attention_received(block, hidden, kwargs["cu_seqlens"], kwargs["position_embeddings"], chunk)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if getattr(model.config.vision_config, "window_size", None):  # Qwen2.5-VL's block 0 attends within windows: more segments
        cu = seen[0][0][1]["cu_seqlens"]
        assert cu.numel() - 1 > batch["image_grid_thw"].shape[0]


_SEEN: dict = {}


@dataclass(frozen=True)
class _SeeingHiPrune(HiPrune):
    """HiPrune that also records the per-image scores it was given (policies are immutable: into _SEEN)."""

    def select_image(self, ctx, b, i, k):
        _SEEN[(b, i)] = {layer: ctx.vision_attention(b, i, layer).clone() for layer in self.layers}
        return super().select_image(ctx, b, i, k)


@torch.no_grad()
@pytest.mark.parametrize("family", QWEN)
def test_qwen_scores_per_image_equal_eager_weights_folded_and_unpermuted(family):
    """Per image: eager column sums, 2x2 merge units averaged, window permutation undone, split by each grid."""
    model = model_for(family, "eager")
    batch = inputs(model, mixed_specs(family))
    received, _ = eager_vit_received(model, batch)
    vision = model.config.vision_config
    want = {}
    for j, per_call in received.items():
        items = []
        for rows, key in zip(per_call, ("image_grid_thw", "video_grid_thw"), strict=True):
            grid = batch[key]
            merged = rows.view(-1, 4).mean(1)
            if getattr(vision, "window_size", None):  # Qwen2.5-VL's windows: merge units in window order
                window_index, _ = get_vision_window_index(grid, vision.spatial_merge_size, vision.window_size, vision.patch_size)
                merged = merged[torch.argsort(window_index)]
            items.extend(torch.split(merged, (grid.prod(-1) // 4).tolist()))
        want[j] = items  # images of every sample in order, then videos
    policy = _SeeingHiPrune(keep=5, object_layer=1, deep_layer=2)
    _SEEN.clear()
    vtprune.wrap(model, policy)
    model(**batch)
    order = [(0, 0), (1, 0), (1, 1), (3, 0)]  # sample 2 has no image; sample 3 is the video
    assert sorted(_SEEN) == sorted(order)
    for j in (0, 1):
        for (b, i), expected in zip(order, want[j], strict=True):
            torch.testing.assert_close(_SEEN[(b, i)][j], expected, rtol=1e-5, atol=1e-5)


class _Scores(StageContext):
    """A context whose ViT scores are given (layer 0: object, layer 1: deep)."""

    def vision_attention(self, b, i, layer):
        return self.captured["scores"][layer]


def _ctx(obj, deep, side=4):
    image = single_grid_image(0, torch.arange(side * side), side, side)
    layout = SampleLayout(images=[image], question_positions=torch.arange(0), valid=torch.ones(side * side).bool())
    n = side * side
    return _Scores(
        "vision",
        None,
        [layout],
        torch.zeros(1, n, 2),
        [[torch.arange(n)]],
        [[torch.arange(n)]],
        [torch.arange(0)],
        adapter=None,
        captured={"scores": {0: obj, 1: deep}},
    )


def test_anchors_buffers_registers_known_answer():
    obj = torch.zeros(16)
    obj[5], obj[15] = 2.0, 1.0  # anchors: 5 (row 1, col 1) and 15 (last)
    deep = torch.arange(16, dtype=torch.float32)  # registers prefer high indices
    policy = HiPrune(keep=10, alpha=1.0, object_layer=1, deep_layer=2)  # round(1.0 * 10 / 5) = 2 anchors
    kept = sorted(policy.select_image(_ctx(obj, deep), 0, 0, 10).indices.tolist())
    # anchor 5 -> 4, 6, 1, 9; anchor 15 -> 14, 16 clamped to 15, 11, 19 clamped to 15
    chosen = {5, 4, 6, 1, 9, 15, 14, 11}
    registers = {13, 12}  # the two highest deep scores not chosen
    assert kept == sorted(chosen | registers)


def test_wrap_correct_drops_row_wrapping_neighbours():
    obj = torch.zeros(16)
    obj[4] = 1.0  # first column of row 1: flat -1 is the end of row 0
    policy = HiPrune(keep=5, alpha=1.0, wrap_correct=True, object_layer=1, deep_layer=2)
    kept = policy.select_image(_ctx(obj, torch.zeros(16)), 0, 0, 5).indices.tolist()
    assert {4, 5, 0, 8} <= set(kept) and 3 not in kept[:4]


@torch.no_grad()
def test_hiprune_budgets_cache_and_batch(family):
    model = model_for(family, "sdpa")
    batch = inputs(model, mixed_specs(family))
    vtprune.wrap(model, HiPrune(keep=10, object_layer=1, deep_layer=2))
    kw = gen_kwargs(4)
    assert torch.equal(model.generate(**batch, **kw), model.generate(**batch, use_cache=False, **kw))
    together = model(**batch).logits[:, -1]
    for sample in vtprune.report(model).to_dict()["samples"]:
        for image in sample["images"]:
            assert image["stages"]["vision"]["after"] == 10
    for b in range(batch["input_ids"].shape[0]):
        alone = model(**sample_alone(batch, b, family)).logits[:, -1]
        torch.testing.assert_close(alone[0], together[b], rtol=1e-4, atol=1e-5)


def test_hiprune_refuses_what_it_cannot_do():
    model = model_for("qwen2_5_vl")
    with pytest.raises(ValueError, match=r"object_layer=16 .*outside this ViT's layers 1..2"):
        vtprune.wrap(model, "hiprune", keep=8)  # block 16 is the default; the tiny ViT has 2 blocks
    with pytest.raises(ValueError, match=r"deep_layer=3 is outside this ViT's layers 1..2"):
        vtprune.wrap(model, "hiprune", keep=8, object_layer=1, deep_layer=3)
    assert not vtprune.is_wrapped(model) and not hooks_left(model)
    with pytest.raises(ValueError, match=r"object_layer=9 .*outside this ViT's layers 1..2"):
        vtprune.wrap(model_for("llava"), "hiprune", keep=8)
    with pytest.raises(ValueError, match="alpha"):
        HiPrune(alpha=2)
