"""Bad input: a clear error naming what was given, and the model left exactly as it was."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import hooks_left, inputs, lm_input_embeds, mixed_specs, model_for

import vtprune
from vtprune.budget import resolve_budget, split_budget
from vtprune.policies import Pipeline, Pooling, Random
from vtprune.policies.baselines import _window_grid


@pytest.fixture(scope="module")
def llava():
    model = model_for("llava", "sdpa")
    batch = inputs(model, mixed_specs("llava"))
    with torch.no_grad():
        ref = model(**batch).logits
    return model, batch, ref, hooks_left(model)


def _untouched(model, batch, ref, before):
    assert not vtprune.is_wrapped(model)
    assert hooks_left(model) == before
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)


@pytest.mark.parametrize(
    "keep, err, words",
    [
        (0, ValueError, ">= 1"),
        (-3, ValueError, ">= 1"),
        (0.0, ValueError, "(0, 1]"),
        (1.5, ValueError, "(0, 1]"),
        (9.0, ValueError, "(0, 1]"),
        (math.nan, ValueError, "(0, 1]"),
        (True, TypeError, "bool"),
        ("64", TypeError, "str"),
    ],
)
def test_invalid_keep(llava, keep, err, words):
    model, batch, ref, before = llava
    with pytest.raises(err) as info:
        vtprune.wrap(model, "random", keep=keep)
    assert words in str(info.value) and repr(keep)[:3] in str(info.value)
    _untouched(model, batch, ref, before)


@pytest.mark.parametrize(
    "call, err, words",
    [
        (lambda m: vtprune.wrap(m, "nope", keep=4), ValueError, "unknown policy 'nope'; available: cdpruner, dart, divprune,"),
        (lambda m: vtprune.wrap(m, 42, keep=4), TypeError, "42"),
        (lambda m: vtprune.wrap(m, "random", keep=4, at_layer=4), ValueError, "layers 0..3"),
        (lambda m: vtprune.wrap(m, "random", keep=4, at_layer=0), ValueError, "at_layer must be an int >= 1"),
        (lambda m: vtprune.wrap(m, "random", keep=4, where="decoder"), ValueError, "'decoder'"),
        (lambda m: vtprune.wrap(m, "random", keep=4, bogus=1), TypeError, "bogus"),
        (lambda m: vtprune.wrap(m, "random", keep=4, positions="shifted"), ValueError, "'shifted'"),
        (lambda m: vtprune.wrap(m, Random(keep=4), keep=8), TypeError, "policy object"),
        (lambda m: vtprune.wrap(m, Pipeline([Random(keep=4, at_layer=2), Pooling(keep=4)])), ValueError, "forward"),
        (lambda m: vtprune.wrap(m, Pipeline([])), ValueError, "at least one"),
        (lambda m: vtprune.report(m), ValueError, "not wrapped"),
        (lambda m: vtprune.wrap(m, "mmtok", keep=4, tokenizer=object()), TypeError, "tokenizer must be"),
    ],
)
def test_invalid_options(llava, call, err, words):
    model, batch, ref, before = llava
    with pytest.raises(err) as info:
        call(model)
    assert words in str(info.value)
    _untouched(model, batch, ref, before)


def test_unsupported_model_type():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2
        )
    )
    from vtprune.patches import supported_model_types

    with pytest.raises(ValueError, match=f"unsupported model type 'llama'.*{', '.join(supported_model_types())}"):
        vtprune.wrap(model, "random", keep=4)
    assert not vtprune.is_wrapped(model)


def test_compact_positions_refused_for_mrope():
    model = model_for("qwen2_5_vl", "sdpa")
    with pytest.raises(ValueError, match="M-RoPE"):
        vtprune.wrap(model, "random", keep=4, positions="compact")
    assert hooks_left(model) == []


def test_rewrapping_replaces_instead_of_stacking(llava):
    model, batch, ref, before = llava
    vtprune.wrap(model, "random", keep=4)
    once = hooks_left(model)
    vtprune.wrap(model, "pooling", keep=2)
    assert hooks_left(model) == once
    with torch.no_grad():
        model(**batch)
    assert vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]["projector"]["after"] == 2
    vtprune.unwrap(model)
    _untouched(model, batch, ref, before)


def test_text_only_batch_and_nonfinite_features_are_not_errors(llava):
    model, batch, ref, before = llava
    text_only = {"input_ids": batch["input_ids"][2:, -9:], "attention_mask": batch["attention_mask"][2:, -9:]}
    with torch.no_grad():
        plain = model(**text_only).logits
        with vtprune.pruned(model, "pooling", keep=2):
            assert torch.equal(model(**text_only).logits, plain)
            assert vtprune.report(model).to_dict()["samples"] == [{"images": []}]
    from vtprune.ops.select import topk_indices

    with pytest.warns(RuntimeWarning, match="non-finite"):
        picked = topk_indices(torch.tensor([0.5, math.nan, math.inf, 0.5, -math.inf]), 3)
    assert picked.tolist() == [0, 2, 3]


def test_budget_arithmetic():
    assert resolve_budget(64, 576, 576) == 64
    assert resolve_budget(1000, 576, 576) == 576
    assert resolve_budget(0.25, 576, 576) == 144
    assert resolve_budget(0.1, 3, 3) == 1  # at least one
    assert resolve_budget(0.125, 100, 10, rounding="floor") == 1
    assert resolve_budget(0.5, 10, 37, rounding="floor") == 10  # capped by the alive count
    assert split_budget([576, 2304], 320) == [64, 256]
    for sizes in ([5, 3, 9], [1, 1, 1], [7]):
        for k in range(sum(sizes) + 3):
            parts = split_budget(sizes, k)
            assert sum(parts) == min(k, sum(sizes)) and all(0 <= p <= s for p, s in zip(parts, sizes))


@pytest.mark.parametrize("h, w", [(24, 24), (5, 7), (1, 9), (12, 3)])
def test_pooling_windows_tile_the_grid_exactly(h, w):
    for k in range(1, h * w + 1):
        windows = _window_grid(h, w, k)
        assert len(windows) == k
        cover = torch.zeros(h, w, dtype=torch.int)
        for r0, r1, c0, c1 in windows:
            assert r1 > r0 and c1 > c0
            cover[r0:r1, c0:c1] += 1
        assert bool((cover == 1).all())


def test_pooling_values_are_window_means():
    model = model_for("llava", "sdpa")
    batch = inputs(model, mixed_specs("llava")[:1])
    seen = {}
    full = lm_input_embeds(model, batch)
    with torch.no_grad():
        vtprune.wrap(model, "pooling", keep=4)  # 8 x 8 grid -> four 4 x 4 windows
        handle = model.model.language_model.layers[0].register_forward_pre_hook(lambda _m, args: seen.update(e=args[0]))
        model(**batch)
        handle.remove()
    image = torch.nonzero(batch["input_ids"][0] == 100).flatten()
    grid = full[0, image].view(8, 8, -1)
    want = torch.stack([grid[r : r + 4, c : c + 4].mean((0, 1)) for r in (0, 4) for c in (0, 4)])
    kept = vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]["projector"]["kept"]
    assert kept == [0, 4, 32, 36]
    start = int(image[0])
    torch.testing.assert_close(seen["e"][0, start : start + 4], want)


def test_prefill_from_inputs_embeds_only_warns_and_runs_unpruned(llava):
    model, batch, ref, before = llava
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(batch["input_ids"][2:])
        plain = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"][2:]).logits
        with vtprune.pruned(model, "random", keep=2):
            with pytest.warns(RuntimeWarning, match="inputs_embeds is not pruned"):
                out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"][2:]).logits
    assert torch.equal(out, plain)
    _untouched(model, batch, ref, before)


@torch.no_grad()
def test_qwen_inputs_without_mm_token_type_ids_warn():
    model = model_for("qwen2_5_vl", "sdpa")
    batch = inputs(model, mixed_specs("qwen2_5_vl"))
    batch.pop("mm_token_type_ids")
    vtprune.wrap(model, "random", keep=2)
    with pytest.warns(RuntimeWarning, match="mm_token_type_ids"):
        model(**batch)


def test_a_misspelt_option_lists_the_policy_options_only():
    from vtprune.policies.base import make_policy

    with pytest.raises(TypeError) as err:
        make_policy("fastv", keep=4, at_layr=2)
    message = str(err.value)
    assert "'at_layer'" in message and "'keep'" in message and "at_layr" in message
    assert "zoo_fields" not in message and "whole_grid" not in message and "'stage'" not in message
