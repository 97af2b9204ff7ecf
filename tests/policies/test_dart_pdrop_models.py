"""DART and PyramidDrop on the tiny models against brute force from the unwrapped model's own tensors.

Budgets, batch == alone, cache == recomputation and backend independence on
every family run in tests/families/test_policies_models.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import hooks_left, inputs, model_for, patch_positions, single_spec

import vtprune
from policies.test_dart_pdrop_oracles import _dart_oracle
from vtprune.policies import DART, Fixed, Pipeline, PyramidDrop


def _stages(report, b=0, i=0):
    return report.to_dict()["samples"][b]["images"][i]["stages"]


@torch.no_grad()
def _pdrop_brute_force(family, batch, prune_after, ratios, keep, positions):
    """PyramidDrop stage by stage: eager attention weights of the layer after each boundary, earlier stages replayed.

    One sample, no padding. The last row of the next layer's returned weights,
    mean over heads, at the image's current columns; top int(N r) (keep at the
    last stage), ties to the lowest index.
    """
    model = model_for(family, "eager")
    patches = patch_positions(model, batch).tolist()
    n0 = len(patches)
    alive, stages, steps = list(range(n0)), [], []
    layers = model.model.language_model.layers
    for s, (at, ratio) in enumerate(zip(prune_after, ratios)):
        seen = {}
        handle = layers[at].self_attn.register_forward_hook(lambda _m, _a, out, seen=seen: seen.update(w=out[1][0]))
        if steps:
            vtprune.wrap(model, Pipeline(steps), positions=positions)
        model(**batch)
        handle.remove()
        removed = {patches[g] for g in range(n0) if g not in alive}
        order = [p for p in range(batch["input_ids"].shape[1]) if p not in removed]
        where = {p: k for k, p in enumerate(order)}
        row = seen["w"].double().mean(0)[-1]
        score = [float(row[where[patches[g]]]) for g in alive]
        k = int(n0 * ratio)
        if keep is not None:
            k = keep if s == len(ratios) - 1 else max(k, keep)
        top = sorted(range(len(alive)), key=lambda r: (-score[r], r))[:k]
        alive = sorted(alive[r] for r in top)
        stages.append(alive)
        steps.append(Fixed(kept=[[alive]], at_layer=at))
    vtprune.unwrap(model)
    return stages


@torch.no_grad()
@pytest.mark.parametrize(
    "family,positions",
    [("llava", "compact"), ("llava", "original"), ("llava_next", "compact"), ("qwen2_5_vl", "original"), ("qwen3_5", "original")],
)
@pytest.mark.parametrize("attn", ["sdpa", "vtprune_noweights"])
def test_pdrop_every_stage_equals_brute_force_from_eager_weights(family, positions, attn):
    model = model_for(family, attn)
    batch = inputs(model, [single_spec(family)])
    schedule = dict(prune_after=(1, 3), ratios=(0.5, 0.25))  # layers 1 and 3: full attention on qwen3_5 too
    want = _pdrop_brute_force(family, batch, **schedule, keep=None, positions=positions)
    vtprune.wrap(model, PyramidDrop(**schedule), positions=positions)
    model(**batch)
    got = _stages(vtprune.report(model))
    assert list(got) == ["llm@1", "llm@3"]
    assert [v["kept"] for v in got.values()] == want


@torch.no_grad()
def test_pdrop_keep_replaces_the_last_stage_and_bounds_the_earlier_ones():
    model = model_for("llava", "sdpa")
    batch = inputs(model, [single_spec("llava")])
    n = len(patch_positions(model, batch))
    schedule = dict(prune_after=(1, 2, 3), ratios=(0.5, 0.25, 0.125))
    want = _pdrop_brute_force("llava", batch, **schedule, keep=n // 3, positions="original")
    vtprune.wrap(model, PyramidDrop(keep=n // 3, **schedule))
    model(**batch)
    got = _stages(vtprune.report(model))
    assert [v["after"] for v in got.values()] == [n // 2, n // 3, n // 3]
    assert [v["kept"] for v in got.values()] == want


def test_pdrop_defaults_come_from_the_zoo_and_bad_schedules_raise():
    model = model_for("llava", "sdpa")
    with pytest.raises(ValueError, match="does not fit"):
        vtprune.wrap(model, "pdrop")  # the family's 8/16/24 on the 4-layer tiny model
    with pytest.raises(ValueError, match="one ratio per boundary"):
        PyramidDrop(prune_after=(1, 2), ratios=(0.5,))
    with pytest.raises(ValueError, match="must not increase"):
        PyramidDrop(prune_after=(1, 2), ratios=(0.25, 0.5))
    assert hooks_left(model) == []  # nothing installed by a refused wrap
    policy = vtprune.policies.make_policy("pdrop")
    assert policy.prune_after is None  # resolved per model at wrap


@torch.no_grad()
def _dart_brute_force(family, batch, at_layer, keep, budget):
    """DART from the unwrapped model: layer K-1's keys from its cache, the final norm of its output, `_dart_oracle`."""
    model = model_for(family, "eager")
    out = model(**batch, use_cache=True, output_hidden_states=True)
    cache = out.past_key_values
    keys = cache.layers[at_layer - 1].keys[0]  # (kv_heads, L, d), post-RoPE
    l1 = keys.float().abs().sum(dim=(0, 2))
    feats = model.model.language_model.norm(out.hidden_states[at_layer][0]).float()
    patches = patch_positions(model, batch).tolist()
    last_visual = max(int(p) for p in patches)
    ids = batch["input_ids"][0]
    text = [p for p in range(ids.numel()) if p > last_visual]
    return _dart_oracle(
        [float(l1[p]) for p in patches],
        [feats[p].tolist() for p in patches],
        [float(l1[p]) for p in text],
        [feats[p].tolist() for p in text],
        keep,
        0,
        text,
        budget,
        image_positions=patches,
    )


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_5"])
@pytest.mark.parametrize("budget", ["reference", "exact"])
def test_dart_equals_brute_force_from_the_cache_and_hidden_states(family, budget):
    at_layer = 4 if family == "qwen3_5" else 2  # qwen3_5: layer 3 is full attention
    model = model_for(family, "vtprune_noweights")
    batch = inputs(model, [single_spec(family)])
    n = len(patch_positions(model, batch))
    keep = 8 * max(1, n // 24) + 2  # keep % 8 <= 4: the exact budget only trims the last quotas
    want = _dart_brute_force(family, batch, at_layer, keep, budget)
    vtprune.wrap(model, DART(keep=keep, at_layer=at_layer, budget=budget))
    model(**batch)
    got = _stages(vtprune.report(model))[f"llm@{at_layer}"]["kept"]
    assert got == want
    assert len(got) == (keep if budget == "exact" else min(n, 4 + 8 * (keep // 8)))


def test_dart_options_are_checked():
    with pytest.raises(ValueError, match="budget"):
        DART(budget="all")
    with pytest.raises(ValueError, match="pivot_order"):
        DART(pivot_order="random")
    assert DART(budget="exact").to_dict()["budget"] == "exact"
