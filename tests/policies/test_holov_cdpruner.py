"""HoloV and CDPruner on tiny models against brute force from the unwrapped model's own tensors.

The oracles (`test_holov_cdpruner_ops`) are fed what the reference code
reads, taken from the model directly: the eager ViT's CLS attention of the
feature layer (mean over heads), the projector output, the question's input
embeddings, and for ``text="clip"`` a tiny CLIP model's projections.
"""

from __future__ import annotations

import pytest
import torch
from helpers import inputs, lm_input_embeds, model_for, visual_positions

import vtprune
from policies.test_holov_cdpruner_ops import dpp_oracle, holov_oracle, kernel_oracle, relevance_llm_oracle
from vtprune.patches import adapter_for
from vtprune.policies import CDPruner, HoloV
from vtprune.tiny import SampleSpec


def _kept(model, batch, policy, tokenizer=None):
    vtprune.wrap(model, policy, tokenizer=tokenizer)
    try:
        model(**batch)
        return [i["stages"]["projector"]["kept"] for i in vtprune.report(model).to_dict()["samples"][0]["images"]]
    finally:
        vtprune.unwrap(model)


def _llava_case(question=5):
    model = model_for("llava", "eager")
    batch = inputs(model, [SampleSpec(images=((32, 32), (32, 32)), question=question)])
    tower = model.model.vision_tower
    layer = len(tower.encoder.layers) + model.config.vision_feature_layer  # 0-based; its output is the feature
    out = tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    embeds = lm_input_embeds(model, batch)[0]
    width = model.config.text_config.hidden_size
    feats = embeds[visual_positions("llava", batch["input_ids"])].view(2, -1, width)
    layout = adapter_for(model).layouts(dict(batch), lm_input_embeds(model, batch))[0]
    question = embeds[layout.question_positions]
    return model, batch, out, layer, feats, question, layout


@torch.no_grad()
@pytest.mark.parametrize("overflow", ["redistribute", "drop"])
@pytest.mark.parametrize("keep", [5, 12, 20])
def test_holov_llava_equals_brute_force_from_eager_cls_attention(keep, overflow):
    model, batch, out, layer, feats, _, _ = _llava_case()
    cls = out.attentions[layer][:, :, 0, 1:].float().mean(1)  # the CLS row, mean over heads, as the reference
    got = _kept(model, batch, HoloV(keep=keep, overflow=overflow))
    for g in range(2):
        assert got[g] == holov_oracle(feats[g], cls[g], keep, overflow)[0]


@torch.no_grad()
@pytest.mark.parametrize("keep", [5, 12, 20])
@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_cdpruner_llm_llava_equals_brute_force(keep, weight):
    model, batch, _, _, feats, question, layout = _llava_case()
    assert question.shape[0] > 0
    got = _kept(model, batch, CDPruner(keep=keep, relevance_weight=weight))
    for g in range(2):
        rel = relevance_llm_oracle(feats[g], question)
        assert got[g] == dpp_oracle(kernel_oracle(feats[g], rel, weight), keep)


@torch.no_grad()
def test_cdpruner_split_llava_equals_two_brute_force_problems():
    model, batch, _, _, feats, question, _ = _llava_case()
    got = _kept(model, batch, CDPruner(keep=9, split=True))
    for g in range(2):
        n = feats[g].shape[0]
        want = []
        for lo, hi, k in ((0, n // 2, 4), (n // 2, n, 5)):
            rel = relevance_llm_oracle(feats[g][lo:hi], question)
            want += [lo + j for j in dpp_oracle(kernel_oracle(feats[g][lo:hi], rel), k)]
        assert got[g] == sorted(want)


class WordIds:
    """A stand-in LLM tokenizer: decodes ids to words (no template markers to learn)."""

    def encode(self, text, add_special_tokens=False):
        return []

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


class CharIds:
    """A stand-in CLIP tokenizer: BOS, one id per character, EOS; no truncation."""

    def __call__(self, text, return_tensors="pt"):
        ids = [[1] + [3 + ord(c) % 90 for c in t] + [2] for t in text]
        ids = torch.tensor(ids)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def tiny_clip(vision_width):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=100,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            eos_token_id=2,
            bos_token_id=1,
        ),
        vision_config=dict(
            hidden_size=vision_width,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=4,
        ),
        projection_dim=8,
    )
    torch.manual_seed(1)
    return CLIPModel(config).eval()


@torch.no_grad()
@pytest.mark.parametrize("keep", [5, 12])
def test_cdpruner_clip_llava_equals_brute_force(keep):
    model, batch, out, layer, feats, _, layout = _llava_case(question=3)
    clip = tiny_clip(model.config.vision_config.hidden_size)
    # what the reference computes: the text tower on 16-position segments of the decoded question
    text = WordIds().decode(batch["input_ids"][0, layout.question_positions].tolist())
    ids = CharIds()([text])["input_ids"]
    width = clip.config.text_config.max_position_embeddings
    segments = (ids.shape[1] - 1) // width + 1
    assert segments > 1  # the segmenting is exercised
    pad = width * segments - ids.shape[1]
    seg_ids = torch.cat([ids, ids.new_zeros(1, pad)], 1).reshape(-1, width)
    seg_mask = torch.cat([torch.ones_like(ids), ids.new_zeros(1, pad)], 1).reshape(-1, width)
    text_embeds = clip.text_projection(clip.text_model(input_ids=seg_ids, attention_mask=seg_mask).pooler_output)
    patches = out.hidden_states[layer + 1][:, 1:]  # layer -2 patch rows, the projector's input
    image_embeds = clip.visual_projection(clip.vision_model.post_layernorm(patches))
    got = _kept(model, batch, CDPruner(keep=keep, text="clip", clip_model=clip, clip_tokenizer=CharIds()), tokenizer=WordIds())
    for g in range(2):
        e = image_embeds[g].double()
        t = text_embeds.double()
        raw = -((e / e.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).T).mean(1)
        rel = (raw - raw.min() + 1e-6) / (raw.max() - raw.min())
        assert got[g] == dpp_oracle(kernel_oracle(feats[g], rel), keep)


def test_cdpruner_clip_is_refused_where_it_cannot_run():
    clip = tiny_clip(32)
    with pytest.raises(ValueError, match="clip_model"):
        CDPruner(text="clip")
    with pytest.raises(ValueError, match="clip_tokenizer"):
        CDPruner(text="clip", clip_model=clip)
    with pytest.raises(ValueError, match="text='clip'"):
        CDPruner(clip_model=clip)
    policy = CDPruner(keep=4, text="clip", clip_model=clip, clip_tokenizer=CharIds())
    with pytest.raises(ValueError, match="tokenizer"):
        vtprune.wrap(model_for("llava", "sdpa"), policy)  # no LLM tokenizer to decode the question
    with pytest.raises(ValueError, match="CLIP ViT"):
        vtprune.wrap(model_for("qwen2_5_vl", "sdpa"), policy, tokenizer=WordIds())
    assert policy.to_dict()["clip_model"] == "CLIPModel"


def test_bad_options_are_refused():
    for make, words in [
        (lambda: HoloV(overflow="pad"), "overflow"),
        (lambda: HoloV(attention="keys"), "attention"),
        (lambda: CDPruner(text="t5"), "text"),
        (lambda: CDPruner(relevance_weight=1.5), "relevance_weight"),
        (lambda: CDPruner(split=1), "split"),
    ]:
        with pytest.raises((ValueError, TypeError), match=words):
            make()
    with pytest.raises(ValueError, match="CLS"):
        vtprune.wrap(model_for("qwen2_5_vl", "sdpa"), HoloV(attention="cls"))


@torch.no_grad()
def test_holov_drop_keeps_fewer_and_reports_them():
    """overflow='drop' on a peaked image: fewer than keep, reported truthfully; redistribute keeps exactly keep."""
    model, batch, out, layer, feats, _, _ = _llava_case()
    cls = out.attentions[layer][:, :, 0, 1:].float().mean(1)
    counts = {}
    for overflow in ("drop", "redistribute"):
        kept = _kept(model, batch, HoloV(keep=40, overflow=overflow))
        counts[overflow] = [len(k) for k in kept]
    want = [len(holov_oracle(feats[g], cls[g], 40, "drop")[0]) for g in range(2)]
    assert counts["drop"] == want and counts["redistribute"] == [40, 40]


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_holov_qwen_equals_brute_force_from_eager_weights(family):
    """Attention received at the last ViT block (eager weights, merge units averaged, raster order); one budget per
    image and per video (chunks running over the frames)."""
    from helpers import eager_vit_received
    from transformers.vision_utils import get_vision_window_index

    model = model_for(family, "eager")
    batch = inputs(model, [SampleSpec(images=((32, 48), (48, 32)), videos=((4, 32, 32),), question=5)])
    received, _ = eager_vit_received(model, batch)
    last = len(model.model.visual.blocks) - 1
    vision = model.config.vision_config
    per_item = []
    for call, key in enumerate(("image_grid_thw", "video_grid_thw")):
        rows = received[last][call].view(-1, 4).mean(1)
        grid = batch[key]
        if getattr(vision, "window_size", None):  # Qwen2.5-VL's windows: merge units in window order
            window_index, _ = get_vision_window_index(grid, vision.spatial_merge_size, vision.window_size, vision.patch_size)
            rows = rows[torch.argsort(window_index)]
        per_item.extend(torch.split(rows, (grid.prod(-1) // 4).tolist()))
    embeds = lm_input_embeds(model, batch)[0]
    visual = visual_positions(family, batch["input_ids"])
    keep = 5
    got = _kept(model, batch, HoloV(keep=keep))
    start = 0
    assert len(got) == len(per_item) == 3
    for kept, attention in zip(got, per_item):
        feats = embeds[visual[start : start + attention.shape[0]]]
        start += attention.shape[0]
        assert kept == holov_oracle(feats, attention, keep, "redistribute")[0]


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_cdpruner_views_are_separate_problems(family):
    """LLaVA-NeXT's base and high-resolution views, a Qwen video's frames: one DPP each with keep // views (remainder
    to the first), relevance normalised over the whole image."""
    from vtprune.ops.dpp import view_budgets

    model = model_for(family, "sdpa")
    spec = SampleSpec(images=((40, 24),), question=5) if family == "llava_next" else SampleSpec(videos=((4, 32, 32),), question=5)
    batch = inputs(model, [spec])
    embeds = lm_input_embeds(model, batch)[0]
    layout = adapter_for(model).layouts(dict(batch), embeds[None])[0]
    image = layout.images[0]
    assert len(image.grids) > 1
    feats, question = embeds[image.positions], embeds[layout.question_positions]
    keep = 7
    got = _kept(model, batch, CDPruner(keep=keep))[0]
    rel = relevance_llm_oracle(feats, question)
    sizes = [g.size for g in image.grids]
    want, start = [], 0
    for size, k in zip(sizes, view_budgets(sizes, keep)):
        view = slice(start, start + size)
        want += [start + j for j in dpp_oracle(kernel_oracle(feats[view], rel[view]), k)]
        start += size
    assert got == sorted(want) and len(got) == keep


def _clip_tokenizer_files(folder):
    """A character-level CLIP BPE vocabulary (no merges) written to `folder`: a real CLIPTokenizer, offline."""
    import json
    import string

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in string.ascii_lowercase + string.digits:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


@torch.no_grad()
def test_cdpruner_clip_from_a_path_equals_the_loaded_model(tmp_path):
    """clip_model=PATH loads the CLIP model and its tokenizer; the keep sets equal those of the same objects given."""
    model, batch, *_ = _llava_case(question=3)
    clip = tiny_clip(model.config.vision_config.hidden_size)
    tokenizer = _clip_tokenizer_files(tmp_path)
    clip.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    from_path = _kept(model, batch, CDPruner(keep=6, text="clip", clip_model=str(tmp_path)), tokenizer=WordIds())
    given = _kept(model, batch, CDPruner(keep=6, text="clip", clip_model=clip, clip_tokenizer=tokenizer), tokenizer=WordIds())
    assert from_path == given and [len(k) for k in given] == [6, 6]
    assert CDPruner(keep=6, text="clip", clip_model=str(tmp_path)).to_dict()["clip_model"] == str(tmp_path)
