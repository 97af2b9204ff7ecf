"""SCOPE and VisPruner after PixelPrune: they select among the units PixelPrune kept, from the ViT as it ran.

Oracles: on LLaVA-1.5 the signals come from the CLIP tower run by hand on
CLS and the kept patches (eager attention weights of the policy's layer,
that layer's output), fed to the brute-force loops of
test_leaders_vision_ops; on every family, a Pipeline after PixelPrune on
an image without duplicate units equals the policy alone; with duplicates,
batch == alone and cache == recomputation, after the encoder and inside
it.
"""

from __future__ import annotations

import pytest
import torch
from helpers import gen_kwargs, inputs, mixed_specs, model_for, sample_alone, unmixed_specs

import vtprune
from policies.test_leaders_vision_ops import scope_oracle, vispruner_oracle
from policies.test_pixelprune import with_pattern
from vtprune.patches import supported_pixel_prune, supported_pixel_then_vit
from vtprune.policies import Pipeline, PixelPrune, Random, Scope, VisPruner
from vtprune.tiny import SampleSpec

FAMILIES = supported_pixel_prune()
POLICIES = {"scope": Scope, "vispruner": VisPruner}


def stages(model) -> list[list[list[dict]]]:
    return [[list(img["stages"].values()) for img in s["images"]] for s in vtprune.report(model).to_dict()["samples"]]


def specs(family: str):
    return unmixed_specs(family) if family == "llava_onevision" else mixed_specs(family)


@torch.no_grad()
def clip_signals_on_kept(model, pixel_values, kept: list[int]):
    """CLIP run by hand on CLS and the ``kept`` patches of one image: (the policy layer's output rows of the kept
    patches, its CLS attention to them summed over heads, the same averaged over heads)."""
    tower = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    layer = len(tower.encoder.layers) + model.config.vision_feature_layer  # 0-based; its output is the feature
    index = torch.tensor([0] + [k + 1 for k in kept])
    h = tower.pre_layrnorm(tower.embeddings(pixel_values[None])[:, index])
    for j in range(layer):
        h = tower.encoder.layers[j](h, None)
    block = tower.encoder.layers[layer]
    _, weights = block.self_attn(block.layer_norm1(h), attention_mask=None)
    out = block(h, None)
    cls = weights[0, :, 0, 1:].float()
    return out[0, 1:].float(), cls.sum(0), cls.mean(0)


@torch.no_grad()
@pytest.mark.parametrize("k", (4, 9))
def test_llava_keep_sets_equal_the_oracles_on_the_kept_patches(k):
    model = model_for("llava", "eager")
    batch = inputs(model, [SampleSpec(images=((32, 32), (32, 32)), question=5)])
    batch, dropped = with_pattern(model, batch, "duplicates")
    got = {}
    for name, cls in POLICIES.items():
        vtprune.wrap(model, Pipeline([PixelPrune(), cls(keep=k)]))
        model(**batch)
        got[name] = stages(model)[0]
        vtprune.unwrap(model)
    for g in range(2):
        pix = got["scope"][g][0]["kept"]
        if g == 0:
            assert [u for u in range(pix[-1] + 1) if u not in pix] == dropped
        hidden, cls_sum, cls_mean = clip_signals_on_kept(model, batch["pixel_values"][g], pix)
        want_scope = [pix[j] for j in scope_oracle(hidden, cls_sum, k)]
        want_vis = [pix[j] for j in vispruner_oracle(hidden, cls_mean, k, 0.5)]
        assert got["scope"][g][1]["kept"] == want_scope
        assert got["vispruner"][g][1]["kept"] == want_vis


@torch.no_grad()
@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("family", FAMILIES)
def test_without_duplicates_it_is_the_policy_alone(family, name):
    model = model_for(family, "sdpa")
    batch = inputs(model, specs(family))  # random pixels: PixelPrune keeps every unit
    vtprune.wrap(model, POLICIES[name](keep=5))
    want, kept = model(**batch).logits, [[img[-1]["kept"] for img in s] for s in stages(model)]
    vtprune.wrap(model, Pipeline([PixelPrune(), POLICIES[name](keep=5)]))
    assert torch.equal(model(**batch).logits, want)
    assert [[img[-1]["kept"] for img in s] for s in stages(model)] == kept


WHERE = [(f, None) for f in FAMILIES] + [(f, 2) for f in supported_pixel_then_vit()]


@torch.no_grad()
@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("family,vit_layer", WHERE, ids=[f"{f}-vit{v}" for f, v in WHERE])
def test_with_duplicates_batch_equals_alone_and_cache_equals_recomputation(family, vit_layer, name):
    """After the encoder, or inside it after block 2 (then the tower's later blocks run on the policy's subset of
    PixelPrune's units)."""
    model = model_for(family, "sdpa", vision_layers=4)
    batch, dropped = with_pattern(model, inputs(model, specs(family)), "duplicates")
    vtprune.wrap(model, Pipeline([PixelPrune(), POLICIES[name](keep=5, vit_layer=vit_layer)]))
    together = model(**batch).logits[:, -1]
    kept = stages(model)
    for sample in kept:
        for pix, then in sample:
            assert then["after"] == min(5, pix["after"]) and set(then["kept"]) <= set(pix["kept"])
    assert len(kept[0][0][0]["kept"]) == kept[0][0][0]["before"] - len(dropped)
    for b in range(batch["input_ids"].shape[0]):
        alone = model(**sample_alone(batch, b, family)).logits[:, -1]
        assert [[st["kept"] for st in img] for img in stages(model)[0]] == [[st["kept"] for st in img] for img in kept[b]]
        torch.testing.assert_close(alone[0], together[b], rtol=1e-4, atol=1e-5)
    kw = gen_kwargs(3)
    assert torch.equal(model.generate(**batch, **kw), model.generate(**batch, use_cache=False, **kw))


def test_other_orders_are_still_refused():
    with pytest.raises(ValueError, match="first in a Pipeline or right after pixelprune"):
        Pipeline([Random(keep=8, where="vision"), Scope(keep=4)])
    with pytest.raises(ValueError, match="first in a Pipeline or right after pixelprune"):
        Pipeline([PixelPrune(), Random(keep=8, where="vision"), VisPruner(keep=4)])
