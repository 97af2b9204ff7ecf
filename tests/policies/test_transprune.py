"""TransPrune: TTV and IGA against brute force, stage counts, cache, positions, bad schedules.

Budgets, batch == alone, cache == recomputation and backend independence on
every family also run in tests/families/test_policies_models.py (a two-stage schedule).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import gen_kwargs, hooks_left, inputs, mixed_specs, model_for, patch_positions, single_spec, visual_positions

import vtprune
from vtprune.ops.transition import token_transition
from vtprune.policies import Fixed, Pipeline, Random, Signals, TransPrune
from vtprune.tiny import IMAGE_TOKEN, SampleSpec

# The paper's ratios on the 4-layer tiny models: prune after 1-based layers 1, 2, 3, TTV from layer 1.
SCHEDULE = dict(prune_after=(1, 2, 3), ratios=(0.875, 0.625, 0.125), ttv_from=1)
# Qwen3.5's IGA needs a full-attention layer after each prune point (the tiny model's 1 and 3); TTV still
# runs over the linear-attention layers 0 and 2 (their token mixer is the Gated DeltaNet)
HYBRID_SCHEDULE = dict(prune_after=(1, 3), ratios=(0.875, 0.125), ttv_from=1)


def schedule_for(model) -> dict:
    """The hybrid schedule where the decoder has linear-attention layers (Qwen3.5), the paper's ratios elsewhere."""
    layer_types = getattr(model.config.get_text_config(), "layer_types", None) or ()
    return HYBRID_SCHEDULE if "linear_attention" in layer_types else SCHEDULE


def _names(schedule: dict) -> list[str]:
    return [f"llm@{k}" for k in schedule["prune_after"]]


def _stages(report, b=0, i=0):
    return report.to_dict()["samples"][b]["images"][i]["stages"]


# --- TTV on hand-built tensors -------------------------------------------------------------


def _ttv_loop(x, y, valid, abs_cos=False):
    """TTV token by token with Python floats: the formula as the paper and the reference code write it."""
    out = torch.zeros(x.shape[:2], dtype=torch.float64)
    for b in range(x.shape[0]):
        rows = [t for t in range(x.shape[1]) if valid[b, t]]
        change, magnitude = {}, {}
        for t in rows:
            xt, yt = x[b, t].double(), y[b, t].double()
            cos = float(xt @ yt) / (float(xt.norm()) * float(yt.norm()))
            change[t] = 1 - (abs(cos) if abs_cos else cos)
            magnitude[t] = float(yt.norm()) / float(xt.norm())
        total = sum(math.exp(c) for c in change.values())
        for t in rows:
            out[b, t] = math.exp(change[t]) / total * magnitude[t]
    return out


def test_token_transition_known_answers():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]])
    # y = 2x everywhere: no change of direction (uniform weight), magnitude 2
    assert torch.allclose(token_transition(x, 2 * x), torch.full((1, 3), 2 / 3))
    # one token reversed: 1 - cos is 2 for it, 0 for the others (the code); 0 for all with 1 - |cos| (the paper)
    y = x.clone()
    y[0, 1] = -y[0, 1]
    e2 = math.exp(2)
    assert torch.allclose(token_transition(x, y), torch.tensor([[1, e2, 1]]) / (2 + e2))
    assert torch.allclose(token_transition(x, y, abs_cos=True), torch.full((1, 3), 1 / 3))
    # padding takes no part in the softmax and gets 0
    valid = torch.tensor([[False, True, True]])
    assert torch.allclose(token_transition(x, y, valid), torch.tensor([[0, e2 / (1 + e2), 1 / (1 + e2)]]))


@pytest.mark.parametrize("abs_cos", [False, True])
def test_token_transition_equals_a_per_token_loop(abs_cos):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 7, 5, generator=g), torch.randn(3, 7, 5, generator=g)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[0, :2] = False  # left padding
    valid[2, 5:] = False  # right padding
    got = token_transition(x.half(), y.half(), valid, abs_cos=abs_cos)
    assert got.dtype == torch.float32
    want = _ttv_loop(x.half().float(), y.half().float(), valid, abs_cos)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


# --- the whole policy against brute force on a tiny model ----------------------------------------


def _store(into: dict, key, pick):
    """A forward hook (with or without kwargs) that stores ``pick(args, kwargs, output)`` under `key`."""

    def hook(_module, args, *rest):
        kwargs, out = rest if len(rest) == 2 else ({}, rest[0])
        into[key] = pick(args, kwargs, out)

    return hook


@torch.no_grad()
def _brute_force(family, batch, prune_after, ratios, ttv_from, ttv_only=False, abs_cos=False):
    """TransPrune's keep sets recomputed stage by stage from an eager model's own tensors.

    Stage s runs the model with the earlier stages' keep sets replayed by
    `fixed` (a policy with no TTV or probe code); forward hooks grab every
    sub-block's input and output (TTV by `_ttv_loop`) and the attention
    weights eager attention returns in the next layer (IGA). One sample, no
    padding: position p of the current sequence is the p-th token not yet
    removed.
    """
    model = model_for(family, "eager")
    ids = batch["input_ids"][0]
    patches = patch_positions(model, batch).tolist()
    last_visual = int(visual_positions(family, ids).max())
    n0 = len(patches)
    alive = list(range(n0))
    ttv = [0.0] * n0  # accumulated TTV per grid index
    stages, steps, previous = [], [], ttv_from - 1
    layers = model.model.language_model.layers
    for at, ratio in zip(prune_after, ratios):
        sub_blocks, attention = {}, {}
        handles = (
            []
            if ttv_only
            else [layers[at].self_attn.register_forward_hook(_store(attention, "weights", lambda _a, _k, out: out[1][0]))]
        )
        for j in range(previous, at):
            mixer = "self_attn" if hasattr(layers[j], "self_attn") else "linear_attn"  # Qwen3.5: Gated DeltaNet
            for part in (mixer, "mlp"):
                hook = _store(
                    sub_blocks, (j, part), lambda args, kwargs, out: (args[0] if args else kwargs["hidden_states"], out)
                )
                handles.append(getattr(layers[j], part).register_forward_hook(hook, with_kwargs=True))
        if steps:
            vtprune.wrap(model, Pipeline(steps))
        model(**batch)
        for h in handles:
            h.remove()
        # Every layer from the previous prune point up to this one runs on the same sequence.
        removed = {patches[g] for g in range(n0) if g not in alive}
        order = [p for p in range(ids.numel()) if p not in removed]
        where = {p: k for k, p in enumerate(order)}
        for x, y in sub_blocks.values():
            y = y[0] if isinstance(y, tuple) else y
            per_token = _ttv_loop(x, y, torch.ones(x.shape[:2], dtype=torch.bool), abs_cos)[0]
            for g in alive:
                ttv[g] += float(per_token[where[patches[g]]])
        t = torch.tensor([ttv[g] for g in alive], dtype=torch.float64)
        score = t / (t.sum() + 1e-8)
        if not ttv_only:
            rows = [where[p] for p in order if p > last_visual]
            iga = attention["weights"].double().mean(0)[rows].mean(0)
            a = torch.stack([iga[where[patches[g]]] for g in alive])
            score = score + a / (a.sum() + 1e-8)
        k = int(n0 * ratio)
        top = sorted(range(len(alive)), key=lambda r: (-float(score[r]), r))[:k]
        alive = sorted(alive[r] for r in top)
        stages.append(alive)
        steps.append(Fixed(kept=[[alive]], at_layer=at))
        previous = at
    vtprune.unwrap(model)
    return stages


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "vtprune_noweights"])
def test_keep_sets_equal_brute_force_from_hooked_tensors_and_eager_weights(family, attn):
    model = model_for(family, attn)
    batch = inputs(model, [single_spec(family)])
    schedule = schedule_for(model)
    want = _brute_force(family, batch, **schedule)
    vtprune.wrap(model, TransPrune(**schedule))
    model(**batch)
    got = _stages(vtprune.report(model))
    assert list(got) == _names(schedule)
    assert [got[name]["kept"] for name in got] == want


LATE = dict(prune_after=(2, 3), ratios=(0.5, 0.25), ttv_from=1)


@torch.no_grad()
@pytest.mark.parametrize(
    "variant, baseline",
    [(dict(SCHEDULE, ttv_only=True), SCHEDULE), (dict(SCHEDULE, abs_cos=True), SCHEDULE), (dict(LATE, ttv_from=2), LATE)],
    ids=["ttv_only", "abs_cos", "ttv_from"],
)
def test_variants_equal_brute_force(variant, baseline):
    model = model_for("llava", "sdpa")
    batch = inputs(model, [single_spec("llava")])
    want = _brute_force("llava", batch, **variant)
    vtprune.wrap(model, TransPrune(**variant))
    model(**batch)
    assert [s["kept"] for s in _stages(vtprune.report(model)).values()] == want
    assert want != _brute_force("llava", batch, **baseline)  # the option changes the outcome on this model


# --- stage counts, batching, cache, positions ----------------------------------------------------


@torch.no_grad()
def test_stage_counts_are_int_of_the_original_count(family):
    model = model_for(family, "sdpa")
    batch = inputs(model, mixed_specs(family))
    schedule = schedule_for(model)
    vtprune.wrap(model, TransPrune(**schedule))
    model(**batch)
    seen = 0
    for sample in vtprune.report(model).to_dict()["samples"]:
        for image in sample["images"]:
            n0, before = image["tokens"], image["tokens"]
            stages = image["stages"]
            assert list(stages) == _names(schedule)
            kept = set(range(n0))
            for stage, ratio in zip(stages.values(), schedule["ratios"]):
                assert (stage["before"], stage["after"]) == (before, max(1, int(n0 * ratio)))
                assert stage["kept"] == sorted(stage["kept"]) and set(stage["kept"]) <= kept
                before, kept = stage["after"], set(stage["kept"])
                seen += 1
    assert seen >= 6


@torch.no_grad()
def test_keep_replaces_the_last_stage_budget():
    model = model_for("llava", "sdpa")
    batch = inputs(model, [single_spec("llava")])
    vtprune.wrap(model, "transprune", keep=5, **SCHEDULE)
    model(**batch)
    assert [s["after"] for s in _stages(vtprune.report(model)).values()] == [56, 40, 5]
    vtprune.wrap(model, "transprune", keep=0.25, **SCHEDULE)
    model(**batch)
    assert [s["after"] for s in _stages(vtprune.report(model)).values()] == [56, 40, 16]


@torch.no_grad()
def test_full_ratios_give_the_unwrapped_logits(family):
    model = model_for(family, "sdpa")
    batch = inputs(model, mixed_specs(family))
    ref = model(**batch).logits
    schedule = schedule_for(model)
    vtprune.wrap(model, TransPrune(**dict(schedule, ratios=(1.0,) * len(schedule["ratios"]))))
    out = model(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-5, atol=1e-6)
    for sample in vtprune.report(model).to_dict()["samples"]:
        for image in sample["images"]:
            assert all(s["after"] == image["tokens"] for s in image["stages"].values())


def _replay(report):
    samples = report.to_dict()["samples"]
    names = list(samples[0]["images"][0]["stages"])
    return Pipeline(
        [Fixed(kept=[[i["stages"][n]["kept"] for i in s["images"]] for s in samples], at_layer=int(n[4:])) for n in names]
    )


@torch.no_grad()
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_cache_equals_recomputation_with_the_keep_sets_replayed(positions):
    """Compact positions renumber after every stage, as the reference does (LLaVA: 1-D RoPE)."""
    model = model_for("llava", "sdpa")
    batch = inputs(model, mixed_specs("llava"))
    kw = gen_kwargs(4)
    vtprune.wrap(model, TransPrune(**SCHEDULE), positions=positions)
    cached = model.generate(**batch, **kw)
    logits = model(**batch).logits[:, -1]
    vtprune.wrap(model, _replay(vtprune.report(model)), positions=positions)
    assert torch.equal(cached, model.generate(**batch, use_cache=False, **kw))
    torch.testing.assert_close(model(**batch).logits[:, -1], logits)
    if positions == "compact":  # the option takes effect
        vtprune.wrap(model, TransPrune(**SCHEDULE))
        assert not torch.allclose(model(**batch).logits[:, -1], logits)


@torch.no_grad()
def test_ttv_is_computed_in_prefill_only_and_nothing_stays_bound(monkeypatch):
    model = model_for("qwen2_5_vl", "sdpa")
    batch = inputs(model, mixed_specs("qwen2_5_vl"))
    ref = model(**batch).logits
    calls = []
    original = TransPrune.sub_block_statistic
    monkeypatch.setattr(TransPrune, "sub_block_statistic", lambda self, *a: calls.append(1) or original(self, *a))
    vtprune.wrap(model, TransPrune(**SCHEDULE))
    model.generate(**batch, **gen_kwargs(4))
    assert len(calls) == 2 * 3  # attention and MLP of layers 0-2, once: decode steps do no TTV work
    vtprune.unwrap(model)
    assert hooks_left(model) == []
    assert torch.equal(model(**batch).logits, ref)


@torch.no_grad()
def test_a_prompt_ending_with_its_image_is_scored_by_ttv_alone():
    """No text follows the image: IGA has no rows, and the score is TTV's (deterministic, no NaN)."""
    model = model_for("llava", "sdpa")
    batch = inputs(model, [SampleSpec(images=((32, 32),), question=0)])
    batch["input_ids"], batch["attention_mask"] = batch["input_ids"][:, :-2], batch["attention_mask"][:, :-2]
    assert int(batch["input_ids"][0, -1]) == IMAGE_TOKEN
    picks = []
    for ttv_only in (False, True):
        vtprune.wrap(model, TransPrune(ttv_only=ttv_only, **SCHEDULE))
        model(**batch)
        picks.append([s["kept"] for s in _stages(vtprune.report(model)).values()])
    assert picks[0] == picks[1] and len(picks[0][-1]) == 8


@torch.no_grad()
def test_pipeline_after_a_projector_stage_counts_from_the_original_tokens():
    model = model_for("llava", "sdpa")
    batch = inputs(model, [single_spec("llava")])
    vtprune.wrap(model, Pipeline([Random(keep=48), TransPrune(**SCHEDULE)]))
    model(**batch)
    stages = _stages(vtprune.report(model))
    assert [(k, v["before"], v["after"]) for k, v in stages.items()] == [
        ("projector", 64, 48),
        ("llm@1", 48, 48),
        ("llm@2", 48, 40),
        ("llm@3", 40, 8),
    ]


# --- bad input -----------------------------------------------------------------------------------


def test_bad_schedules_raise_and_leave_the_model_untouched():
    model = model_for("llava", "sdpa")
    for options, err, words in [
        ({}, ValueError, r"prune_after=\[7, 9, 12\] does not fit this model's 4 decoder layers.*1\.\.3"),
        (dict(prune_after=(1, 4), ratios=(0.5, 0.25), ttv_from=1), ValueError, r"\[1, 4\].*1\.\.3"),
        (dict(prune_after=(2, 1), ratios=(0.5, 0.25), ttv_from=1), ValueError, r"strictly increasing.*\[2, 1\]"),
        (dict(prune_after=(0, 1), ratios=(0.5, 0.25), ttv_from=1), ValueError, r"ints >= 1.*\[0, 1\]"),
        (dict(prune_after=(1, 2), ratios=(0.5,), ttv_from=1), ValueError, r"one ratio per prune layer.*\[0.5\]"),
        (dict(prune_after=(1, 2), ratios=(0.5, 1.5), ttv_from=1), ValueError, r"\(0, 1\].*1.5"),
        (dict(prune_after=(1, 2), ratios=(0.25, 0.5), ttv_from=1), ValueError, r"must not increase.*\[0.25, 0.5\]"),
        (dict(prune_after=(1, 2), ratios=(0.5, 0.25), ttv_from=2), ValueError, r"ttv_from=2.*allowed: 1\.\.1"),
        (dict(prune_after=(1, 2), ratios=(0.5, 0.25), ttv_from=0), ValueError, r"ttv_from.*got 0"),
        (dict(prune_after=(2, 3), ratios=(0.5, 0.25), ttv_from=1, keep=0), ValueError, r"keep.*>= 1"),
        (dict(prune_after=(2, 3), ratios=(0.5, 0.25), ttv_only="yes"), TypeError, r"ttv_only.*'yes'"),
    ]:
        with pytest.raises(err, match=words):
            vtprune.wrap(model, "transprune", **options)
        assert not vtprune.is_wrapped(model) and hooks_left(model) == []
    with pytest.raises(ValueError, match="same layer"):
        Pipeline([TransPrune(**SCHEDULE), Random(keep=4, at_layer=3)])
    with pytest.raises(ValueError, match="forward"):
        Pipeline([Random(keep=4, at_layer=2), TransPrune(**SCHEDULE)])


def test_defaults_come_from_the_model_zoo():
    from vtprune.patches import adapter_for

    policy = TransPrune()
    assert policy.at is None
    with pytest.raises(RuntimeError, match=r"prune_after, ratios, ttv_from not resolved yet; bind\(adapter\) first"):
        policy.signals()
    model = model_for("qwen2_5_vl", "sdpa", layers=13)
    policy = policy.bind(adapter_for(model))
    assert policy.schedule() == ((7, 9, 12), (0.875, 0.625, 0.125), 7)
    assert policy.signals() == Signals(prune_before=(7, 9, 12), decoder_attention=(7, 9, 12), sub_blocks=tuple(range(6, 12)))
    assert policy.describe() == "transprune(after=7,9,12, ratios=0.875,0.625,0.125, ttv_from=7)"
    with torch.no_grad():
        vtprune.wrap(model, "transprune")
        model(**inputs(model, [single_spec("qwen2_5_vl")]))
    assert [(k, v["after"]) for k, v in _stages(vtprune.report(model)).items()] == [("llm@7", 21), ("llm@9", 15), ("llm@12", 3)]
