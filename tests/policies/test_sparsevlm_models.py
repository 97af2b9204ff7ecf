"""SparseVLM on tiny models of real geometry against a brute-force decoder loop written from the method's description.

The brute force runs the unwrapped model's decoder layers one by one with
eager attention (weights returned), takes the raters from the layer-0
embeddings, scores at each pruning layer from that layer's own weights,
and rebuilds the sequence by hand: text before the image, the kept visual
rows ascending, the merged rows (DPC-KNN on the layer's output, written out
in loops in tests/policies/test_sparsevlm_oracles.py), the rest. LLaVA-1.5 geometry
(576 tokens, the reference's layers 2/6/15 on a 17-layer LLM) at 64/128/192,
every stage, with ``positions="compact"`` (the reference's renumbering) and
``"original"``; Qwen2.5-VL with 768 tokens (``original``, M-RoPE). The
wrapped model runs with an attention backend that returns no weights.
Budgets, batching, cache and backends on every family: the policy x family
matrix in tests/families/test_policies_models.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import hooks_left, inputs, model_for, patch_positions

import vtprune
from policies.test_sparsevlm_oracles import _dpc_oracle, _raters_oracle
from vtprune.policies import SparseVLM
from vtprune.tiny import SampleSpec

LLAVA = dict(layers=17, image_size=48, patch=2)  # 24 x 24 = 576 tokens, scoring layers 2, 6, 15
QWEN = dict(layers=15)  # zoo prune_after (3, 6, 14): scoring layers 2, 5, 13


def _sample(family):
    if family == "llava":
        return [SampleSpec(images=((48, 48),), prefix=3, question=12)]
    return [SampleSpec(images=((192, 256),), prefix=3, question=12)]  # 24 x 32 merged tokens


def _select(score, hidden_rows, k, seed):
    """One pruning layer by hand: (kept row ranks, merged rows, centre ranks) among the n current visual rows."""
    n = len(score)
    order = sorted(range(n), key=lambda r: (-score[r], r))
    kept = sorted(order[: min(k, n - 1)])
    pruned = [r for r in range(n) if r not in set(kept)]
    recycled = sorted(pruned, key=lambda r: (-score[r], r))[: int(len(pruned) * 0.3) + 1]
    c = int(len(recycled) / 10) + 1
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        noise = (torch.rand(len(recycled)) * 1e-6).tolist()
    merged, centres = _dpc_oracle([hidden_rows[r] for r in recycled], c, noise)
    return kept, merged, [recycled[j] for j in centres]


@torch.no_grad()
def _brute_force(family, batch, prune_after, counts, positions, seed=0):
    """Per stage (sorted own kept grid indices, merged count) and the last position's logits."""
    model = model_for(family, "eager", **(LLAVA if family == "llava" else QWEN))
    lm = model.model.language_model
    seen = {}
    hook = lm.layers[0].register_forward_pre_hook(
        lambda _m, args, kw: seen.update(h=args[0] if args else kw["hidden_states"], rope=kw["position_embeddings"]),
        with_kwargs=True,
    )
    model(**batch)
    hook.remove()
    h = seen["h"][0].double()
    cos, sin = (t[0].double() for t in seen["rope"])  # (L, d): each token's rotary rows at its original position
    visual = patch_positions(model, batch).tolist()
    n0, L = len(visual), h.shape[0]
    last = max(visual)
    raters = _raters_oracle(h[visual].tolist(), h[last + 1 :].tolist())
    # each row: ("text", position), ("vis", grid index) or ("merged", grid index of its centre); its rotary rows
    rows = [("vis", visual.index(p)) if p in visual else ("text", p) for p in range(L)]
    rope_rows = [(cos[p], sin[p]) for p in range(L)]
    stages, weights = [], {}
    for idx, layer in enumerate(lm.layers):
        length = h.shape[0]
        if positions == "compact":
            c, s = lm.rotary_emb(h[None].float(), torch.arange(length)[None])
            rope = (c[0].double(), s[0].double())
        else:
            rope = (torch.stack([r[0] for r in rope_rows]), torch.stack([r[1] for r in rope_rows]))
        mask = torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)[None, None]
        handle = layer.self_attn.register_forward_hook(lambda _m, _a, out: weights.update(w=out[1][0]))
        layer.double()
        h = layer(h[None], attention_mask=mask, position_embeddings=(rope[0][None], rope[1][None]))[0]
        layer.float()
        handle.remove()
        if idx + 1 not in prune_after:
            continue
        step = prune_after.index(idx + 1)
        vis = [r for r, row in enumerate(rows) if row[0] != "text"]
        text = [r for r, row in enumerate(rows) if r > max(vis) and row[0] == "text"]
        w = weights["w"].double().mean(0)  # (L, L), mean over heads
        score = [sum(float(w[text[j], v]) for j in raters) / len(raters) for v in vis]
        kept, merged, centres = _select(score, [h[v].tolist() for v in vis], counts[step], seed)
        first = vis[0]
        new_rows = rows[:first] + [rows[vis[r]] for r in kept] + [("merged", rows[vis[r]][1]) for r in centres]
        new_rows += rows[max(vis) + 1 :]
        new_rope = rope_rows[:first] + [rope_rows[vis[r]] for r in kept] + [rope_rows[vis[r]] for r in centres]
        new_rope += rope_rows[max(vis) + 1 :]
        h = torch.cat([h[:first], h[[vis[r] for r in kept]], torch.tensor(merged, dtype=h.dtype), h[max(vis) + 1 :]])
        rows, rope_rows = new_rows, new_rope
        own = sorted(g for kind, g in (rows[first + j] for j in range(len(kept))) if kind == "vis")
        stages.append((own, sum(1 for row in rows if row[0] == "merged")))
    logits = model.lm_head(lm.norm(h[-1:].float()))[0]
    assert len(h) - sum(1 for row in rows if row[0] != "text") == L - n0
    return stages, logits


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("keep", [64, 128, 192])
@torch.no_grad()
def test_every_stage_equals_brute_force_on_llava_geometry(keep, positions):
    model = model_for("llava", "vtprune_noweights", **LLAVA)
    batch = inputs(model, _sample("llava"))
    assert len(patch_positions(model, batch)) == 576
    counts = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}[keep]
    want, want_logits = _brute_force("llava", batch, (3, 7, 16), counts, positions)
    vtprune.wrap(model, SparseVLM(keep=keep), positions=positions)  # prune_after from the zoo: (3, 7, 16)
    logits = model(**batch).logits[0, -1]
    got = vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]
    assert list(got) == ["llm@3", "llm@7", "llm@16"]
    assert [(v["kept"], v.get("inserted", 0)) for v in got.values()] == want
    # the reference's counts: visual tokens after each layer with the merged ones
    assert [v["after"] for v in got.values()] == {64: [82, 32, 18], 128: [312, 117, 39], 192: [309, 204, 113]}[keep]
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_every_stage_equals_brute_force_on_qwen2_5_vl_geometry():
    model = model_for("qwen2_5_vl", "vtprune_noweights", **QWEN)
    batch = inputs(model, _sample("qwen2_5_vl"))
    n = len(patch_positions(model, batch))
    assert n == 768
    counts = tuple(int(k * n / 576) for k in (66, 30, 17))  # the keep=64 table scaled to N
    want, want_logits = _brute_force("qwen2_5_vl", batch, (3, 6, 14), counts, "original")
    vtprune.wrap(model, SparseVLM(keep=64))
    logits = model(**batch).logits[0, -1]
    got = vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]
    assert list(got) == ["llm@3", "llm@6", "llm@14"]
    assert [(v["kept"], v.get("inserted", 0)) for v in got.values()] == want
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_first_stage_without_recycling_and_with_budgets():
    model = model_for("llava", "vtprune_noweights", **LLAVA)
    batch = inputs(model, _sample("llava"))
    vtprune.wrap(model, SparseVLM(budgets=(238, 48, 26), recycle=False))
    model(**batch)
    got = vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]
    assert [v["after"] for v in got.values()] == [238, 48, 26] and all("inserted" not in v for v in got.values())
    first = got["llm@3"]["kept"]
    vtprune.wrap(model, SparseVLM(budgets=(238, 48, 26)))
    model(**batch)
    assert vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]["llm@3"]["kept"] == first


@torch.no_grad()
def test_the_users_rng_is_untouched_and_the_noise_is_seeded():
    model = model_for("llava", "sdpa")
    batch = inputs(model, [SampleSpec(images=((32, 32),), question=6)])
    vtprune.wrap(model, SparseVLM(budgets=(8, 2), prune_after=(2, 3)))
    torch.manual_seed(123)
    model(**batch)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)
    first = _kept(vtprune.report(model))
    torch.manual_seed(7)
    model(**batch)
    assert _kept(vtprune.report(model)) == first


def _kept(report):
    return [(k, v["kept"], v.get("inserted")) for k, v in report.to_dict()["samples"][0]["images"][0]["stages"].items()]


def test_options_are_checked_and_defaults_come_from_the_zoo():
    model = model_for("llava", "sdpa")
    for options, words in [
        (dict(keep=100), "64, 128, 192"),
        (dict(keep=0.25), "64, 128, 192"),
        (dict(budgets=(10, 0, 3)), "budget"),
        (dict(budgets=(10, 5), prune_after=(1, 2, 3)), "one pruning layer per budget"),
        (dict(prune_after=(3, 2, 1)), "increasing"),
        (dict(recycle="yes"), "recycle"),
        (dict(seed=-1), "seed"),
    ]:
        with pytest.raises((ValueError, TypeError), match=words):
            vtprune.wrap(model, "sparsevlm", **options)
    with pytest.raises(ValueError, match="does not fit"):
        vtprune.wrap(model, "sparsevlm")  # the family's (3, 7, 16) on the 4-layer tiny model
    assert hooks_left(model) == []
    assert SparseVLM(budgets=(5, 3)).keep is None
    deep = model_for("llava", "sdpa", layers=17)
    vtprune.wrap(deep, "sparsevlm", keep=128)
    assert vtprune.report(deep).config["prune_after"] == [3, 7, 16]
    vtprune.unwrap(deep)
    qwen35 = model_for("qwen3_5", "sdpa")
    with pytest.raises(ValueError, match="linear_attention"):
        vtprune.wrap(qwen35, SparseVLM(budgets=(4, 2), prune_after=(2, 3)))  # layer 2 of the tiny model is linear


@torch.no_grad()
def test_toy_model_runs_the_toy_schedule():
    from vtprune.toyvqa import load
    from vtprune.toyvqa.questions import make_item
    from vtprune.toyvqa.vocab import prompt

    model, processor = load("llava")
    item, image, _ = make_item("test", 0, size=336)
    batch = processor(images=[image], text=[prompt("llava", item.question)], return_tensors="pt")
    with vtprune.pruned(model, "sparsevlm", keep=64):
        model(**batch)
        stages = vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]
    assert list(stages) == ["llm@1", "llm@2", "llm@3"]


@torch.no_grad()
def test_in_a_pipeline_after_a_projector_policy_and_before_fastv():
    from vtprune.policies import DivPrune, FastV, Pipeline

    model = model_for("llava", "sdpa")
    batch = inputs(model, [SampleSpec(images=((32, 32),), question=6)])
    vtprune.wrap(model, Pipeline([DivPrune(keep=32), SparseVLM(budgets=(8,), prune_after=(2,)), FastV(keep=4, at_layer=3)]))
    model(**batch)
    stages = vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]
    assert list(stages) == ["projector", "llm@2", "llm@3"]
    assert [stages[k]["after"] for k in stages] == [32, 8 + 1, 4]  # 23 pruned: 7 recycled into one merged row
    assert len(stages["llm@3"]["kept"]) + stages["llm@3"].get("inserted", 0) == 4
    assert set(stages["llm@3"]["kept"]) <= set(stages["llm@2"]["kept"]) <= set(stages["projector"]["kept"])
    with pytest.raises(ValueError, match="before every other llm-stage policy"):
        Pipeline([FastV(keep=4, at_layer=2), SparseVLM(budgets=(8,), prune_after=(3,))])


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_compact_positions_cache_equals_recomputation_and_batch_equals_alone(family):
    from helpers import gen_kwargs, mixed_specs, sample_alone

    model = model_for(family, "sdpa")
    batch = inputs(model, mixed_specs(family))
    vtprune.wrap(model, SparseVLM(budgets=(6, 3), prune_after=(2, 3)), positions="compact")
    kw = gen_kwargs(4)
    cached = model.generate(**batch, **kw)
    assert torch.equal(cached, model.generate(**batch, use_cache=False, **kw))
    together = model(**batch).logits[:, -1]
    for b in range(batch["input_ids"].shape[0]):
        torch.testing.assert_close(model(**sample_alone(batch, b, family)).logits[0, -1], together[b], rtol=1e-4, atol=1e-5)
