"""The video policies (EVS, VidCom2, FastVID, DyCoke) on every video-capable family: the invariants every policy
keeps (budgets, identity at full budget, cache == recomputation, batch == alone, backends).

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
from vtprune.ops.video import (
    dycoke_count,
    dycoke_select,
    evs_count,
    evs_select,
    fastvid_anchor_slots,
    fastvid_apply,
    fastvid_counts,
    fastvid_qwen_budgets,
    fastvid_segments,
    vidcom2_select,
    vidcom2_target,
)
from vtprune.policies import DyCoke, FastVID, Pipeline, Random, VidCom2
from vtprune.policies.video import EVS

VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "llava_onevision")

POLICIES = {
    "evs": lambda k: EVS(keep=k),
    "evs_merger": lambda k: EVS(keep=k, deepstack=False),
    "vidcom2": lambda k: VidCom2(keep=k),
    "vidcom2_exact": lambda k: VidCom2(keep=k, budget="exact"),
    "dycoke": lambda k: DyCoke(keep=k),
    "fastvid": lambda k: FastVID(keep=k, segments=2),  # two segments: the tiny videos' 2-4 slots hold longer ones
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
        return [
            SampleSpec(images=((32, 32),), videos=((8, 32, 32),)),
            SampleSpec(videos=((8, 32, 32), (8, 32, 32)), prefix=6),
            SampleSpec(images=((32, 32),), question=3),
        ]
    return [
        SampleSpec(images=((32, 32),), videos=((8, 32, 32),)),
        SampleSpec(videos=((6, 32, 24), (4, 32, 32)), prefix=6),
        SampleSpec(images=((32, 24),), question=3),
    ]


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
        out.append((video[start : start + n], t, n // t))
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


def check_fastvid_counts(family, x, stage, keep, segments=2):
    """FastVID's kept tokens per frame and merged rows, from the budget rule on g = the frames' mean rows."""
    t, p, _ = x.shape
    g = x.float().mean(1)
    if family == "llava_onevision":
        s, c = fastvid_counts(p, keep, 0.4, t)
        slots = [min(n, p - s) for n in fastvid_anchor_slots(fastvid_segments(g, segments, 0.9), c, 4)]
        salient, context = [s] * t, slots
    else:
        _, salient, context = fastvid_qwen_budgets(g, p, keep, segments, 0.84, 0.95)
    assert stage["frames"] == [a + b for a, b in zip(salient, context)]
    assert set(stage["merged"]) <= set(stage["kept"])
    assert torch.bincount(torch.tensor(stage["merged"], dtype=torch.long) // p, minlength=t).tolist() == context


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
        for image, (positions, t, p) in zip(images[len(spec.images) :], videos_of(model, batch, b, spec)):
            stage = image["stages"]["projector"]
            assert image["tokens"] == t * p and stage["before"] == t * p
            if policy == "fastvid":  # saliency from the ViT: the counts per frame by the rule, from the frames' means
                check_fastvid_counts(vfamily, seen["inputs_embeds"][b, positions].reshape(t, p, -1), stage, keep)
                continue
            want = expected_keep(policy, vfamily, seen, b, positions, t, p, keep)
            assert stage["kept"] == want
            assert stage["frames"] == torch.bincount(torch.tensor(want) // p, minlength=t).tolist()
            assert stage["frames_before"] == [p] * t
            count = {
                "evs": evs_count(t, p, keep),
                "evs_merger": evs_count(t, p, keep),
                "vidcom2_exact": vidcom2_target(t, p, keep),
            }.get(policy)
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
@pytest.mark.parametrize("policy", ["evs", "vidcom2", "dycoke", "fastvid"])
def test_projector_stage_equals_hand_pruned_inputs(vfamily, policy, monkeypatch):
    """The pruned model == the language model fed the kept rows by hand; FastVID's merged rows (and on Qwen3-VL its
    DeepStack rows) made here from the selection's mixing entries, applied to the unwrapped model's inputs."""
    import vtprune.policies.video as video_module

    picks = []
    for name in ("fastvid_ov_select", "fastvid_qwen_select"):
        original = getattr(video_module, name)
        monkeypatch.setattr(video_module, name, lambda *a, _f=original, **k: picks.append(_f(*a, **k)) or picks[-1])
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
    levels = seen.get("deepstack_visual_embeds")
    if policy == "fastvid":  # merged rows replace their targets, in the sequence and in every DeepStack level
        embeds, levels = embeds.clone(), [lv.clone() for lv in levels] if levels is not None else None
        assert len(picks) == len(images) - 1 and all(bool(pk.merged.any()) for pk in picks)
        row = torch.cumsum(seen["visual_pos_masks"][0].long(), 0) - 1 if levels is not None else None
        for pick, (positions_v, _, _) in zip(picks, videos_of(model, batch, 0, spec)):
            embeds[0, positions_v[pick.indices]] = fastvid_apply(pick.mix, pick.indices.numel(), embeds[0, positions_v])
            for lv in levels or []:
                rows = row[positions_v]
                lv[rows[pick.indices]] = fastvid_apply(pick.mix, pick.indices.numel(), lv[rows])
    deepstack = {}
    if seen.get("visual_pos_masks") is not None:
        mask = seen["visual_pos_masks"]
        deepstack = dict(visual_pos_masks=mask[:, seq], deepstack_visual_embeds=[rows[keep[mask[0]]] for rows in levels])
    out = model.model.language_model(
        inputs_embeds=embeds[:, seq],
        position_ids=positions[..., seq],
        attention_mask=torch.ones(1, seq.numel(), dtype=torch.long),
        use_cache=False,
        **deepstack,
    )
    torch.testing.assert_close(pruned, model.lm_head(out.last_hidden_state), rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa", "vtprune_noweights"])
@pytest.mark.parametrize("policy", ["evs", "vidcom2_exact", "dycoke", "fastvid"])
def test_generate_with_cache_equals_recomputation(vfamily, attn, policy):
    model = model_for(vfamily, attn)
    batch = inputs(model, specs(vfamily))
    vtprune.wrap(model, POLICIES[policy](0.3))
    kw = gen_kwargs(4)
    cached = model.generate(**batch, **kw)
    assert torch.equal(cached, model.generate(**batch, use_cache=False, **kw))


@torch.no_grad()
@pytest.mark.parametrize("policy", ["evs", "vidcom2", "dycoke", "fastvid"])
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
@pytest.mark.parametrize("policy", ["evs", "vidcom2", "dycoke", "fastvid"])
def test_selections_do_not_depend_on_the_attention_backend(vfamily, policy):
    picks = []
    for attn in ("eager", "sdpa", "vtprune_noweights"):
        model = model_for(vfamily, attn)
        vtprune.wrap(model, POLICIES[policy](0.3))
        model(**inputs(model, specs(vfamily)))
        picks.append(
            [[i["stages"]["projector"]["kept"] for i in s["images"]] for s in vtprune.report(model).to_dict()["samples"]]
        )
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
    with pytest.raises(ValueError, match="beta"):
        FastVID(beta=1.5)
    with pytest.raises(ValueError, match="segments"):
        FastVID(segments=0)
    with pytest.raises(TypeError, match="tau"):
        FastVID(tau="0.9")
    with pytest.raises(ValueError, match="first in a Pipeline"):
        Pipeline([Random(keep=4), FastVID()])
    assert {"evs", "vidcom2", "dycoke", "fastvid"} <= set(vtprune.available_policies())


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_a_family_without_videos_is_refused_and_left_untouched(family):
    model = model_for(family, "sdpa")
    for policy in ("evs", "vidcom2", "dycoke", "fastvid"):
        with pytest.raises(ValueError, match="takes none"):
            vtprune.wrap(model, policy, keep=0.25)
    assert hooks_left(model) == []


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_video_bench_inputs_are_a_panning_video_the_model_reads(family):
    from vtprune.eval.video_bench import markdown, pan
    from vtprune.patches import family_spec, supported_video_demo

    frames = pan(frames=4, side=32, shift=8)
    assert len(frames) == 4 and frames[0].shape == (32, 32, 3)
    assert not (frames[0] == frames[1]).all()  # the window moves
    model = model_for(family, "sdpa")
    assert family in supported_video_demo()
    inputs_ = family_spec(family).demo_video(model, frames)
    vtprune.wrap(model, EVS(keep=0.5))
    model(**inputs_)
    (video,) = vtprune.report(model).to_dict()["samples"][0]["images"]
    t = 4 if family == "llava_onevision" else 2
    stage = video["stages"]["projector"]
    assert video["kind"] == "video" and len(stage["frames"]) == t
    assert stage["after"] == evs_count(t, video["tokens"] // t, 0.5)
    row = dict(
        family=family,
        policy="evs",
        keep=0.5,
        tokens_before=video["tokens"],
        tokens_after=stage["after"],
        prefill_unpruned_ms=2.0,
        prefill_ms=1.0,
        speedup=2.0,
        selection_ms=0.1,
    )
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


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_fastvid_qwen_saliency_is_the_last_blocks_frame_query_attention(family, monkeypatch):
    """The saliency FastVID reads on Qwen == the official formula on the last ViT block's input: per frame and head,
    the mean rotated query against each 2 x 2 unit's mean rotated key, softmax over units, mean over heads."""
    import importlib

    import vtprune.policies.video as video_module

    seen, got = {}, []
    original = video_module.fastvid_qwen_select
    monkeypatch.setattr(video_module, "fastvid_qwen_select", lambda *a, **k: got.append(a[2]) or original(*a, **k))
    model = model_for(family, "sdpa")
    block = model.model.visual.blocks[-1]
    handle = block.register_forward_pre_hook(lambda _m, a, kw: seen.setdefault("call", (a, kw)), with_kwargs=True)
    batch = inputs(model, [SampleSpec(videos=((8, 32, 32),))])
    vtprune.wrap(model, FastVID(keep=0.5))
    model(**batch)
    handle.remove()
    args, kw = seen["call"]
    hidden = args[0] if args else kw["hidden_states"]
    rope = importlib.import_module(f"transformers.models.{family}.modeling_{family}").apply_rotary_pos_emb_vision
    heads = block.attn.num_heads
    q, k, _ = block.attn.qkv(block.norm1(hidden)).reshape(hidden.shape[0], 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rope(q, k, *kw["position_embeddings"])
    t, hw = 4, 64  # 8 input frames = 4 slots of 8 x 8 patches
    q = q.transpose(0, 1).reshape(heads, t, hw, -1).mean(-2, keepdim=True).float()
    k = k.transpose(0, 1).reshape(heads, t, hw // 4, 4, -1).mean(-2).float()
    want = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(dim=-1).mean(2).mean(0)
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_fastvid_is_seeded_and_leaves_the_global_rng_alone(family):
    model = model_for(family, "sdpa")
    batch = inputs(model, specs(family))
    kept = {}
    for global_seed, seed in ((1, 0), (2, 0), (1, 5)):
        vtprune.wrap(model, FastVID(keep=0.5, segments=2, seed=seed))
        torch.manual_seed(global_seed)
        want = torch.rand(3)
        torch.manual_seed(global_seed)
        model(**batch)
        assert torch.equal(torch.rand(3), want)  # the density noise came from its own stream
        kept[(global_seed, seed)] = [
            [i["stages"]["projector"]["kept"] for i in s["images"]] for s in vtprune.report(model).to_dict()["samples"]
        ]
    assert kept[(1, 0)] == kept[(2, 0)]  # the same seed, whatever the global RNG
