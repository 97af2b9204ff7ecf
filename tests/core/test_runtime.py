"""The runtime under real use: bound plans, per-call state, threads, copies, grad, caches (issue 11)."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading

import pytest
import torch
from families.test_policies_models import POLICIES
from families.test_policies_models import make as make_policy
from helpers import QWEN, gen_kwargs, inputs, mixed_specs, model_for, single_spec

import vtprune
from vtprune.patches import adapter_for
from vtprune.policies import EntropyPrune, Fixed, HiPrune, IDPruner, Pipeline, Pooling, Random, VisionZip
from vtprune.sequence import Sequence, SequenceTensor


def _kept(model):
    """Kept indices of every image and stage of the last call (timings left out)."""
    return [
        [{k: v["kept"] for k, v in image["stages"].items()} for image in s["images"]]
        for s in vtprune.report(model).to_dict()["samples"]
    ]


def _run(model, batch):
    with torch.no_grad():
        return model(**batch).logits, _kept(model)


# --- one policy object, several models ------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: EntropyPrune(keep=3),
        lambda: IDPruner(keep=3),
        lambda: VisionZip(keep=4),
        lambda: HiPrune(keep=3, object_layer=1),
    ],
    ids=["entropyprune", "idpruner", "visionzip", "hiprune"],
)
def test_one_policy_object_on_two_families(make):
    policy = make()
    before = copy.deepcopy(policy.to_dict())
    llava, qwen = model_for("llava"), model_for("qwen2_5_vl")
    llava_batch, qwen_batch = inputs(llava, mixed_specs("llava")), inputs(qwen, mixed_specs("qwen2_5_vl"))
    vtprune.wrap(llava, make())
    want = _run(llava, llava_batch)
    vtprune.unwrap(llava)

    vtprune.wrap(llava, policy)
    vtprune.wrap(qwen, policy)
    got_llava, got_qwen = _run(llava, llava_batch), _run(qwen, qwen_batch)
    assert torch.equal(got_llava[0], want[0]) and got_llava[1] == want[1]
    vtprune.unwrap(qwen)
    vtprune.wrap(qwen, make())
    fresh_qwen = _run(qwen, qwen_batch)
    assert torch.equal(got_qwen[0], fresh_qwen[0]) and got_qwen[1] == fresh_qwen[1]
    assert policy.to_dict() == before and policy == make()


def test_policies_are_immutable_hashable_configurations():
    a, b = EntropyPrune(keep=8), EntropyPrune(keep=8)
    assert a == b and hash(a) == hash(b) and len({a, b, EntropyPrune(keep=9)}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.keep = 4
    assert a.to_dict() == {"name": "entropyprune", "keep": 8, "at_layer": None, "normalize": None, "average": False}
    fixed = Fixed(kept=[[[3, 1]]])
    assert fixed.kept == (((1, 3),),) and hash(fixed) == hash(Fixed(kept=(((1, 3),),)))
    pipeline = Pipeline([Pooling(keep=6), Random(keep=2, at_layer=1)])
    assert hash(pipeline) == hash(Pipeline([Pooling(keep=6), Random(keep=2, at_layer=1)]))
    assert pipeline.to_dict()["policies"][1] == {
        "name": "random",
        "keep": 2,
        "seed": 0,
        "at_layer": 1,
        "where": None,
        "vit_layer": None,
    }


def test_report_records_the_bound_configuration():
    model = model_for("llava")
    vtprune.wrap(model, "entropyprune", keep=3)
    with torch.no_grad():
        model(**inputs(model, [single_spec("llava")]))
    config = vtprune.report(model).to_dict()["config"]
    assert config["name"] == "entropyprune" and config["at_layer"] == 2 and config["positions"] == "original"
    json.dumps(vtprune.report(model).to_dict())


# --- per-call state ----------------------------------------------------------------------------------


def test_two_threads_on_one_model_equal_one_thread(family):
    model = model_for(family)
    batches = [inputs(model, mixed_specs(family)), inputs(model, [single_spec(family)], seed=1)]
    vtprune.wrap(model, Pipeline([Random(keep=3, seed=1), Random(keep=2, at_layer=2)]))
    with torch.no_grad():
        want = [model(**b).logits for b in batches]
        want_gen = [model.generate(**b, **gen_kwargs(2)) for b in batches]
    errors, results = [], {}

    def work(t):
        try:
            with torch.no_grad():
                for step in range(4):
                    j = (t + step) % 2
                    results[t, step] = (j, model(**batches[j]).logits, model.generate(**batches[j], **gen_kwargs(2)))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 8
    for j, logits, gen in results.values():
        assert torch.equal(logits, want[j]) and torch.equal(gen, want_gen[j])


def test_deepcopy_is_an_independent_wrapped_model(family):
    model = model_for(family)
    batch = inputs(model, [single_spec(family)])
    vtprune.wrap(model, "random", keep=3)
    ref, _ = _run(model, batch)
    clone = copy.deepcopy(model)
    assert vtprune.is_wrapped(clone) and vtprune.is_wrapped(model)
    assert torch.equal(_run(clone, batch)[0], ref)
    with torch.no_grad():
        for p in model.model.language_model.layers.parameters():  # the original's decoder only
            p.mul_(0.5)
    assert torch.equal(_run(clone, batch)[0], ref)
    changed, _ = _run(model, batch)
    assert not torch.equal(changed, ref)
    with torch.no_grad():
        for p in clone.model.language_model.layers.parameters():
            p.mul_(0.5)
    assert torch.equal(_run(clone, batch)[0], changed)
    vtprune.unwrap(clone)
    assert not {"generate", "__deepcopy__", "_expand_inputs_for_generation"} & set(clone.__dict__)
    with torch.no_grad():
        assert clone(**batch).logits.shape[1] == batch["input_ids"].shape[1]  # unwrapped: nothing pruned


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_forward_with_autograd_equals_no_grad(family, policy):
    model = model_for(family)
    batch = inputs(model, mixed_specs(family))
    vtprune.wrap(model, make_policy(policy, 3, family))
    with torch.no_grad():
        want = model(**batch).logits
        kept = _kept(model)
    got = model(**batch).logits
    assert got.requires_grad
    assert torch.equal(got.detach(), want) and _kept(model) == kept


@torch.no_grad()
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_generate_without_cache_equals_cached_for_every_policy(family, policy):
    """Cached == uncached generation without replaying keep sets through `fixed`: generate selects once per call."""
    model = model_for(family)
    batch = inputs(model, mixed_specs(family))
    vtprune.wrap(model, make_policy(policy, 3, family))
    kw = gen_kwargs(4)
    cached = model.generate(**batch, **kw)
    kept = _kept(model)
    assert torch.equal(model.generate(**batch, use_cache=False, **kw), cached)
    assert _kept(model) == kept  # the report is the call's selection, not a recomputation step's


@torch.no_grad()
def test_encoder_called_directly_between_calls_does_not_leak():
    model = model_for("llava_next")
    batch = inputs(model, mixed_specs("llava_next"))
    vtprune.wrap(model, "random", keep=3)
    want = model.generate(**batch, **gen_kwargs(3))
    kept = _kept(model)
    one = inputs(model, [single_spec("llava_next")], seed=3)
    model.model.get_image_features(pixel_values=one["pixel_values"], image_sizes=one["image_sizes"])
    model.get_image_features(pixel_values=one["pixel_values"], image_sizes=one["image_sizes"])
    assert torch.equal(model.generate(**batch, **gen_kwargs(3)), want)
    assert _kept(model) == kept


@torch.no_grad()
def test_report_describes_only_the_last_call(family):
    model = model_for(family)
    vtprune.wrap(model, "random", keep=2)
    model(**inputs(model, mixed_specs(family)))
    assert len(vtprune.report(model).to_dict()["samples"]) == len(mixed_specs(family))
    from vtprune.tiny import SampleSpec

    model(**inputs(model, [SampleSpec(question=5)]))
    assert vtprune.report(model).to_dict()["samples"] == [{"images": []}]
    first = model(**inputs(model, [single_spec(family)]), use_cache=True)
    stages = vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]
    nxt = first.logits[:, -1:].argmax(-1)
    model(input_ids=nxt, cache=first.cache, use_cache=True)  # a decode step: still that prefill's report
    assert vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"] == stages


# --- smaller items -----------------------------------------------------------------------------------


def test_fixed_refuses_duplicate_indices():
    with pytest.raises(ValueError, match=r"kept\[0\]\[0\] lists indices \[3\] more than once"):
        Fixed(kept=[[[1, 3, 3]]])
    with pytest.raises(TypeError, match="int grid indices"):
        Fixed(kept=[[[1, True]]])


@torch.no_grad()
@pytest.mark.parametrize("name", ["random", "pooling"])
def test_nan_pixels_warn_for_random_and_pooling(name):
    model = model_for("llava")
    batch = inputs(model, [single_spec("llava")])
    batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
    vtprune.wrap(model, name, keep=3)
    with pytest.warns(RuntimeWarning, match="NaN or inf features"):
        model(**batch)
    assert len(_kept(model)[0][0]["projector"]) == 3


def test_pipeline_order_errors_at_wrap():
    model = model_for("llava")
    for pipeline in (
        [Random(keep=4, where="vision"), HiPrune(keep=2)],
        [Random(keep=4), Pooling(keep=2)],
        [Random(keep=8, where="vision"), VisionZip(keep=4)],
    ):
        with pytest.raises(ValueError, match="whole token grid; put it first in a Pipeline"):
            vtprune.wrap(model, Pipeline(pipeline))
    assert not vtprune.is_wrapped(model)


def test_failed_rewrap_keeps_the_previous_policy(monkeypatch):
    model = model_for("llava")
    batch = inputs(model, [single_spec("llava")])
    vtprune.wrap(model, "random", keep=3)
    want = _run(model, batch)
    with pytest.raises(ValueError):
        vtprune.wrap(model, "random", keep=0)
    assert _run(model, batch)[1] == want[1]
    from vtprune.runtime import Runtime

    original, calls = Runtime._install_vision_capture, []

    def broken(self):  # the new policy's install fails half-way; the previous one reinstalls
        calls.append(self)
        if len(calls) == 1:
            raise RuntimeError("install failed")
        original(self)

    monkeypatch.setattr(Runtime, "_install_vision_capture", broken)
    with pytest.raises(RuntimeError, match="install failed"):
        vtprune.wrap(model, "random", keep=5)
    monkeypatch.undo()
    assert vtprune.is_wrapped(model) and vtprune.report(model).policy.startswith("random")
    got = _run(model, batch)
    assert torch.equal(got[0], want[0]) and got[1] == want[1]


def test_rewrap_then_unwrap_restores_the_model():
    """A model wrapped twice, then unwrapped, is the unwrapped model again (no instance attribute of vtprune left)."""
    model = model_for("llava")
    batch = inputs(model, [single_spec("llava")])
    own = set(model.__dict__)
    with torch.no_grad():
        want = model(**batch).logits
        vtprune.wrap(model, "random", keep=3)
        vtprune.wrap(model, "divprune", keep=3)  # installed over the first, which retires
        model(**batch)
        vtprune.unwrap(model)
        got = model(**batch).logits
    assert torch.equal(got, want) and set(model.__dict__) == own


@pytest.mark.parametrize(
    "make, err, words",
    [
        (lambda: Random(seed="1"), TypeError, "seed must be an int"),
        (lambda: Random(seed=1.5), TypeError, "seed must be an int"),
        (lambda: HiPrune(wrap_correct="yes"), TypeError, "wrap_correct must be True or False"),
        (lambda: IDPruner(per_image="false"), TypeError, "per_image must be True or False"),
        (lambda: VisionZip(merge_before_projector=1), TypeError, "merge_before_projector must be True, False or None"),
        (lambda: EntropyPrune(average=1), TypeError, "average must be True or False"),
        (lambda: Random(where="vision", at_layer=2), ValueError, "not both"),
        (lambda: Fixed(kept=[], where="projector", at_layer=2), ValueError, "not both"),
        (lambda: IDPruner(selector=""), ValueError, "selector='' names no directory"),
    ],
)
def test_strict_option_checks(make, err, words):
    with pytest.raises(err, match=words):
        make()


@pytest.mark.parametrize(
    "config, weights, words",
    [
        (b"\xff\xfe not utf-8", None, "config.json' is not valid JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (json.dumps({"in_features": 16, "hidden_dim": 6}).encode(), b"not a safetensors file", "w.safetensors' are not"),
    ],
)
def test_selector_folder_errors_name_the_file(tmp_path, config, weights, words):
    folder = tmp_path / "sel"
    folder.mkdir()
    (folder / "config.json").write_bytes(config)
    if weights is not None:
        (folder / "w.safetensors").write_bytes(weights)
    with pytest.raises(ValueError, match=words):
        IDPruner(selector=str(folder))


def test_the_vision_stage_is_a_label_of_the_projector_point():
    """``where="vision"`` selects where ``projector`` does (documented): same keep set and logits."""
    model = model_for("llava")
    batch = inputs(model, mixed_specs("llava"))
    vtprune.wrap(model, Random(keep=3, where="vision"))
    vision = _run(model, batch)
    vtprune.wrap(model, Random(keep=3))
    projector = _run(model, batch)
    assert torch.equal(vision[0], projector[0])
    assert [[s["vision"] for s in sample] for sample in vision[1]] == [
        [s["projector"] for s in sample] for sample in projector[1]
    ]


# --- the sequence object ----------------------------------------------------------------------------


def test_sequence_compact_shortens_declared_extras():
    from vtprune.layout import SampleLayout
    from vtprune.patches.base import single_grid_image

    # one sample: 2 text tokens, a 2x2 image at 2..5, 2 text tokens
    layout = SampleLayout(
        images=[single_grid_image(0, torch.arange(2, 6), 2, 2)],
        question_positions=torch.tensor([6, 7]),
        valid=torch.ones(8, dtype=torch.bool),
    )
    visual = torch.zeros(1, 8, dtype=torch.bool)
    visual[0, 2:6] = True
    features = [torch.arange(4.0)[:, None] * 10, torch.arange(4.0)[:, None] * 100]  # one row per visual token
    seq = Sequence(
        hidden=torch.arange(8.0).view(1, 8, 1),
        mask2d=torch.ones(1, 8, dtype=torch.long),
        position_ids=torch.arange(8).view(1, 8),
        alive=[[torch.arange(4)]],
        seq_positions=[[torch.arange(2, 6)]],
        question_positions=[torch.tensor([6, 7])],
        extras={"visual_pos_masks": visual, "deepstack": features},
    )
    declared = (SequenceTensor("visual_pos_masks"), SequenceTensor("deepstack", dim=0, rows_of="visual_pos_masks"))
    short, index = seq.compact(
        [layout], [[torch.tensor([1, 3])]], [[torch.tensor([3, 5])]], pad_left=True, compact_positions=False, declared=declared
    )
    assert index.tolist() == [[0, 1, 3, 5, 6, 7]]
    assert short.hidden.flatten().tolist() == [0, 1, 3, 5, 6, 7]
    assert short.position_ids.tolist() == [[0, 1, 3, 5, 6, 7]]
    assert short.extras["visual_pos_masks"].tolist() == [[False, False, True, True, False, False]]
    assert [f.flatten().tolist() for f in short.extras["deepstack"]] == [[10, 30], [100, 300]]
    assert short.seq_positions[0][0].tolist() == [2, 3] and short.question_positions[0].tolist() == [4, 5]


def test_family_knowledge_is_asked_of_the_adapter(family):
    adapter = adapter_for(model_for(family))
    first = adapter.attention_layers()[0]  # Qwen3.5: layer 0 is linear attention
    assert adapter.query_module(first) is adapter.decoder_layers[first].self_attn.q_proj
    assert adapter.layer_type(first) == "full_attention"
    assert family in QWEN or adapter.sequence_tensors == ()


def test_one_table_of_supported_model_types():
    """patches.ADAPTERS is the table; tiny models, fixtures, model_zoo.yaml and the eval runner follow it."""
    from vtprune import tiny, zoo
    from vtprune.eval.lmms import FAMILIES
    from vtprune.patches import ADAPTERS, supported_model_types
    from vtprune.patches import supported_model_types as fixture_types

    types = supported_model_types()
    assert types == sorted(ADAPTERS) and fixture_types() == types and sorted(tiny.FAMILIES) == types
    assert set(types) <= set(zoo.zoo()["families"]) and sorted(FAMILIES) == types
    assert set(QWEN) == {t for t in types if ADAPTERS[t].mrope}
    for model_type in types:
        assert adapter_for(tiny.tiny_model(model_type)).model_type == model_type


# --- a new family is an adapter declaration ------------------------------------------------------


def _tiny_qwen3_vl():
    """A random-weight Qwen3-VL (DeepStack) and a batch, built as the tiny Qwen2.5-VL inputs are."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from vtprune.tiny import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START, make_inputs

    torch.manual_seed(0)
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0, "mrope_interleaved": True}
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters=rope,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            max_position_embeddings=4096,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        ),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.config.model_type = "qwen2_5_vl"  # the tiny input builder lays Qwen prompts out by family name
    try:
        batch = make_inputs(model, mixed_specs("qwen2_5_vl")[:3])
    finally:
        model.config.model_type = "qwen3_vl"
    return model, batch


def test_qwen3_vl_deepstack_needs_only_an_adapter_declaration(monkeypatch):
    """DeepStack features and visual-position masks are shortened by every prune through declarations alone."""
    from vtprune import patches
    from vtprune.patches.qwen2_vl import Qwen2VLAdapter

    class Qwen3VLAdapter(Qwen2VLAdapter):  # the whole family-specific part of the runtime
        model_type = "qwen3_vl"
        sequence_tensors = (
            SequenceTensor("visual_pos_masks"),
            SequenceTensor("deepstack_visual_embeds", dim=0, rows_of="visual_pos_masks"),
        )
        sequence_methods = {
            "_deepstack_process": {"visual_pos_masks": "visual_pos_masks", "visual_embeds": "deepstack_visual_embeds"}
        }

    monkeypatch.setitem(patches.ADAPTERS, "qwen3_vl", Qwen3VLAdapter)
    model, batch = _tiny_qwen3_vl()
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    full = dict(seen)

    # projector stage == the unwrapped language model on hand-pruned inputs, DeepStack rows pruned alike
    vtprune.wrap(model, "random", keep=2, seed=4)
    with torch.no_grad():
        pruned = model(**batch, use_cache=False).logits
    kept = vtprune.report(model).to_dict()["samples"]
    vtprune.unwrap(model)
    visual = full["visual_pos_masks"]
    keep = batch["attention_mask"].bool().clone()
    keep &= ~visual
    for b, sample in enumerate(kept):
        positions = torch.nonzero(visual[b]).flatten()
        offset = 0
        for image in sample["images"]:
            keep[b, positions[offset:][image["stages"]["projector"]["kept"]]] = True
            offset += image["tokens"]
    rows = keep[visual]
    for b in range(keep.shape[0]):
        seq = torch.nonzero(keep[b]).flatten()
        first_row = int(visual[:b].sum())
        mine = rows[first_row : first_row + int(visual[b].sum())]
        with torch.no_grad():
            out = model.model.language_model(
                inputs_embeds=full["inputs_embeds"][b : b + 1, seq],
                position_ids=full["position_ids"][..., b : b + 1, seq],
                attention_mask=torch.ones(1, seq.numel(), dtype=torch.long),
                visual_pos_masks=visual[b : b + 1, seq],
                deepstack_visual_embeds=[
                    d[first_row : first_row + int(visual[b].sum())][mine] for d in full["deepstack_visual_embeds"]
                ],
                use_cache=False,
            )
            hand = model.lm_head(out.last_hidden_state)[0, -1]
        torch.testing.assert_close(pruned[b, -1], hand, rtol=1e-4, atol=1e-5)

    # llm stage inside the DeepStack layers, and after them: cache == no cache, identity at full budget
    for at_layer in (1, 3):
        vtprune.wrap(model, "random", keep=1.0, at_layer=at_layer)
        with torch.no_grad():
            same = model(**batch).logits
        with torch.no_grad():
            vtprune.unwrap(model)
            ref = model(**batch).logits
        valid = batch["attention_mask"].bool()
        assert torch.equal(same[valid], ref[valid])
        vtprune.wrap(model, "random", keep=2, at_layer=at_layer)
        with torch.no_grad():
            cached = model.generate(**batch, **gen_kwargs(3))
            assert torch.equal(model.generate(**batch, use_cache=False, **gen_kwargs(3)), cached)
        vtprune.unwrap(model)


# --- the cache argument's two names ---------------------------------------------------------------


def test_decode_step_reads_past_key_values_as_cache():
    """transformers 5.24 renames ``past_key_values`` to ``cache`` (the old name goes at 5.40): a user's
    decode step with either name continues from the pruned prefill the same way."""
    model = model_for("llava")
    batch = inputs(model, mixed_specs("llava"))
    vtprune.wrap(model, Random(keep=3, seed=0))
    steps = {}
    for name in ("cache", "past_key_values"):
        with torch.no_grad():
            out = model(**batch, use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            kept = cache.get_seq_length()
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], dim=1)
            step = model(input_ids=token, attention_mask=mask, use_cache=True, **{name: cache})
        steps[name] = (step.logits, kept, cache.get_seq_length())
    assert steps["cache"][1] < batch["input_ids"].shape[1]  # the prefill was pruned
    assert steps["cache"][2] == steps["cache"][1] + 1
    assert torch.equal(steps["cache"][0], steps["past_key_values"][0])
    assert steps["cache"][1:] == steps["past_key_values"][1:]


def test_report_describes_the_prefill_while_its_generate_runs():
    """A hook that reads report() right after a prefill (as the lmms-eval runner's log does) sees that
    prefill, the first call of a fresh wrap included, not the call before it."""
    model = model_for("llava")
    vtprune.wrap(model, Random(keep=3, seed=0))
    seen = []

    def after(_module, _args, kwargs, _out):
        if kwargs["input_ids"].shape[1] > 1:
            seen.append(vtprune.report(model).to_dict()["samples"])

    handle = model.register_forward_hook(after, with_kwargs=True)
    try:
        for specs in (single_spec("llava"), mixed_specs("llava")):
            batch = inputs(model, specs if isinstance(specs, list) else [specs])
            with torch.no_grad():
                model.generate(**batch, **gen_kwargs(2))
            assert seen[-1] == vtprune.report(model).to_dict()["samples"]
            assert len(seen[-1]) == batch["input_ids"].shape[0]
    finally:
        handle.remove()
    assert len(seen) == 2 and seen[0] != seen[1]
