"""The video policies (EVS, VidCom2, DyCoke) on every video-capable family: SPEC section 5 invariants.

Keep sets are checked against the selection functions (themselves checked
against brute-force oracles in test_video_ops.py) applied to the language
model's input embeddings at each video's patch positions, found from the
token ids and the newline vector, independently of the adapters.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    SampleSpec,
    gen_kwargs,
    hooks_left,
    inputs,
    model_for,
    patch_positions,
    sample_alone,
)

import vtprune
from vtprune.ops.video import dycoke_count, dycoke_select, evs_count, evs_select, vidcom2_select, vidcom2_target
from vtprune.policies import DyCoke, Pipeline, Random, VidCom2
from vtprune.policies.video import EVS

VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "llava_onevision")

POLICIES = {
    "evs": lambda k: EVS(keep=k),
    "evs_merger": lambda k: EVS(keep=k, deepstack=False),
    "vidcom2": lambda k: VidCom2(keep=k),
    "vidcom2_exact": lambda k: VidCom2(keep=k, budget="exact"),
    "dycoke": lambda k: DyCoke(keep=k),
}
SELECT = {
    "evs": evs_select,
    "evs_merger": evs_select,
    "vidcom2": lambda x, k: vidcom2_select(x, k, "reference"),
    "vidcom2_exact": lambda x, k: vidcom2_select(x, k, "exact"),
    "dycoke": dycoke_select,
}


@pytest.fixture(params=VIDEO_FAMILIES)
def vfamily(request):
    return request.param


def specs(family):
    """Unequal samples: a video beside an image, two videos, a video alone with other padding, no video."""
    if family == "llava_onevision":  # its videos share one frame count in a batch
        return [SampleSpec(images=((32, 32),), videos=((8, 32, 32),)),
                SampleSpec(videos=((8, 32, 32), (8, 32, 32)), prefix=6),
                SampleSpec(images=((32, 32),), question=3)]
    return [SampleSpec(images=((32, 32),), videos=((8, 32, 32),)),
            SampleSpec(videos=((6, 32, 24), (4, 32, 32)), prefix=6),
            SampleSpec(images=((32, 24),), question=3)]


def frames_of(model, spec_videos):
    """T per video: Qwen's temporal slots of two input frames, or LLaVA-OneVision's frames."""
    per_slot = getattr(getattr(model.config, "vision_config", None), "temporal_patch_size", 1) or 1
    return [t // per_slot for t, _, _ in spec_videos]


@torch.no_grad()
def lm_inputs(model, batch):
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    model(**batch)
    handle.remove()
    return seen


def videos_of(model, batch, b, spec):
    """Sample b's videos as (sequence positions, T, P), from the token ids and the newline vector."""
    patches = patch_positions(model, batch, b)
    video = patches[batch["input_ids"][b, patches] == VIDEO_TOKEN]
    out, start = [], 0
    for t, n in zip(frames_of(model, spec.videos), _video_sizes(model, batch, b, spec)):
        out.append((video[start:start + n], t, n // t))
        start += n
    assert start == video.numel()
    return out


def _video_sizes(model, batch, b, spec):
    ids = batch["input_ids"][b]
    patches = patch_positions(model, batch, b)
    total = int((ids[patches] == VIDEO_TOKEN).sum())
    ts = frames_of(model, spec.videos)
    if model.config.model_type == "llava_onevision":
        return [total // len(ts)] * len(ts) if ts else []
    return [t * (h // 8) * (w // 8) for t, (_, h, w) in zip(ts, spec.videos)]  # patch 4, merge 2


def expected_keep(policy, family, seen, b, positions, t, p, keep):
    x = seen["inputs_embeds"][b, positions]
    if policy == "evs" and seen.get("deepstack_visual_embeds") is not None:  # Qwen3-VL: merger | DeepStack levels
        mask = seen["visual_pos_masks"]
        row = torch.cumsum(mask.flatten().long(), 0) - 1
        rows = row[b * mask.shape[1] + positions]
        x = torch.cat([x, *(lv[rows] for lv in seen["deepstack_visual_embeds"])], dim=-1)
    return SELECT[policy](x.reshape(t, p, -1), keep).tolist()


@torch.no_grad()
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_keep_sets_images_untouched_and_budgets(vfamily, policy):
    model = model_for(vfamily, "sdpa")
    sp = specs(vfamily)
    batch = inputs(model, sp)
    seen = lm_inputs(model, batch)
    keep = 0.3
    vtprune.wrap(model, POLICIES[policy](keep))
    model(**batch)
    data = vtprune.report(model).to_dict()
    vtprune.unwrap(model)
    for b, spec in enumerate(sp):
        images = data["samples"][b]["images"]
        assert [i["kind"] for i in images] == ["image"] * len(spec.images) + ["video"] * len(spec.videos)
        for image in images[: len(spec.images)]:
            assert image["stages"]["projector"]["kept"] == list(range(image["tokens"]))
        for image, (positions, t, p) in zip(images[len(spec.images):], videos_of(model, batch, b, spec)):
            stage = image["stages"]["projector"]
            assert image["tokens"] == t * p and stage["before"] == t * p
            want = expected_keep(policy, vfamily, seen, b, positions, t, p, keep)
            assert stage["kept"] == want
            assert stage["frames"] == torch.bincount(torch.tensor(want) // p, minlength=t).tolist()
            assert stage["frames_before"] == [p] * t
            count = {"evs": evs_count(t, p, keep), "evs_merger": evs_count(t, p, keep),
                     "vidcom2_exact": vidcom2_target(t, p, keep)}.get(policy)
            if policy == "dycoke":
                pruned = t // 2 + len(range(0, t - 4, 4))
                count = (t - pruned) * p + pruned * dycoke_count(t, p, keep)
            if count is not None:
                assert stage["after"] == count


@torch.no_grad()
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_full_budget_is_the_identity_and_unwrap_restores(vfamily, policy):
    model = model_for(vfamily, "sdpa")
    batch = inputs(model, specs(vfamily))
    ref = model(**batch).logits
    before = hooks_left(model)  # transformers' own output-recording hooks, installed by the first forward
    vtprune.wrap(model, POLICIES[policy](1.0))
    out = model(**batch).logits
    valid = batch["attention_mask"].bool()
    assert torch.equal(out[valid], ref[valid])
    vtprune.wrap(model, POLICIES[policy](0.25))
    assert not torch.allclose(model(**batch).logits[:, -1], ref[:, -1])  # pruned: the sequence is shorter
    vtprune.unwrap(model)
    assert torch.equal(model(**batch).logits, ref) and hooks_left(model) == before


@torch.no_grad()
@pytest.mark.parametrize("policy", ["evs", "vidcom2", "dycoke"])
def test_projector_stage_equals_hand_pruned_inputs(vfamily, policy):
    model = model_for(vfamily, "eager")
    spec = SampleSpec(images=((32, 32),), videos=((8, 32, 32), (4, 32, 32)))
    if vfamily == "llava_onevision":
        spec = SampleSpec(images=((32, 32),), videos=((8, 32, 32),))
    batch = inputs(model, [spec])
    seen = lm_inputs(model, batch)
    embeds = seen["inputs_embeds"]
    positions = seen.get("position_ids")
    if positions is None:
        positions = torch.arange(embeds.shape[1]).unsqueeze(0)
    vtprune.wrap(model, POLICIES[policy](0.3))
    pruned = model(**batch, use_cache=False).logits
    images = vtprune.report(model).to_dict()["samples"][0]["images"]
    vtprune.unwrap(model)

    keep = torch.ones(embeds.shape[1], dtype=torch.bool)
    for positions_v, _, _ in videos_of(model, batch, 0, spec):
        keep[positions_v] = False
    for image, (positions_v, _, _) in zip(images[1:], videos_of(model, batch, 0, spec)):
        keep[positions_v[image["stages"]["projector"]["kept"]]] = True
    assert int((~keep).sum()) > 0
    seq = torch.nonzero(keep).flatten()
    deepstack = {}
    if seen.get("visual_pos_masks") is not None:
        mask = seen["visual_pos_masks"]
        deepstack = dict(visual_pos_masks=mask[:, seq],
                         deepstack_visual_embeds=[rows[keep[mask[0]]] for rows in seen["deepstack_visual_embeds"]])
    out = model.model.language_model(inputs_embeds=embeds[:, seq], position_ids=positions[..., seq],
                                     attention_mask=torch.ones(1, seq.numel(), dtype=torch.long), use_cache=False,
                                     **deepstack)
    torch.testing.assert_close(pruned, model.lm_head(out.last_hidden_state), rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa", "vtprune_noweights"])
@pytest.mark.parametrize("policy", ["evs", "vidcom2_exact", "dycoke"])
def test_generate_with_cache_equals_recomputation(vfamily, attn, policy):
    model = model_for(vfamily, attn)
    batch = inputs(model, specs(vfamily))
    vtprune.wrap(model, POLICIES[policy](0.3))
    kw = gen_kwargs(4)
    cached = model.generate(**batch, **kw)
    assert torch.equal(cached, model.generate(**batch, use_cache=False, **kw))


@torch.no_grad()
@pytest.mark.parametrize("policy", ["evs", "vidcom2", "dycoke"])
def test_batch_equals_one_by_one(vfamily, policy):
    model = model_for(vfamily, "sdpa")
    batch = inputs(model, specs(vfamily))
    vtprune.wrap(model, POLICIES[policy](0.3))
    together = model(**batch).logits[:, -1]
    kept = [[i["stages"]["projector"]["kept"] for i in s["images"]] for s in vtprune.report(model).to_dict()["samples"]]
    for b in range(batch["input_ids"].shape[0]):
        alone = model(**sample_alone(batch, b, vfamily)).logits[:, -1]
        assert [i["stages"]["projector"]["kept"] for i in vtprune.report(model).to_dict()["samples"][0]["images"]] == kept[b]
        torch.testing.assert_close(alone[0], together[b], rtol=1e-4, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("policy", ["evs", "vidcom2", "dycoke"])
def test_selections_do_not_depend_on_the_attention_backend(vfamily, policy):
    picks = []
    for attn in ("eager", "sdpa", "vtprune_noweights"):
        model = model_for(vfamily, attn)
        vtprune.wrap(model, POLICIES[policy](0.3))
        model(**inputs(model, specs(vfamily)))
        picks.append([[i["stages"]["projector"]["kept"] for i in s["images"]]
                      for s in vtprune.report(model).to_dict()["samples"]])
    assert picks[0] == picks[1] == picks[2]


@torch.no_grad()
def test_evs_deepstack_option_changes_the_scores_on_qwen3_vl_only():
    for family, differs in (("qwen3_vl", True), ("qwen3_5", False), ("qwen2_5_vl", False)):
        model = model_for(family, "sdpa")
        batch = inputs(model, [SampleSpec(videos=((16, 32, 32),))])
        kept = []
        for deepstack in (True, False):
            vtprune.wrap(model, EVS(keep=0.4, deepstack=deepstack))
            model(**batch)
            kept.append(vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]["projector"]["kept"])
        assert (kept[0] != kept[1]) == differs, family


@torch.no_grad()
def test_images_are_pruned_by_an_image_policy_after_the_video_policy():
    model = model_for("qwen2_5_vl", "sdpa")
    batch = inputs(model, [SampleSpec(images=((32, 32),), videos=((8, 32, 32),))])
    vtprune.wrap(model, Pipeline([EVS(keep=0.5), Random(keep=4, at_layer=2)]))
    model(**batch)
    image, video = vtprune.report(model).to_dict()["samples"][0]["images"]
    assert image["stages"]["projector"]["after"] == 16 and image["stages"]["llm@2"]["after"] == 4
    assert video["stages"]["projector"]["after"] == 32 and video["stages"]["llm@2"]["after"] == 4
    assert int((batch["input_ids"] == IMAGE_TOKEN).sum()) == 16


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="budget"):
        VidCom2(budget="exactly")
    with pytest.raises(TypeError, match="deepstack"):
        EVS(deepstack="yes")
    with pytest.raises(ValueError, match="keep"):
        DyCoke(keep=1.5)
    with pytest.raises(ValueError, match="first in a Pipeline"):
        Pipeline([Random(keep=4), EVS(keep=0.5)])
    assert {"evs", "vidcom2", "dycoke"} <= set(vtprune.available_policies())


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_a_family_without_videos_is_refused_and_left_untouched(family):
    model = model_for(family, "sdpa")
    for policy in ("evs", "vidcom2", "dycoke"):
        with pytest.raises(ValueError, match="takes none"):
            vtprune.wrap(model, policy, keep=0.25)
    assert hooks_left(model) == []


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_video_bench_inputs_are_a_panning_video_the_model_reads(family):
    from vtprune.eval.video_bench import markdown, onevision_video_inputs, pan, qwen_video_inputs

    frames = pan(frames=4, side=32, shift=8)
    assert len(frames) == 4 and frames[0].shape == (32, 32, 3)
    assert not (frames[0] == frames[1]).all()  # the window moves
    model = model_for(family, "sdpa")
    if family == "llava_onevision":
        inputs_ = onevision_video_inputs(model, frames)
    else:
        inputs_ = qwen_video_inputs(model, frames)
    vtprune.wrap(model, EVS(keep=0.5))
    model(**inputs_)
    (video,) = vtprune.report(model).to_dict()["samples"][0]["images"]
    t = 4 if family == "llava_onevision" else 2
    stage = video["stages"]["projector"]
    assert video["kind"] == "video" and len(stage["frames"]) == t
    assert stage["after"] == evs_count(t, video["tokens"] // t, 0.5)
    row = dict(family=family, policy="evs", keep=0.5, tokens_before=video["tokens"], tokens_after=stage["after"],
               prefill_unpruned_ms=2.0, prefill_ms=1.0, speedup=2.0, selection_ms=0.1)
    assert "| 2.00x |" in markdown([row])


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen3_vl", "llava_onevision"])
def test_low_precision_models_select_and_generate(family):
    model = model_for(family, "sdpa").to(torch.bfloat16)
    batch = inputs(model, specs(family))
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    batch["pixel_values_videos"] = batch["pixel_values_videos"].to(torch.bfloat16)
    for policy in ("evs", "vidcom2_exact", "dycoke"):
        vtprune.wrap(model, POLICIES[policy](0.3))
        out = model.generate(**batch, **gen_kwargs(2))
        assert out.shape[1] == batch["input_ids"].shape[1] + 2
        videos = [i for s in vtprune.report(model).to_dict()["samples"] for i in s["images"] if i["kind"] == "video"]
        assert videos and all(0 < v["stages"]["projector"]["after"] < v["tokens"] for v in videos)
