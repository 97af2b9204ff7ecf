"""Masks, layouts and calls a wrapped model must take as the unwrapped one does (issue 18, items 1, 2, 3 and 7).

Truth is the unwrapped model: at full budget a wrapped model is invisible,
and a pruned one equals the unwrapped language model run on the hand-pruned
sequence with the user's mask kept in place.
"""

from __future__ import annotations

import pytest
import torch
from helpers import QWEN, gen_kwargs, inputs, mixed_specs, model_for, patch_positions, sample_alone, single_spec

import vtprune
from vtprune.policies import Fixed, Pipeline, Random
from vtprune.tiny import IMAGE_TOKEN, SampleSpec, make_inputs

LLAVA_FAMILIES = ("llava", "llava_next", "llava_onevision")
FULL = {
    "projector": lambda: Random(keep=1.0, seed=3),
    "llm": lambda: Pipeline([Random(keep=1.0, seed=3), Random(keep=1.0, seed=3, at_layer=2)]),
}


def _pad(batch: dict, left: int = 0, right: int = 0) -> dict:
    """Extra masked padding columns on both ends of every row (what max_length / pad_to_multiple_of add)."""
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in batch:
            value = batch[key]
            out[key] = torch.cat([value.new_zeros(value.shape[0], left), value, value.new_zeros(value.shape[0], right)], 1)
    return out


def _masked(family: str, layout: str, specs: list[SampleSpec] | None = None) -> dict:
    """A batch (two image samples by default) whose mask hides positions of every row: `layout` says which."""
    if layout == "masked_placeholder" and family in QWEN:
        pytest.skip("transformers' Qwen models cannot lay out M-RoPE positions for masked placeholders")
    model = model_for(family)
    specs = specs or [single_spec(family), SampleSpec(images=single_spec(family).images, question=9)]
    if layout == "both_sides":  # left padding plus right pad columns on every row
        return _pad(inputs(model, specs), left=1, right=2)
    if layout == "multiple_of_8":  # right padding up to a multiple of 8, one more block than needed
        batch = make_inputs(model, specs, pad_left=False)
        return _pad(batch, right=8 - batch["input_ids"].shape[1] % 8 + 8)
    batch = inputs(model, specs)
    mask = batch["attention_mask"].clone()
    for b in range(mask.shape[0]):
        if layout == "hole":  # a masked text token inside the row (after bos)
            mask[b, int(mask[b].argmax()) + 2] = 0
        else:  # "masked_placeholder": the user masks two placeholders of the row's image
            placeholders = torch.nonzero(batch["input_ids"][b] == IMAGE_TOKEN).flatten()
            mask[b, placeholders[3:5]] = 0
    return dict(batch, attention_mask=mask)


LAYOUTS = ("both_sides", "multiple_of_8", "hole", "masked_placeholder")


# --- item 1: masked positions keep their place --------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stage", sorted(FULL))
def test_full_budget_is_the_identity_for_any_mask(family, layout, stage):
    model = model_for(family)
    batch = _masked(family, layout)
    ref = model(**batch, output_hidden_states=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    ref_loss = model(**batch, labels=labels).loss
    vtprune.wrap(model, FULL[stage]())
    out = model(**batch, output_hidden_states=True)
    assert out.logits.shape == ref.logits.shape == (*batch["input_ids"].shape, ref.logits.shape[-1])
    assert torch.equal(out.logits, ref.logits)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states, strict=True))
    assert out.cache.get_seq_length() == ref.cache.get_seq_length() == batch["input_ids"].shape[1]
    assert torch.equal(model(**batch, labels=labels).loss, ref_loss)


@torch.no_grad()
@pytest.mark.parametrize("layout", ["both_sides", "hole"])
def test_full_budget_generate_equals_unwrapped_for_any_mask(family, layout):
    model = model_for(family)
    batch = _masked(family, layout)
    kw = gen_kwargs(4)
    ref = model.generate(**batch, **kw)
    vtprune.wrap(model, FULL["llm"]())
    assert torch.equal(model.generate(**batch, **kw), ref)


def _lm_inputs(model, batch):
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    model(**batch, use_cache=False)
    handle.remove()
    return seen


@torch.no_grad()
@pytest.mark.parametrize("layout", ["hole", "masked_placeholder"])
def test_pruned_prefill_keeps_masked_positions_in_place(family, layout):
    """A pruned prefill equals the unwrapped language model on the hand-pruned sequence, the user's mask kept."""
    model = model_for(family)
    batch = _masked(family, layout, [single_spec(family)])
    mask = batch["attention_mask"]
    seen = _lm_inputs(model, batch)
    embeds = seen["inputs_embeds"]
    positions = seen.get("position_ids")
    if positions is None:
        positions = torch.arange(embeds.shape[1]).unsqueeze(0)

    kept = [2, 3, 4, 10, 20]  # 3 and 4: the placeholders "masked_placeholder" masks
    vtprune.wrap(model, Fixed(kept=[[kept]]))
    pruned = model(**batch, use_cache=False).logits
    vtprune.unwrap(model)

    patch = patch_positions(model, batch)
    keep = torch.ones(embeds.shape[1], dtype=torch.bool)
    keep[patch] = False
    keep[patch[kept]] = True
    seq = torch.nonzero(keep).flatten()
    deepstack = {}
    if seen.get("visual_pos_masks") is not None:  # Qwen3-VL: the DeepStack rows of the kept visual positions
        visual = seen["visual_pos_masks"]
        deepstack = dict(
            visual_pos_masks=visual[:, seq],
            deepstack_visual_embeds=[rows[keep[visual[0]]] for rows in seen["deepstack_visual_embeds"]],
        )
    out = model.model.language_model(
        inputs_embeds=embeds[:, seq], position_ids=positions[..., seq], attention_mask=mask[:, seq], use_cache=False, **deepstack
    )
    hand = model.lm_head(out.last_hidden_state)
    assert pruned.shape == hand.shape and int(mask[0, seq].sum()) < seq.numel()  # masked positions stayed
    torch.testing.assert_close(pruned, hand, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_pruned_generate_with_masked_positions_equals_no_cache(family):
    model = model_for(family)
    batch = _pad(_masked(family, "hole"), left=1)
    vtprune.wrap(model, Pipeline([Random(keep=3, seed=3), Random(keep=2, seed=3, at_layer=2)]))
    kw = gen_kwargs(5)
    assert torch.equal(model.generate(**batch, **kw), model.generate(**batch, use_cache=False, **kw))


@torch.no_grad()
@pytest.mark.parametrize("family_1d", LLAVA_FAMILIES)
@pytest.mark.parametrize("stage", ["projector", "llm"])
def test_manual_decode_step_of_a_padded_batch_continues_from_unpruned_positions(family_1d, stage):
    """A decode step given the mask but no positions: transformers counts them from the (pruned) cache length."""
    model = model_for(family_1d)
    batch = _pad(_masked(family_1d, "hole"), left=1)
    policy = Random(keep=3, seed=3) if stage == "projector" else Random(keep=3, seed=3, at_layer=2)
    vtprune.wrap(model, policy)
    first = model(**batch, use_cache=True)
    nxt = first.logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], 1)
    step = model(input_ids=nxt, attention_mask=mask, cache=first.cache, use_cache=True).logits[:, -1]
    recomputed = model(
        **dict(batch, input_ids=torch.cat([batch["input_ids"], nxt], 1), attention_mask=mask), use_cache=False
    ).logits[:, -1]
    torch.testing.assert_close(step, recomputed, rtol=1e-4, atol=1e-5)


# --- item 7: a row without tokens ------------------------------------------------------------------------


def _with_empty_row(batch: dict) -> dict:
    out = dict(batch)
    for key in ("input_ids", "attention_mask"):
        out[key] = torch.cat([batch[key], torch.zeros_like(batch[key][:1])])
    if "batch_num_images" in batch:
        out["batch_num_images"] = torch.cat([batch["batch_num_images"], torch.zeros_like(batch["batch_num_images"][:1])])
    return out


@torch.no_grad()
@pytest.mark.parametrize("family_1d", LLAVA_FAMILIES)
def test_a_row_without_tokens_leaves_the_batch_alone(family_1d):
    model = model_for(family_1d)
    plain = inputs(model, mixed_specs(family_1d)[:3])
    batch = _with_empty_row(plain)
    kw = gen_kwargs(4)
    ref, ref_logits = model.generate(**batch, **kw), model(**batch).logits
    vtprune.wrap(model, FULL["llm"]())
    assert torch.equal(model(**batch).logits, ref_logits)
    assert torch.equal(model.generate(**batch, **kw), ref)
    # pruned: the other rows generate as they do without the empty row (left padding stays left padding)
    vtprune.wrap(model, Random(keep=3, seed=3))
    without = model.generate(**plain, **kw)
    assert torch.equal(model.generate(**batch, **kw)[: len(without), -4:], without[:, -4:])


# --- item 3: calls without media ------------------------------------------------------------------------


@torch.no_grad()
def test_placeholders_typed_as_text_run_as_unwrapped(family):
    model = model_for(family)
    batch = inputs(model, mixed_specs(family))
    text = {k: batch[k] for k in ("input_ids", "attention_mask")}
    ref = model(**text).logits
    vtprune.wrap(model, "random", keep=3)
    with pytest.warns(RuntimeWarning, match="no vision encoder ran"):
        out = model(**text).logits
    assert torch.equal(out, ref)
    report = vtprune.report(model).to_dict()
    assert all(not sample["images"] for sample in report["samples"])


@torch.no_grad()
@pytest.mark.parametrize("keep", [1.0, 3])
def test_wrapped_assistant_in_assisted_decoding(family, keep):
    if family == "qwen3_5":
        pytest.skip("transformers refuses assisted generation with stateful models (Qwen3.5's linear attention)")
    main, assistant = model_for(family), model_for(family, seed=1)
    batch = inputs(main, [single_spec(family)])
    kw = gen_kwargs(4)
    ref = main.generate(**batch, **kw, assistant_model=assistant)
    greedy = main.generate(**batch, **kw)
    vtprune.wrap(assistant, "random", keep=keep)
    out = main.generate(**batch, **kw, assistant_model=assistant)
    assert torch.equal(out, greedy)  # assisted decoding gives the main model's greedy tokens
    if keep == 1.0:
        assert torch.equal(out, ref)
        vtprune.wrap(main, "random", keep=1.0)  # both wrapped
        assert torch.equal(main.generate(**batch, **kw, assistant_model=assistant), ref)


# --- item 2: packed (padding-free) inputs ---------------------------------------------------------------


def _packed(model, family: str) -> tuple[dict, list[dict], list[int]]:
    """Two image samples packed into one row with no mask and position ids that restart; each alone; lengths."""
    specs = [single_spec(family), SampleSpec(images=single_spec(family).images, question=9)]
    batch = inputs(model, specs)
    alone = [sample_alone(batch, b, family) for b in range(len(specs))]
    lengths = [a["input_ids"].shape[1] for a in alone]
    packed = {"input_ids": torch.cat([a["input_ids"] for a in alone], 1)}
    for key in ("pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids"):
        if key in alone[0]:
            packed[key] = torch.cat([a[key] for a in alone], 1 if key == "mm_token_type_ids" else 0)
    text = torch.cat([torch.arange(n) for n in lengths])[None]
    if family in QWEN:  # a text row, then each sample's own M-RoPE rows
        rows = torch.cat([_lm_inputs(model, a)["position_ids"][-3:] for a in alone], -1)
        packed["position_ids"] = torch.cat([text[None], rows])
    else:
        packed["position_ids"] = text
    return packed, alone, lengths


#: families whose packed prompts these tests can build (LLaVA-OneVision lays out images per sample)
PACKED_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


@torch.no_grad()
@pytest.mark.parametrize("family_packed", (*PACKED_FAMILIES, "qwen3_5"))
def test_packed_inputs_at_full_budget_equal_unwrapped(family_packed):
    model = model_for(family_packed)
    packed, alone, lengths = _packed(model, family_packed)
    ref = model(**packed, use_cache=False).logits
    if family_packed != "qwen3_5":  # its linear-attention layers run across packed sequences, unwrapped too
        per_sample = torch.cat([model(**a, use_cache=False).logits for a in alone], 1)
        torch.testing.assert_close(ref, per_sample, rtol=1e-4, atol=1e-5)  # transformers keeps the samples apart
    vtprune.wrap(model, FULL["llm"]())
    out = model(**packed, use_cache=False).logits
    assert (out - ref).abs().max() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("family_packed", PACKED_FAMILIES)
def test_pruned_packed_inputs_keep_the_samples_apart_or_refuse(family_packed):
    model = model_for(family_packed)
    packed, alone, lengths = _packed(model, family_packed)
    kept = ((1, 4, 6, 9),)
    if family_packed not in QWEN:
        vtprune.wrap(model, Fixed(kept=[kept * 2]))
        with pytest.raises(ValueError, match="packed inputs"):
            model(**packed, use_cache=False)
        return
    vtprune.wrap(model, Fixed(kept=[kept]))
    want = [model(**a, use_cache=False).logits for a in alone]
    vtprune.wrap(model, Fixed(kept=[kept * 2]))
    out = model(**packed, use_cache=False).logits
    torch.testing.assert_close(out, torch.cat(want, 1), rtol=1e-4, atol=1e-5)
    vtprune.wrap(model, Pipeline([Random(keep=1.0), Random(keep=3, at_layer=2)]))
    with pytest.raises(ValueError, match="packed inputs"):
        model(**packed, use_cache=False)
