"""Qwen3-VL (and Qwen3-VL-MoE): DeepStack under pruning at every stage, checked against the model run by hand.

The shared family tests (tests/core/test_core.py, tests/families/test_policies_models.py,
the ViT-probe tests) run on ``qwen3_vl`` through the ``family`` fixture; this
file adds what only this family has: DeepStack rows and ``visual_pos_masks``
gathered with every keep set, llm-stage prunes inside the DeepStack range
(after decoder layers 0-2) against the decoder layers run by hand, timestamped
video frames, and the per-layer KV cache of every policy.
"""

from __future__ import annotations

import pytest
import torch
from helpers import gen_kwargs, hooks_left, model_for, sample_alone
from transformers.masking_utils import create_causal_mask

import vtprune
from families.test_policies_models import POLICIES
from vtprune.patches import adapter_for, family_spec
from vtprune.policies import Pipeline, Random
from vtprune.tiny import IMAGE_TOKEN, VIDEO_TOKEN, SampleSpec, make_inputs

FAMILIES = ("qwen3_vl", "qwen3_vl_moe")
#: two image sizes and a video of two temporal frames (each after its timestamp), in one sample
ONE = SampleSpec(images=((32, 48), (48, 32)), videos=((4, 32, 32),), question=6)
#: unequal samples: two image sizes, a video, a text-only sample, padding
MIXED = [
    SampleSpec(images=((32, 48),), question=4),
    SampleSpec(images=((48, 32), (32, 32)), question=7),
    SampleSpec(question=9),
    SampleSpec(videos=((4, 32, 32),), question=3),
]


def _lm_inputs(model, batch) -> dict:
    """What the (unwrapped) language model receives: merged embeddings, M-RoPE rows, DeepStack rows and mask."""
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(**batch, use_cache=False)
    handle.remove()
    return seen


def _item_positions(batch) -> list[torch.Tensor]:
    """Sequence positions of each image, then each video, of sample 0, from the token ids and grids alone."""
    ids = batch["input_ids"][0]
    out = []
    for token, key in ((IMAGE_TOKEN, "image_grid_thw"), (VIDEO_TOKEN, "video_grid_thw")):
        if key in batch:
            sizes = (batch[key].prod(-1) // 4).tolist()
            out += list(torch.split(torch.nonzero(ids == token).flatten(), sizes))
    return out


def _by_hand(model, batch, stages: list[tuple[int, list[list[int]]]]) -> torch.Tensor:
    """Logits of sample 0 (no padding) with the decoder loop written out: ``stages`` = [(layer, kept per image)].

    Layer 0 is the projector stage (before the first decoder layer); a later
    layer k prunes between layers k-1 and k. Every prune gathers the hidden
    states, the rotary tables, the visual-position mask and the rows of every
    DeepStack tap; the taps are added after layers 0..n-1 at the visual
    positions still present, as Qwen3VLTextModel does.
    """
    seen = _lm_inputs(model, batch)
    lm = model.model.language_model
    hidden, positions = seen["inputs_embeds"], seen["position_ids"]
    visual, taps = seen["visual_pos_masks"], list(seen["deepstack_visual_embeds"])
    rotary = lm.rotary_emb(hidden, positions)
    items = _item_positions(batch)
    present = torch.arange(hidden.shape[1])  # original positions still in the sequence
    prunes = dict(stages)

    def prune(kept):
        nonlocal hidden, rotary, visual, taps, present
        keep = torch.ones(batch["input_ids"].shape[1], dtype=torch.bool)
        for pos, k in zip(items, kept):
            keep[pos] = False
            keep[pos[torch.tensor(k, dtype=torch.long)]] = True
        here = keep[present]
        taps = [rows[here[visual[0]]] for rows in taps]
        hidden, visual, present = hidden[:, here], visual[:, here], present[here]
        rotary = tuple(t[:, here] for t in rotary)

    def causal():
        return create_causal_mask(
            config=lm.config, inputs_embeds=hidden, attention_mask=torch.ones(1, hidden.shape[1]), cache=None, position_ids=None
        )

    with torch.no_grad():
        if 0 in prunes:
            prune(prunes[0])
        mask = causal()
        for i, layer in enumerate(lm.layers):
            if i and i in prunes:
                prune(prunes[i])
                mask = causal()
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=None)
            if i < len(taps):
                hidden = hidden.clone()
                hidden[visual] = hidden[visual] + taps[i]
        return model.lm_head(lm.norm(hidden))


def _kept(report: dict, stage: str) -> list[list[int]]:
    return [image["stages"][stage]["kept"] for image in report["samples"][0]["images"]]


@pytest.fixture(params=FAMILIES)
def q3(request):
    return request.param


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("at_layer", [None, 1, 2])
def test_identity_at_full_budget(q3, attn, at_layer):
    model = model_for(q3, attn)
    batch = make_inputs(model, MIXED)
    ref = model(**batch).logits
    vtprune.wrap(model, Random(keep=1.0, at_layer=at_layer))
    valid = batch["attention_mask"].bool()
    assert torch.equal(model(**batch).logits[valid], ref[valid])


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_projector_stage_equals_the_language_model_on_hand_gathered_inputs(q3, attn):
    """The reference gathers the kept rows of every DeepStack tap and shortens visual_pos_masks itself."""
    model = model_for(q3, attn)
    batch = make_inputs(model, [ONE])
    vtprune.wrap(model, Random(keep=5, seed=2))
    pruned = model(**batch, use_cache=False).logits
    kept = _kept(vtprune.report(model).to_dict(), "projector")
    vtprune.unwrap(model)
    assert [len(k) for k in kept] == [5, 5, 5]
    torch.testing.assert_close(pruned, _by_hand(model, batch, [(0, kept)]), rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("at_layer", [1, 2, 3])
def test_llm_stage_inside_the_deepstack_range_equals_decoder_layers_by_hand(q3, attn, at_layer):
    """Pruning before layer 1 or 2 leaves taps to add after it: they go to the kept rows only (3: after the last tap)."""
    model = model_for(q3, attn)
    batch = make_inputs(model, [ONE])
    vtprune.wrap(model, Random(keep=4, at_layer=at_layer, seed=5))
    pruned = model(**batch, use_cache=False).logits
    kept = _kept(vtprune.report(model).to_dict(), f"llm@{at_layer}")
    vtprune.unwrap(model)
    torch.testing.assert_close(pruned, _by_hand(model, batch, [(at_layer, kept)]), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_projector_then_two_llm_prunes_inside_the_deepstack_range_by_hand(q3):
    model = model_for(q3, "sdpa")
    batch = make_inputs(model, [ONE])
    vtprune.wrap(
        model, Pipeline([Random(keep=10, seed=1), Random(keep=6, at_layer=1, seed=2), Random(keep=2, at_layer=2, seed=3)])
    )
    pruned = model(**batch, use_cache=False).logits
    data = vtprune.report(model).to_dict()
    vtprune.unwrap(model)
    stages = [(0, _kept(data, "projector")), (1, _kept(data, "llm@1")), (2, _kept(data, "llm@2"))]
    torch.testing.assert_close(pruned, _by_hand(model, batch, stages), rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize(
    "policy",
    [Random(keep=3, seed=3), Random(keep=3, at_layer=1, seed=3), Pipeline([Random(keep=6), Random(keep=2, at_layer=2, seed=4)])],
    ids=["projector", "llm@1", "projector+llm@2"],
)
def test_batch_equals_each_alone_and_cache_equals_no_cache(q3, policy):
    model = model_for(q3, "sdpa")
    batch = make_inputs(model, MIXED)
    vtprune.wrap(model, policy)
    together = model(**batch).logits[:, -1]
    kw = gen_kwargs(4)
    generated = model.generate(**batch, **kw)
    assert torch.equal(generated, model.generate(**batch, use_cache=False, **kw))
    for b in range(len(MIXED)):
        alone = sample_alone(batch, b, q3)
        torch.testing.assert_close(model(**alone).logits[0, -1], together[b], rtol=1e-4, atol=1e-5)
        assert torch.equal(model.generate(**alone, **kw)[0, -4:], generated[b, -4:])


def _cache_lengths(model, batch) -> list[int]:
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    return [layer.keys.shape[-2] for layer in out.cache.layers]


@torch.no_grad()
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_kv_cache_of_every_layer_holds_text_and_kept_tokens(policy):
    """Per layer, the cache is as long as the longest sample's text plus the visual tokens kept up to that layer."""
    model = model_for("qwen3_vl", "sdpa")
    batch = make_inputs(model, MIXED)
    vtprune.wrap(model, POLICIES[policy](3))
    lengths = _cache_lengths(model, batch)
    samples = vtprune.report(model).to_dict()["samples"]
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    text = (valid & (ids != IMAGE_TOKEN) & (ids != VIDEO_TOKEN)).sum(1)
    for layer, length in enumerate(lengths):
        per_sample = []
        for b, sample in enumerate(samples):
            kept = 0
            for image in sample["images"]:
                stages = [(int(k[4:]) if k.startswith("llm@") else 0, v["after"]) for k, v in image["stages"].items()]
                kept += (
                    [after for at, after in stages if at <= layer][-1]
                    if any(at <= layer for at, _ in stages)
                    else image["tokens"]
                )
            per_sample.append(int(text[b]) + kept)
        assert length == max(per_sample), (layer, length, per_sample)


@torch.no_grad()
def test_video_timestamps_are_text_and_every_frame_is_a_sub_grid():
    model = model_for("qwen3_vl", "sdpa")
    batch = make_inputs(model, [SampleSpec(videos=((6, 32, 48),), question=4)])
    ids = batch["input_ids"][0]
    layout = adapter_for(model).layouts(batch, model.model.get_input_embeddings()(batch["input_ids"]))[0]
    (video,) = layout.images
    frames = torch.nonzero(ids == VIDEO_TOKEN).flatten()
    assert video.kind == "video" and torch.equal(video.positions, frames)
    assert [(g.offset, g.height, g.width) for g in video.grids] == [(0, 4, 6), (24, 4, 6), (48, 4, 6)]
    assert int(layout.question_positions.min()) > int(frames.max())  # timestamps are not the question
    gaps = frames[1:] - frames[:-1]
    assert sorted(set(gaps.tolist())) == [1, family_spec("qwen3_vl").timestamp_tokens + 3]  # end, timestamp, start between frames
    seen = {}
    handle = model.model.language_model.layers[0].register_forward_pre_hook(lambda _m, a: seen.update(h=a[0]))
    vtprune.wrap(model, "random", keep=1)
    model(**batch)
    handle.remove()
    assert seen["h"].shape[1] == ids.numel() - frames.numel() + 1  # every timestamp token stays


@torch.no_grad()
def test_unwrap_is_bit_exact_and_unbinds_the_deepstack_method(q3):
    model = model_for(q3, "sdpa")
    batch = make_inputs(model, MIXED)
    ref = model(**batch).logits
    before = hooks_left(model)
    lm = model.model.language_model
    vtprune.wrap(model, Pipeline([Random(keep=4), Random(keep=2, at_layer=1)]))
    assert "_deepstack_process" in lm.__dict__
    assert model(**batch).logits.shape[1] < ref.shape[1]
    vtprune.unwrap(model)
    assert "_deepstack_process" not in lm.__dict__ and hooks_left(model) == before
    assert torch.equal(model(**batch).logits, ref)


def test_refusals_are_clear_and_leave_the_model_untouched():
    model = model_for("qwen3_vl", "sdpa")
    for call, words in [
        (lambda: vtprune.wrap(model, "random", keep=4, positions="compact"), "M-RoPE"),
        (lambda: vtprune.wrap(model, "visionzip", keep=4, dominant_score="cls"), "CLS"),
        # the zoo's reference layers are Qwen3-VL-8B's (ViT block 14, decoder layers 8/10/14): past the tiny model
        (lambda: vtprune.wrap(model, "hiprune", keep=4), "object_layer"),
        (lambda: vtprune.wrap(model, "transprune"), "layer"),
    ]:
        with pytest.raises(ValueError, match=words):
            call()
        assert not vtprune.is_wrapped(model) and "_deepstack_process" not in model.model.language_model.__dict__


def test_mm_token_type_ids_are_required_as_by_the_model():
    model = model_for("qwen3_vl", "sdpa")
    batch = make_inputs(model, [ONE])
    batch.pop("mm_token_type_ids")
    vtprune.wrap(model, "random", keep=4)
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**batch)


@torch.no_grad()
@pytest.mark.parametrize("family, layers, vision_layers", [("qwen3_vl", 36, 27), ("qwen3_vl_moe", 48, 27)])
def test_zoo_defaults_bind_at_the_released_depth(family, layers, vision_layers):
    """Every layer the zoo names for the family fits Qwen3-VL-8B (36 layers, 27 ViT blocks) / 30B-A3B (48)."""
    from vtprune.zoo import policy_defaults

    model = model_for(
        family,
        "sdpa",
        layers=layers,
        vision_layers=vision_layers,
        hidden=32,
        heads=2,
        kv_heads=1,
        intermediate=32,
        vision_hidden=16,
    )
    batch = make_inputs(model, [SampleSpec(images=((32, 32),), question=4)])
    for name in ("hiprune", "visionzip", "fastv", "transprune", "entropyprune", "mmtok", "dart", "pdrop"):
        defaults = policy_defaults(family, name)
        assert defaults, name
        vtprune.wrap(model, name, **({} if name in ("transprune", "pdrop") else {"keep": 4}))
        resolved = vtprune.report(model).config
        assert {key: resolved[key] for key in defaults} == defaults, name
        model(**batch)
    vtprune.unwrap(model)


@torch.no_grad()
def test_deepstack_binding_follows_each_thread_and_each_copy():
    """The bound _deepstack_process reads the running call's state: two threads and a deep copy stay apart."""
    import copy
    from concurrent.futures import ThreadPoolExecutor

    model = model_for("qwen3_vl", "sdpa")
    vtprune.wrap(model, Random(keep=3, at_layer=1, seed=7))
    batches = [make_inputs(model, [ONE]), make_inputs(model, MIXED)]
    alone = [model(**b).logits for b in batches]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            results = list(pool.map(lambda b: model(**b).logits, batches * 2))
            for got, want in zip(results, alone * 2):
                assert torch.equal(got, want)
    clone = copy.deepcopy(model)
    bound = clone.model.language_model.__dict__["_deepstack_process"]
    assert bound.__self__ is clone.model.language_model
    assert torch.equal(clone(**batches[1]).logits, alone[1])
