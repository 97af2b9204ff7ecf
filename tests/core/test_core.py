"""Core invariants on every family, eager / SDPA / a no-weights backend: full budget == unwrapped, pruned ==
hand-pruned inputs, cached == uncached, a batch == its samples one by one, unwrap bit-exact, exact budgets."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ATTNS,
    gen_kwargs,
    hooks_left,
    inputs,
    mixed_specs,
    model_for,
    patch_positions,
    sample_alone,
    single_spec,
    visual_positions,
)

import vtprune
from vtprune.policies import Pipeline, Pooling, Random

STAGES = {
    "projector": lambda keep: Random(keep=keep, seed=3),
    "vision": lambda keep: Random(keep=keep, seed=3, where="vision"),
    "llm": lambda keep: Random(keep=keep, seed=3, at_layer=2),
}


@pytest.fixture(params=ATTNS)
def attn(request):
    return request.param


@torch.no_grad()
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_identity_at_full_budget(family, attn, stage):
    model = model_for(family, attn)
    batch = inputs(model, mixed_specs(family))
    ref = model(**batch).logits
    vtprune.wrap(model, STAGES[stage](1.0))
    out = model(**batch).logits
    assert out.shape == ref.shape
    valid = batch["attention_mask"].bool()  # padding rows carry no prediction
    assert torch.equal(out[valid], ref[valid])


def _captured_lm_inputs(model, batch):
    seen = {}

    def grab(_m, _args, kwargs):
        seen.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen


@torch.no_grad()
def test_projector_stage_equals_hand_pruned_inputs(family, attn):
    model = model_for(family, attn)
    batch = inputs(model, [single_spec(family)])
    seen = _captured_lm_inputs(model, batch)
    embeds = seen["inputs_embeds"]
    positions = seen.get("position_ids")
    if positions is None:
        positions = torch.arange(embeds.shape[1]).unsqueeze(0)

    vtprune.wrap(model, "random", keep=5, seed=11)
    pruned = model(**batch, use_cache=False).logits
    kept = vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]["projector"]["kept"]
    vtprune.unwrap(model)

    visual = visual_positions(family, batch["input_ids"])
    patch = patch_positions(model, batch)
    newline = visual[~torch.isin(visual, patch)]
    keep = torch.ones(embeds.shape[1], dtype=torch.bool)
    keep[patch] = False
    keep[patch[kept]] = True
    keep[newline] = True
    seq = torch.nonzero(keep).flatten()
    deepstack = {}
    if seen.get("visual_pos_masks") is not None:  # Qwen3-VL: the DeepStack rows of the kept visual positions
        mask = seen["visual_pos_masks"]
        deepstack = dict(
            visual_pos_masks=mask[:, seq],
            deepstack_visual_embeds=[rows[keep[mask[0]]] for rows in seen["deepstack_visual_embeds"]],
        )
    out = model.model.language_model(
        inputs_embeds=embeds[:, seq],
        position_ids=positions[..., seq],
        attention_mask=torch.ones(1, seq.numel(), dtype=torch.long),
        use_cache=False,
        **deepstack,
    )
    hand = model.lm_head(out.last_hidden_state)
    assert len(kept) == 5
    torch.testing.assert_close(pruned, hand, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_generate_cache_equals_no_cache(family, attn, stage):
    model = model_for(family, attn)
    batch = inputs(model, mixed_specs(family))
    vtprune.wrap(model, STAGES[stage](3))
    kw = gen_kwargs(6)
    with_cache = model.generate(**batch, use_cache=True, **kw)
    without = model.generate(**batch, use_cache=False, **kw)
    assert torch.equal(with_cache, without)


@torch.no_grad()
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_batch_equals_one_by_one(family, stage):
    model = model_for(family, "sdpa")
    specs = mixed_specs(family)
    vtprune.wrap(model, STAGES[stage](3))
    batch = inputs(model, specs)
    together = model(**batch).logits[:, -1]
    gen_together = model.generate(**batch, **gen_kwargs(4))
    for b in range(len(specs)):
        # The same sample, alone: rebuild its inputs from the batch rows.
        alone = sample_alone(batch, b, family)
        logits = model(**alone).logits[:, -1]
        torch.testing.assert_close(logits[0], together[b], rtol=1e-4, atol=1e-5)
        gen = model.generate(**alone, **gen_kwargs(4))
        assert torch.equal(gen[0, -4:], gen_together[b, -4:])


@torch.no_grad()
def test_unwrap_is_bit_exact_and_leaves_nothing(family):
    model = model_for(family, "sdpa")
    batch = inputs(model, mixed_specs(family))
    ref = model(**batch).logits
    before = hooks_left(model)
    vtprune.wrap(model, Pipeline([Random(keep=4, seed=1), Random(keep=2, at_layer=2)]))
    assert model(**batch).logits.shape[1] < ref.shape[1]
    vtprune.unwrap(model)
    assert hooks_left(model) == before
    assert torch.equal(model(**batch).logits, ref)
    assert not vtprune.is_wrapped(model)


@torch.no_grad()
def test_scoped_form_restores_the_model(family):
    model = model_for(family, "sdpa")
    batch = inputs(model, [single_spec(family)])
    ref = model(**batch).logits
    before = hooks_left(model)  # HF's own output-capture hooks, if any
    with vtprune.pruned(model, "pooling", keep=4) as same:
        assert same is model
        assert model(**batch).logits.shape[1] < ref.shape[1]
    assert torch.equal(model(**batch).logits, ref)
    assert hooks_left(model) == before


@torch.no_grad()
def test_other_instance_is_unaffected(family):
    wrapped, other = model_for(family, "sdpa", seed=0), model_for(family, "sdpa", seed=0)
    batch = inputs(other, mixed_specs(family))
    ref = other(**batch).logits
    before = hooks_left(other)
    vtprune.wrap(wrapped, "random", keep=2)
    wrapped(**batch)
    assert torch.equal(other(**batch).logits, ref)
    assert hooks_left(other) == before


@torch.no_grad()
@pytest.mark.parametrize("keep", [1, 3, 0.25, 1.0, 10_000])
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_report_shows_exact_budgets(family, keep, stage):
    model = model_for(family, "sdpa")
    batch = inputs(model, mixed_specs(family))
    vtprune.wrap(model, STAGES[stage](keep))
    model(**batch)
    data = vtprune.report(model).to_dict()
    key = "llm@2" if stage == "llm" else stage
    seen = 0
    for sample in data["samples"]:
        for image in sample["images"]:
            n = image["tokens"]
            want = min(keep, n) if isinstance(keep, int) else max(1, round(n * keep))
            st = image["stages"][key]
            assert (st["before"], st["after"]) == (n, want)
            assert st["kept"] == sorted(set(st["kept"])) and len(st["kept"]) == want
            assert all(0 <= k < n for k in st["kept"])
            assert st["ms"] >= 0
            seen += 1
    assert seen >= 3
    assert data["samples"][2]["images"] == []


@torch.no_grad()
def test_pipeline_stages_compose(family):
    model = model_for(family, "sdpa")
    batch = inputs(model, mixed_specs(family))
    vtprune.wrap(model, Pipeline([Pooling(keep=6), Random(keep=2, at_layer=1), Random(keep=1, at_layer=3, seed=5)]))
    gen = model.generate(**batch, **gen_kwargs(3))
    nocache = model.generate(**batch, **gen_kwargs(3), use_cache=False)
    assert torch.equal(gen, nocache)
    image = vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]
    assert [(k, v["after"]) for k, v in image.items()] == [("projector", 6), ("llm@1", 2), ("llm@3", 1)]
    assert set(image["llm@3"]["kept"]) <= set(image["llm@1"]["kept"]) <= set(image["projector"]["kept"])


@torch.no_grad()
def test_second_llm_prune_point_batch_equals_alone(family):
    """The second prune point gathers the first one's rotary tables and positions, not the full-length ones."""
    model = model_for(family, "sdpa")
    batch = inputs(model, mixed_specs(family))
    vtprune.wrap(model, Pipeline([Random(keep=0.5, at_layer=1), Random(keep=0.25, at_layer=3, seed=5)]))
    together = model(**batch).logits[:, -1]
    for b in range(batch["input_ids"].shape[0]):
        alone = model(**sample_alone(batch, b, family)).logits[:, -1]
        torch.testing.assert_close(alone[0], together[b], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_sampled_generate_runs_and_kv_cache_is_smaller(family):
    model = model_for(family, "sdpa")
    batch = inputs(model, mixed_specs(family))
    full = model.generate(**batch, **gen_kwargs(3, do_sample=True), return_dict_in_generate=True)
    vtprune.wrap(model, "random", keep=2)
    torch.manual_seed(0)
    out = model.generate(**batch, **gen_kwargs(3, do_sample=True), return_dict_in_generate=True)
    assert out.sequences.shape == full.sequences.shape
    assert out.cache.get_seq_length() < full.cache.get_seq_length()


@torch.no_grad()
def test_manual_decode_loop_continues_from_unpruned_positions(family):
    """Decode steps without generate(): positions come from the pruned cache and must be fixed.

    transformers would count them from the shorter cache.
    """
    model = model_for(family, "sdpa")
    batch = inputs(model, [single_spec(family)])
    vtprune.wrap(model, "random", keep=3)
    first = model(**batch, use_cache=True)
    nxt = first.logits[:, -1].argmax(-1, keepdim=True)
    step = model(input_ids=nxt, cache=first.cache, use_cache=True).logits[:, -1]
    ids = torch.cat([batch["input_ids"], nxt], dim=1)
    full = dict(batch, input_ids=ids, attention_mask=torch.ones_like(ids))
    if "mm_token_type_ids" in batch:
        full["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(nxt).int()], 1)
    recomputed = model(**full, use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, recomputed, rtol=1e-4, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("family_1d", ["llava", "llava_next", "llava_onevision"])
@pytest.mark.parametrize("stage", ["projector", "llm"])
def test_compact_positions(family_1d, stage):
    model = model_for(family_1d, "sdpa")
    batch = inputs(model, mixed_specs(family_1d))
    vtprune.wrap(model, STAGES[stage](3), positions="compact")
    kw = gen_kwargs(5)
    assert torch.equal(model.generate(**batch, **kw), model.generate(**batch, use_cache=False, **kw))
    orig = model_for(family_1d, "sdpa")
    vtprune.wrap(orig, STAGES[stage](3), positions="original")
    assert not torch.equal(model(**batch).logits, orig(**batch).logits)


@torch.no_grad()
def test_no_mask_no_cache_forward_is_not_block_diagonal(family):
    """Gapped original positions without a 2-D mask must not be read as packed sequences (transformers reads
    position ids that do not increase by one as sequence starts)."""
    model = model_for(family, "sdpa")
    batch = inputs(model, [single_spec(family)])
    vtprune.wrap(model, "random", keep=3)
    with_mask = model(**batch, use_cache=False).logits
    no_mask = {k: v for k, v in batch.items() if k != "attention_mask"}
    torch.testing.assert_close(model(**no_mask, use_cache=False).logits, with_mask)


@torch.no_grad()
def test_low_precision_models_run(family):
    model = model_for(family, "sdpa").to(torch.bfloat16)
    batch = inputs(model, mixed_specs(family))
    for key in ("pixel_values", "pixel_values_videos"):
        if key in batch:
            batch[key] = batch[key].to(torch.bfloat16)
    vtprune.wrap(model, "pooling", keep=4)
    out = model.generate(**batch, **gen_kwargs(2))
    assert out.shape[1] == batch["input_ids"].shape[1] + 2
