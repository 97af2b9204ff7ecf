"""HiPrune and the ViT attention probe."""

from __future__ import annotations

import pytest
import torch
from helpers import gen_kwargs, inputs, mixed_specs, model_for, sample_alone

import vtprune
from vtprune.context import StageContext
from vtprune.layout import SampleLayout
from vtprune.ops.probe import vit_attention_received
from vtprune.patches.base import single_grid_image
from vtprune.policies import HiPrune

CLIP_FAMILIES = ("llava", "llava_next")


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


class _Scores(StageContext):
    """A context whose ViT scores are given (layer 0: object, layer 1: deep)."""

    def vision_attention(self, b, i, layer):
        return self.captured["scores"][layer]


def _ctx(obj, deep, side=4):
    image = single_grid_image(0, torch.arange(side * side), side, side)
    layout = SampleLayout(images=[image], question_positions=torch.arange(0), valid=torch.ones(side * side).bool())
    n = side * side
    return _Scores("vision", None, [layout], torch.zeros(1, n, 2), [[torch.arange(n)]], [[torch.arange(n)]],
                   [torch.arange(0)], adapter=None, captured={"scores": {0: obj, 1: deep}})


def test_anchors_buffers_registers_known_answer():
    obj = torch.zeros(16)
    obj[5], obj[15] = 2.0, 1.0  # anchors: 5 (row 1, col 1) and 15 (last)
    deep = torch.arange(16, dtype=torch.float32)  # registers prefer high indices
    policy = HiPrune(keep=10, alpha=1.0)  # round(1.0 * 10 / 5) = 2 anchors
    policy._layers = (0, 1)
    kept = sorted(policy.select_image(_ctx(obj, deep), 0, 0, 10).indices.tolist())
    # anchor 5 -> 4, 6, 1, 9; anchor 15 -> 14, 16 clamped to 15, 11, 19 clamped to 15
    chosen = {5, 4, 6, 1, 9, 15, 14, 11}
    registers = {13, 12}  # the two highest deep scores not chosen
    assert kept == sorted(chosen | registers)


def test_wrap_correct_drops_row_wrapping_neighbours():
    obj = torch.zeros(16)
    obj[4] = 1.0  # first column of row 1: flat -1 is the end of row 0
    policy = HiPrune(keep=5, alpha=1.0, wrap_correct=True)
    policy._layers = (0, 1)
    kept = policy.select_image(_ctx(obj, torch.zeros(16)), 0, 0, 5).indices.tolist()
    assert {4, 5, 0, 8} <= set(kept) and 3 not in kept[:4]


@torch.no_grad()
@pytest.mark.parametrize("family", CLIP_FAMILIES)
def test_hiprune_budgets_cache_and_batch(family):
    model = model_for(family, "sdpa")
    batch = inputs(model, mixed_specs(family))
    vtprune.wrap(model, HiPrune(keep=10, object_layer=1))
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
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        vtprune.wrap(model_for("qwen2_5_vl"), "hiprune", keep=8)
    with pytest.raises(ValueError, match="object_layer=9 is outside this ViT's layers 1..2"):
        vtprune.wrap(model_for("llava"), "hiprune", keep=8)
    with pytest.raises(ValueError, match="alpha"):
        HiPrune(alpha=2)
