"""Qwen3.5 (`qwen3_5`): a hybrid decoder of Gated DeltaNet (linear attention) and full-attention layers.

The shared family tests (conftest's ``family`` fixture) run every invariant
on the tiny Qwen3.5 too: identity, projector-stage equivalence, cache ==
recomputation, batch == alone, unwrap, budgets, every policy. Here: what is
particular to the hybrid decoder. The tiny model's layers are linear, full,
linear, full, linear.
"""

from __future__ import annotations

import pytest
import torch
from helpers import gen_kwargs, hooks_left, inputs, mixed_specs, model_for, patch_positions, sample_alone, single_spec
from transformers.cache_utils import LinearAttentionLayer

import vtprune
from vtprune.measure import cache_bytes_by_kind
from vtprune.patches import adapter_for
from vtprune.policies import DART, EntropyPrune, FastV, Pipeline, PyramidDrop, Random, TransPrune
from vtprune.tiny import VIDEO_TOKEN, VISION_START, SampleSpec

FAMILY = "qwen3_5"
FULL = (1, 3)
DEPTH = 5


def _kept(report, stage: str, b: int = 0) -> list[list[int]]:
    return [i["stages"][stage]["kept"] for i in report.to_dict()["samples"][b]["images"]]


def test_tiny_model_is_hybrid_and_the_adapter_says_so():
    model = model_for(FAMILY)
    adapter = adapter_for(model)
    assert [adapter.layer_type(i) for i in range(DEPTH)] == ["linear_attention", "full_attention"] * 2 + ["linear_attention"]
    assert adapter.attention_layers() == FULL
    assert adapter.seq_length_layer() == 1  # what Cache.get_seq_length() reads: the first layer with keys
    assert [name for name, _ in adapter.sub_blocks(0)] == ["attention", "mlp"]
    assert adapter.sub_blocks(0)[0][1] is adapter.decoder_layers[0].linear_attn  # TTV's token mixer
    assert adapter.sub_blocks(1)[0][1] is adapter.decoder_layers[1].self_attn
    with pytest.raises(ValueError, match=r"layer 2 is linear attention.*\[1, 3\]"):
        adapter.query_module(2)


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("at", [1, 2, 3], ids=["before-full-1", "before-linear-2", "before-full-3"])
def test_llm_stage_equals_decoder_layers_run_by_hand(attn, at):
    """Layers at..end run by hand on the kept rows of the unwrapped model's layer input (with its rotary tables)."""
    model = model_for(FAMILY, attn)
    batch = inputs(model, [single_spec(FAMILY)])
    layers = model.model.language_model.layers
    seen = {}
    handle = layers[at].register_forward_pre_hook(lambda _m, a, kw: seen.update(h=a[0], kw=kw), with_kwargs=True)
    model(**batch, use_cache=False)
    handle.remove()

    vtprune.wrap(model, Random(keep=5, seed=7, at_layer=at))
    pruned = model(**batch).logits  # with a cache, as generate's prefill
    pruned_no_cache = model(**batch, use_cache=False).logits
    (kept,) = _kept(vtprune.report(model), f"llm@{at}")
    vtprune.unwrap(model)

    patch = patch_positions(model, batch)
    keep = torch.ones(seen["h"].shape[1], dtype=torch.bool)
    keep[patch] = False
    keep[patch[kept]] = True
    seq = torch.nonzero(keep).flatten()
    hidden = seen["h"][:, seq]
    position_embeddings = tuple(t[:, seq] for t in seen["kw"]["position_embeddings"])
    n = seq.numel()
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    full_mask = causal if attn == "sdpa" else torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    for j in range(at, DEPTH):
        # no padding: the linear layers get no mask (as transformers gives them for an all-ones mask)
        mask = full_mask if j in FULL else None
        hidden = layers[j](hidden, position_embeddings=position_embeddings, attention_mask=mask, position_ids=None)
    hand = model.lm_head(model.model.language_model.norm(hidden))
    assert len(kept) == 5 and pruned.shape[1] == n
    torch.testing.assert_close(pruned, hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pruned_no_cache, hand, rtol=1e-5, atol=1e-5)


def _widths(cache) -> dict[int, int]:
    return {j: cache.layers[j].keys.shape[2] for j in FULL}


@torch.no_grad()
@pytest.mark.parametrize("at", [None, 1, 2, 3])
def test_kv_cache_of_every_full_attention_layer_holds_text_and_kept_tokens(at):
    """Alone: exactly text + kept tokens from the prune point on; batched: the widest sample's; linear states unchanged."""
    model = model_for(FAMILY)
    batch = inputs(model, mixed_specs(FAMILY))
    full = model(**batch, use_cache=True).cache
    vtprune.wrap(model, Random(keep=3, seed=3, at_layer=at) if at else Random(keep=3, seed=3))
    stage = f"llm@{at}" if at else "projector"
    counts = []
    for b in range(batch["input_ids"].shape[0]):
        alone = sample_alone(batch, b, FAMILY)
        cache = model(**alone, use_cache=True).cache
        n_valid = alone["input_ids"].shape[1]
        visual = int(((alone["input_ids"] >= 100) & (alone["input_ids"] <= 101)).sum())
        kept = sum(len(k) for k in _kept(vtprune.report(model), stage))
        counts.append((n_valid, n_valid - visual + kept))
        for j, width in _widths(cache).items():
            assert width == (n_valid - visual + kept if at is None or j >= at else n_valid), (b, j)
    cache = model(**batch, use_cache=True).cache
    for j, width in _widths(cache).items():
        assert width == max(c[1] if at is None or j >= at else c[0] for c in counts)
    for j in range(DEPTH):
        if j not in FULL:  # the Gated DeltaNet layers hold fixed-size states, pruned or not
            assert isinstance(cache.layers[j], LinearAttentionLayer)
            assert cache.layers[j].recurrent_states[0].shape == full.layers[j].recurrent_states[0].shape
            assert cache.layers[j].conv_states[0].shape == full.layers[j].conv_states[0].shape
    assert cache.get_seq_length() == cache.layers[FULL[0]].keys.shape[2]


@torch.no_grad()
def test_cache_bytes_per_layer_kind():
    model = model_for(FAMILY)
    batch = inputs(model, [single_spec(FAMILY)])
    full = cache_bytes_by_kind(model(**batch, use_cache=True).cache)
    vtprune.wrap(model, Random(keep=4, seed=1))
    pruned = cache_bytes_by_kind(model(**batch, use_cache=True).cache)
    text = model.config.text_config
    n_full = batch["input_ids"].shape[1]
    n_kept = n_full - patch_positions(model, batch).numel() + 4
    per_token = len(FULL) * 2 * text.num_key_value_heads * text.head_dim * 4  # keys + values, fp32
    assert (full["kv"], pruned["kv"]) == (n_full * per_token, n_kept * per_token)
    assert pruned["linear_state"] == full["linear_state"] > 0


@pytest.mark.parametrize(
    "policy, layer",
    [
        (FastV(keep=3, at_layer=1), 0),
        (FastV(keep=3, at_layer=3), 2),
        (EntropyPrune(keep=3, at_layer=3), 2),
        (TransPrune(prune_after=(1, 2, 3), ratios=(0.875, 0.625, 0.125), ttv_from=1), 2),
        (DART(keep=3, at_layer=3), 2),
        (PyramidDrop(prune_after=(1, 2), ratios=(0.5, 0.25)), 2),
    ],
    ids=["fastv-1", "fastv-3", "entropyprune-3", "transprune-iga-2", "dart-keys-2", "pdrop-2"],
)
def test_attention_reading_policies_refuse_linear_layers_at_wrap(policy, layer):
    model = model_for(FAMILY)
    before = hooks_left(model)
    with pytest.raises(ValueError, match=rf"decoder layer {layer}, a linear_attention layer.*softmax attention are \[1, 3\]"):
        vtprune.wrap(model, policy)
    assert not vtprune.is_wrapped(model) and hooks_left(model) == before


@torch.no_grad()
def test_transprune_ttv_only_prunes_before_linear_layers_as_brute_force():
    """TTV alone reads no attention, so it may prune before any layer; TTV of a linear layer is its Gated DeltaNet's."""
    from policies.test_transprune import SCHEDULE, _brute_force

    schedule = dict(SCHEDULE, ttv_only=True)  # prune before layers 1, 2 (linear), 3
    model = model_for(FAMILY)
    batch = inputs(model, [single_spec(FAMILY)])
    want = _brute_force(FAMILY, batch, **schedule)
    vtprune.wrap(model, TransPrune(**schedule))
    model(**batch)
    stages = vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]
    assert [s["kept"] for s in stages.values()] == want


@torch.no_grad()
def test_queries_are_the_gated_attention_layers_own():
    """The probe's queries of a gated full-attention layer equal what its q_norm returns inside the forward."""
    model = model_for(FAMILY)
    adapter = adapter_for(model)
    attn = adapter.decoder_layers[3].self_attn
    seen = {}
    handles = [
        attn.q_proj.register_forward_hook(lambda _m, _a, out: seen.update(q=out)),
        attn.q_norm.register_forward_hook(lambda _m, _a, out: seen.update(normed=out)),
    ]
    model(**inputs(model, [single_spec(FAMILY)]))
    for h in handles:
        h.remove()
    torch.testing.assert_close(adapter.decoder_queries(3, seen["q"]), seen["normed"], rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize(
    "policy",
    [
        Random(keep=3, at_layer=1),
        Random(keep=3, at_layer=2),
        Pipeline([Random(keep=6), Random(keep=2, at_layer=1), Random(keep=1, at_layer=2, seed=5)]),
    ],
    ids=["before-first-full", "before-linear", "three-levels"],
)
def test_decode_after_llm_stage_pruning(policy):
    """Level 0 may hold no keys (layer 0 is linear): decode masks and positions still follow the right level."""
    model = model_for(FAMILY)
    batch = inputs(model, mixed_specs(FAMILY))
    vtprune.wrap(model, policy)
    kw = gen_kwargs(5)
    assert torch.equal(model.generate(**batch, **kw), model.generate(**batch, use_cache=False, **kw))
    # a manual decode loop without mask or positions: HF derives positions from the (pruned) cache length
    one = inputs(model, [single_spec(FAMILY)])
    first = model(**one, use_cache=True)
    nxt = first.logits[:, -1].argmax(-1, keepdim=True)
    step = model(input_ids=nxt, cache=first.cache, use_cache=True).logits[:, -1]
    ids = torch.cat([one["input_ids"], nxt], dim=1)
    again = dict(
        one,
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=torch.cat([one["mm_token_type_ids"], torch.zeros_like(nxt).int()], 1),
    )
    torch.testing.assert_close(step, model(**again, use_cache=False).logits[:, -1], rtol=1e-4, atol=1e-5)


def test_video_frames_sit_between_timestamps_that_stay_text():
    model = model_for(FAMILY)
    batch = inputs(model, [SampleSpec(videos=((4, 32, 32),), question=3)])
    ids = batch["input_ids"][0]
    adapter = adapter_for(model)
    (video,) = adapter.find_images({"video_grid_thw": batch["video_grid_thw"]}, ids, {"image": 0, "video": 0})
    frames = torch.nonzero(ids == VIDEO_TOKEN).flatten()
    starts = torch.nonzero(ids == VISION_START).flatten()
    assert video.kind == "video" and len(video.grids) == 2 and torch.equal(video.positions, frames)
    assert starts.numel() == 2 and not torch.isin(starts - 1, frames).any()  # a timestamp before each frame
    vtprune.wrap(model, Random(keep=3, seed=2))
    seen = {}
    handle = model.model.language_model.layers[0].register_forward_pre_hook(lambda _m, a: seen.update(n=a[0].shape[1]))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    assert seen["n"] == ids.numel() - frames.numel() + 3  # every timestamp and frame marker kept


@torch.no_grad()
@pytest.mark.parametrize("at", [1, 2, 3])
def test_text_only_sample_decodes_as_alone_unwrapped_after_an_llm_stage_prune(at):
    """A sample without images loses nothing: batched with pruned samples, it generates what it does alone unwrapped.

    Every decode step's 2-D mask is translated with the count of tokens since the prefill, read from a layer
    that holds keys (Qwen3.5's layer 0 is linear: since transformers 5.25 it counts the unpruned length).
    """
    model = model_for(FAMILY)
    batch = inputs(model, mixed_specs(FAMILY))
    text_only = [b for b, spec in enumerate(mixed_specs(FAMILY)) if not spec.images and not spec.videos]
    kw = gen_kwargs(6)
    want = {b: model.generate(**sample_alone(batch, b, FAMILY), **kw)[0, -6:] for b in text_only}
    vtprune.wrap(model, Random(keep=3, at_layer=at))
    got = model.generate(**batch, **kw)
    assert text_only
    for b in text_only:
        assert torch.equal(got[b, -6:], want[b]), b
