"""LLaVA-OneVision: layout, newlines, SigLIP scores and refusals, against the model itself.

The family-generic invariants (identity, hand-pruned equivalence, cache, batch == alone, unwrap, budgets, every
policy) run on llava_onevision through the conftest `family` fixture; these tests cover what only this family has:
anyres views the model shrinks (anyres_max), a base view plus one newline per image of a multi-image prompt, pooled
video frames with one newline, a SigLIP tower without CLS.
"""

from __future__ import annotations

import pytest
import torch
from helpers import gen_kwargs, inputs, lm_input_embeds, mixed_specs, model_for, patch_positions
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import vtprune
from vtprune.ops.leaders import prunesid_qwen_budget
from vtprune.ops.select import topk_indices
from vtprune.ops.sparsevlm import counts_after, stage_counts
from vtprune.patches import adapter_for
from vtprune.policies import HiPrune, Random, VisionZip
from vtprune.tiny import IMAGE_TOKEN, VIDEO_TOKEN, Geometry, SampleSpec, make_inputs, tiny_config

FAMILY = "llava_onevision"
#: one image with anyres crops that the model shrinks (64 x 64: a 2 x 2 grid of 16 x 16 -> 11 x 11), then a video
SHRUNK_AND_VIDEO = SampleSpec(images=((64, 64),), videos=((2, 32, 32),), question=3)


def _layouts(model, batch):
    return adapter_for(model).layouts(dict(batch), lm_input_embeds(model, batch))


@torch.no_grad()
def test_layout_is_the_models_own():
    """Patch and newline positions cover every placeholder; newlines are where the model put `image_newline`."""
    model = model_for(FAMILY)
    batch = inputs(model, mixed_specs(FAMILY))
    layouts = _layouts(model, batch)
    embeds = lm_input_embeds(model, batch)
    for b, sample in enumerate(layouts):
        ids = batch["input_ids"][b]
        visual = torch.nonzero((ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)).flatten()
        newline = visual[(embeds[b, visual] == model.model.image_newline).all(-1)]
        mine = torch.cat([img.newline_positions for img in sample.images]) if sample.images else visual[:0]
        assert torch.equal(torch.sort(mine).values, newline)
        assert torch.equal(torch.sort(torch.cat([sample.visual_positions, mine])).values, visual)
        assert torch.equal(sample.visual_positions, patch_positions(model, batch, b))
    shapes = [
        [(img.kind, [(g.height, g.width) for g in img.grids], img.newline_positions.numel()) for img in s.images] for s in layouts
    ]
    assert shapes == [
        [("image", [(8, 8), (8, 12)], 8)],  # 32 x 48 on a 1 x 2 grid, unpadded: 8 rows of 12 and their newlines
        [("image", [(8, 8)], 1), ("image", [(8, 8)], 1)],  # a multi-image prompt: base views, one newline each
        [],
        [("image", [(8, 8), (11, 11)], 11), ("video", [(4, 4), (4, 4)], 1)],  # shrunk view; two pooled frames
    ]


def _real_geometry_model():
    """Random weights, narrow widths, the released geometry: 384 px views of 14 px patches, anyres_max_9."""
    config = tiny_config(FAMILY, Geometry(image_size=384, patch=14))
    config.image_grid_pinpoints = LlavaOnevisionConfig().image_grid_pinpoints
    config.vision_aspect_ratio = "anyres_max_9"
    torch.manual_seed(0)
    return LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


@torch.no_grad()
def test_real_geometry_729_per_view_196_per_frame_and_the_anyres_max_cap():
    model = _real_geometry_model()
    adapter = adapter_for(model)
    assert adapter.grid_side**2 == 729 and adapter.video_token_count(8) == 8 * 196 + 1
    assert adapter.num_crops([1536, 1536]) == 17  # base + a 4 x 4 grid: 108 x 108 patches, shrunk to 81 x 81
    assert adapter.image_token_count([1536, 1536], True) == 729 + 81 * 82
    assert adapter.image_token_count([768, 1152], True) == 729 + 54 * 82  # 2 x 3 grid, no shrinking
    batch = make_inputs(model, [SampleSpec(images=((1536, 1536),), question=4)])
    vtprune.wrap(model, Random(keep=64))
    model(**batch)  # the model itself checks that the placeholders match its features
    image = vtprune.report(model).to_dict()["samples"][0]["images"][0]
    assert image["tokens"] == 7290 and image["stages"]["projector"]["after"] == 64  # newlines never counted


@torch.no_grad()
def test_cache_holds_text_kept_tokens_and_newlines():
    model = model_for(FAMILY)
    batch = inputs(model, [SHRUNK_AND_VIDEO])
    seen = {}
    handle = model.model.language_model.layers[0].register_forward_pre_hook(lambda _m, a: seen.update(h=a[0]))
    vtprune.wrap(model, Random(keep=3, seed=2))
    out = model(**batch, use_cache=True)
    handle.remove()
    images = vtprune.report(model).to_dict()["samples"][0]["images"]
    removed = sum(i["tokens"] - 3 for i in images)
    assert [i["tokens"] for i in images] == [64 + 121, 32]
    assert out.cache.get_seq_length() == batch["input_ids"].shape[1] - removed
    newlines = (seen["h"][0] == model.model.image_newline).all(-1).sum()
    assert int(newlines) == 11 + 1  # every row of the shrunk view, and the video's


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_projector_stage_equals_hand_pruned_inputs_with_every_kind_of_view(attn):
    model = model_for(FAMILY, attn)
    specs = [SHRUNK_AND_VIDEO, SampleSpec(images=((48, 32), (32, 32)), question=5)]
    for spec in specs:
        batch = inputs(model, [spec])
        embeds = lm_input_embeds(model, batch)
        vtprune.wrap(model, Random(keep=4, seed=7))
        pruned = model(**batch, use_cache=False).logits
        images = vtprune.report(model).to_dict()["samples"][0]["images"]
        vtprune.unwrap(model)
        patch = patch_positions(model, batch)
        keep = torch.ones(embeds.shape[1], dtype=torch.bool)
        keep[patch] = False
        start = 0
        for image in images:
            keep[patch[start + torch.tensor(image["stages"]["projector"]["kept"])]] = True
            start += image["tokens"]
        seq = torch.nonzero(keep).flatten()
        out = model.model.language_model(
            inputs_embeds=embeds[:, seq],
            position_ids=seq[None],
            attention_mask=torch.ones(1, seq.numel(), dtype=torch.long),
            use_cache=False,
        )
        torch.testing.assert_close(pruned, model.lm_head(out.last_hidden_state), rtol=1e-5, atol=1e-5)


def _eager_received(model, batch, layer: int) -> list[torch.Tensor]:
    """Attention each patch receives in SigLIP ``layer`` (0-based) from the eager weights, per encoder call (views, T)."""
    got = []
    attn = model.model.vision_tower.encoder.layers[layer].self_attn
    handle = attn.register_forward_hook(lambda _m, _a, out: got.append(out[1].float().mean(1).sum(1)))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return got


@torch.no_grad()
def test_siglip_scores_equal_the_eager_attention_weights():
    """HiPrune with alpha=0 keeps the top tokens by attention received at its deep layer: brute force from eager weights.

    No CLS column to drop; the base view and a multi-image prompt's views are whole SigLIP crops, the shrunk view
    and the pooled frames mix patch scores exactly as the model mixes their features (its own pack and pooling).
    """
    model = model_for(FAMILY, "eager")
    specs = [SHRUNK_AND_VIDEO, SampleSpec(images=((48, 32), (32, 32)), question=5)]
    batch = inputs(model, specs)
    image_call, video_call = _eager_received(model, batch, layer=1)
    size = batch["image_sizes"][0]
    crops = image_size_to_num_patches(size.tolist(), model.config.image_grid_pinpoints, model.config.vision_config.image_size)
    hires, _ = model.model.pack_image_features(
        [image_call[:crops, :, None]], size[None], vision_aspect_ratio=model.config.vision_aspect_ratio
    )
    pooled = model.model.apply_pooling(video_call[:, :, None])[..., 0].flatten()
    want = [[hires[0][:, 0], pooled], [image_call[crops], image_call[crops + 1]]]
    k = 5
    vtprune.wrap(model, HiPrune(keep=k, alpha=0.0, object_layer=1, deep_layer=2))
    model(**batch)
    for sample, scores in zip(vtprune.report(model).to_dict()["samples"], want):
        for image, score in zip(sample["images"], scores):
            assert image["stages"]["vision"]["kept"] == sorted(topk_indices(score, k).tolist())


def test_visionzip_refuses_the_cls_score_and_uses_attention_received():
    model = model_for(FAMILY)
    with pytest.raises(ValueError, match="CLS token; llava_onevision's has none"):
        vtprune.wrap(model, VisionZip(keep=8, dominant_score="cls"))
    assert not vtprune.is_wrapped(model)
    vtprune.wrap(model, VisionZip(keep=8))
    assert vtprune.report(model).to_dict()["config"]["dominant_score"] == "received"


def test_a_config_dropping_a_siglip_patch_is_refused():
    model = model_for(FAMILY)
    model.config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="SigLIP has no CLS"):
        vtprune.wrap(model, "random", keep=4)
    assert not vtprune.is_wrapped(model)


@torch.no_grad()
def test_several_feature_layers_need_an_explicit_vit_layer():
    config = tiny_config(FAMILY)
    config.vision_feature_layer = [-2, -1]  # the projector takes both layers' features, concatenated
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    with pytest.raises(ValueError, match="give the policy's ViT layer explicitly"):
        vtprune.wrap(model, VisionZip(keep=4))
    assert not vtprune.is_wrapped(model)
    vtprune.wrap(model, VisionZip(keep=4, layer=2))
    model(**inputs(model, mixed_specs(FAMILY)))
    assert all(i["stages"]["vision"]["after"] == 4 for i in vtprune.report(model).to_dict()["samples"][0]["images"])


@torch.no_grad()
def test_generate_with_beams_repeats_crops_flags_and_videos():
    """generate() encodes once, then repeats samples: per-sample batch_num_images and per-video frames follow."""
    model = model_for(FAMILY)
    batch = inputs(model, mixed_specs(FAMILY))
    vtprune.wrap(model, VisionZip(keep=6))
    model(**batch)
    single = [[i["stages"]["vision"]["kept"] for i in s["images"]] for s in vtprune.report(model).to_dict()["samples"]]
    model.generate(**batch, **gen_kwargs(2, num_beams=2, num_return_sequences=2))
    repeated = [[i["stages"]["vision"]["kept"] for i in s["images"]] for s in vtprune.report(model).to_dict()["samples"]]
    assert repeated == [k for k in single for _ in range(2)]


@torch.no_grad()
# pixelprune takes no budget, and refuses this mixed batch's shrunk view and pooled video (tests/policies/test_pixelprune.py)
@pytest.mark.parametrize("policy", sorted(set(vtprune.policies.available_policies()) - {"fixed", "pixelprune"}))
def test_every_policy_runs_with_the_family_defaults_at_the_real_depths(policy):
    """model_zoo.yaml's llava_onevision defaults bind (no 'no reference' refusal) on SigLIP's 26 layers and a 28-layer LLM."""
    model = model_for(FAMILY, layers=28, vision_layers=26)
    batch = inputs(model, mixed_specs(FAMILY))
    vtprune.wrap(model, policy, keep=64 if policy == "sparsevlm" else 4)  # sparsevlm: keep names a reference table
    out = model.generate(**batch, **gen_kwargs(2))
    assert out.shape[1] == batch["input_ids"].shape[1] + 2
    for sample in vtprune.report(model).to_dict()["samples"]:
        afters = [list(i["stages"].values())[-1]["after"] for i in sample["images"]]
        if policy in ("evs", "vidcom2", "dycoke", "fastvid"):  # video policies: images untouched, videos by their rule
            for image in sample["images"]:
                stage = image["stages"]["projector"]
                if image["kind"] == "image":
                    assert stage["after"] == image["tokens"]
                else:
                    t = len(stage["frames"])
                    assert sum(stage["frames"]) == stage["after"] and min(stage["frames"]) >= (policy == "vidcom2")
                    if policy == "evs":  # int keep k: max(P, min(k, N)): frame 0 alone
                        assert stage["frames"] == [image["tokens"] // t] + [0] * (t - 1)
        elif policy == "idpruner":  # one selection over the sample's images (the reference's): the total is exact
            assert sum(afters) == min(4 * len(afters), sum(i["tokens"] for i in sample["images"]))
        elif policy == "sparsevlm":  # the keep=64 table scaled to each image's N, merged rows included
            assert afters == [counts_after(i["tokens"], stage_counts(64, i["tokens"]))[-1] for i in sample["images"]]
        elif policy == "prunesid":  # the Qwen variant's reference count: max(round(M keep / 576), 16)
            assert afters == [prunesid_qwen_budget(i["tokens"], 4) for i in sample["images"]]
        else:
            assert afters == [min(4, i["tokens"]) for i in sample["images"]]
