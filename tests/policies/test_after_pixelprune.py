"""VisionZip and HiPrune after PixelPrune: selection among the units the tower encoded, after or inside the encoder.

Oracles: the same policy alone (no duplicate units: PixelPrune keeps the
whole grid, so the Pipeline must be the policy alone, bit for bit); a hand
selection written from each method's description on the signals the policy
read, restricted to PixelPrune's kept units (VisionZip: dominant tokens,
contextual targets at the reference's stride over the rest in grid order,
each target's merged row; HiPrune: anchors, their alive grid neighbours,
registers to the budget); the same policy after the encoder reading layer k
(``vit_layer=k``); each sample run alone; generate with the cache against
recomputing.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import gen_kwargs, inputs, model_for, sample_alone, stages_of, unmixed_specs

import vtprune
from policies.test_pixelprune import with_pattern
from vtprune.context import StageContext
from vtprune.layout import SubGrid
from vtprune.patches import supported_pixel_prune, supported_pixel_then_vit
from vtprune.policies import HiPrune, Pipeline, PixelPrune, Random, VisionZip

FAMILIES = supported_pixel_prune()
VIT_FAMILIES = supported_pixel_then_vit()
DEPTH = 4  # ViT blocks of the test models (CLIP's feature layer is then 3: vit_layer 1..2)
NAMES = ["visionzip", "hiprune"]


def make(name: str, **options):
    if name == "visionzip":
        return VisionZip(**{"keep": 6, **options})
    return HiPrune(**{"keep": 10, "alpha": 1.0, "object_layer": 1, **options})  # alpha 1: anchors at keep 10


def deep_model(family: str):
    return model_for(family, "sdpa", vision_layers=DEPTH)


def last_kept(model) -> list[list[list[int]]]:
    return [[img[-1] for img in s] for s in stages_of(model)]


# ----------------------------------------------------------------- no duplicates: the policy alone
@torch.no_grad()
@pytest.mark.parametrize("where", ["after", "vit"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_no_duplicates_is_the_policy_alone(family, name, where):
    if where == "vit" and family not in VIT_FAMILIES:
        pytest.skip(f"{family}: pixelprune then vit_layer not built")
    model = deep_model(family)
    batch = inputs(model, unmixed_specs(family))  # random pixels: PixelPrune keeps every unit
    assert_after_pixelprune_is_alone(model, batch, make(name, vit_layer=2 if where == "vit" else None))


def assert_after_pixelprune_is_alone(model, batch, policy) -> None:
    """On a batch without duplicate units PixelPrune keeps every unit, so ``[PixelPrune(), policy]`` must be the
    policy alone: the same keep sets, bit-equal logits."""
    vtprune.wrap(model, policy)
    want, want_kept = model(**batch).logits, last_kept(model)
    vtprune.unwrap(model)
    vtprune.wrap(model, Pipeline([PixelPrune(), policy]))
    got = model(**batch).logits
    whole = [[list(range(img["tokens"])) for img in s["images"]] for s in vtprune.report(model).to_dict()["samples"]]
    assert [[img[0] for img in s] for s in stages_of(model)] == whole  # PixelPrune kept every unit
    assert last_kept(model) == want_kept
    assert torch.equal(got, want)


# ----------------------------------------------------------------- duplicates: a hand selection on the signals read
def spy(monkeypatch, cls, reads) -> dict:
    """Record, per (sample, image), what the policy's `select_image` got and returned, and the signals `reads`."""
    records: dict = {}
    original = cls.select_image

    def select_image(self, ctx, b, i, k):
        sel = original(self, ctx, b, i, k)
        records[(b, i)] = dict(
            policy=self, k=k, alive=ctx.alive[b][i].cpu(), image=ctx.layouts[b].images[i], sel=sel, **reads(self, ctx, b, i)
        )
        return sel

    monkeypatch.setattr(cls, "select_image", select_image)
    return records


def by_score(values: torch.Tensor, among) -> list[int]:
    """`among` by decreasing value, ties to the lower index (written out, no topk)."""
    return sorted(among, key=lambda j: (-float(values[j]), j))


def visionzip_reads(self, ctx, b, i):
    layer = self.layer - 1
    score = ctx.vision_cls_attention if self.dominant_score == "cls" else ctx.vision_attention
    return dict(
        score=score(b, i, layer).float().cpu(),
        keys=ctx.vision_keys(b, i, layer).float().cpu(),
        features=(ctx.pre_projector if self.merge_before_projector else ctx.features)(b, i).float().cpu(),
        project=ctx.project if self.merge_before_projector else None,
    )


def split_by_hand(policy, k: int, n_tokens: int) -> tuple[int, int]:
    """(dominant, contextual) as documented: ``max(int(f N), 1)`` contextual of the image's N tokens with
    ``contextual_fraction`` f, else the given count or ``round(k * share)``; never more than k."""
    if policy.contextual_fraction is not None:
        c = max(int(n_tokens * policy.contextual_fraction), 1)
    elif isinstance(policy.contextual, int):
        c = policy.contextual
    else:
        c = int(k * policy.contextual + 0.5)
    return k - min(c, k), min(c, k)


def visionzip_by_hand(policy, r) -> tuple[list[int], dict[int, torch.Tensor]]:
    """VisionZip from its description over the alive tokens: (kept grid indices, each contextual target's row)."""
    alive, k = r["alive"], r["k"]
    n = alive.numel()
    if k >= n:
        return alive.tolist(), {}
    d, c = split_by_hand(policy, k, r["image"].num_tokens)
    with_cls = bool(policy.cls_token) and d >= 1
    dominant = by_score(r["score"], range(n))[: d - with_cls]
    rest = [j for j in range(n) if j not in dominant]  # grid order
    targets = rest[:: max(1, len(rest) // c)][:c] if c else []
    keys = r["keys"] / r["keys"].norm(dim=-1, keepdim=True)
    joined: dict[int, list[int]] = {t: [] for t in targets}
    for j in rest:
        if j not in targets:
            sims = [float(keys[j] @ keys[t]) for t in targets]
            joined[targets[sims.index(max(sims))]].append(j)
    feats, rows = r["features"], {}
    for t, members in joined.items():
        row = feats[t] + (feats[members].mean(0) if members else 0)
        rows[int(alive[t])] = r["project"](row[None].to(r["sel"].values.dtype))[0].float().cpu() if r["project"] else row
    kept = dominant + targets
    if with_cls:
        kept.append(min(j for j in range(n) if j not in kept))  # the CLS feature's slot: first patch not kept
    return sorted(alive[kept].tolist()), rows


def hiprune_reads(self, ctx, b, i):
    obj, deep = self.layers
    return dict(obj=ctx.vision_attention(b, i, obj).float().cpu(), deep=ctx.vision_attention(b, i, deep).float().cpu())


def hiprune_by_hand(policy, r) -> list[int]:
    """HiPrune from its description over the alive tokens: kept grid indices."""
    alive, k, image = r["alive"].tolist(), r["k"], r["image"]
    n = len(alive)
    where = {g: j for j, g in enumerate(alive)}
    anchors = by_score(r["obj"], range(n))[: min(n, round(policy.alpha * k / 5))]
    chosen = set(anchors)
    for a in anchors:
        g = alive[a]
        grid = next(s for s in image.grids if s.offset <= g < s.offset + s.size)
        local = g - grid.offset
        for nb in (local - 1, local + 1, local - grid.width, local + grid.width):  # clamped, as the reference
            nb = grid.offset + min(max(nb, 0), grid.size - 1)
            if nb in where:  # a dropped neighbour is not kept
                chosen.add(where[nb])
    if len(chosen) > k:
        chosen = set(by_score(r["obj"], chosen)[:k])
    registers = by_score(r["deep"], [j for j in range(n) if j not in chosen])[: k - len(chosen)]
    return sorted(alive[j] for j in chosen | set(registers))


@torch.no_grad()
@pytest.mark.parametrize("pattern", ["duplicates", "flat"])
@pytest.mark.parametrize(
    "options", [dict(keep=6), dict(keep=0.5), dict(keep=0.5, contextual_fraction=0.125)], ids=["6", "half", "half-fraction"]
)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_set_is_a_hand_selection_among_the_kept_units(monkeypatch, family, name, options, pattern):
    if name == "hiprune" and "contextual_fraction" in options:
        pytest.skip("a VisionZip option")
    keep = options["keep"]
    model = model_for(family, "sdpa")
    batch, dropped = with_pattern(model, inputs(model, unmixed_specs(family)), pattern)
    cls, reads = (VisionZip, visionzip_reads) if name == "visionzip" else (HiPrune, hiprune_reads)
    records = spy(monkeypatch, cls, reads)
    vtprune.wrap(model, Pipeline([PixelPrune(), make(name, **options)]))
    model(**batch)
    stages = stages_of(model)
    assert sorted(records) == [(b, i) for b, s in enumerate(stages) for i in range(len(s))]  # every image selected
    assert stages[0][0][0] == [u for u in range(len(stages[0][0][0]) + len(dropped)) if u not in dropped]
    for (b, i), r in records.items():
        pixel, got = stages[b][i]
        assert r["alive"].tolist() == pixel  # the policy chose among PixelPrune's units
        n_tokens = r["image"].num_tokens
        budget = keep if isinstance(keep, int) else round(keep * n_tokens)  # counted from the unpruned image
        f = getattr(r["policy"], "contextual_fraction", None)
        if f is not None and isinstance(keep, float):  # VisionZip's Qwen reference count: int((keep - f) N) + int(f N)
            budget = int(n_tokens * round(keep - f, 12)) + max(int(n_tokens * f), 1)
        assert r["k"] == min(budget, len(pixel)) and len(got) == r["k"]  # the budget, exactly
        assert set(got) <= set(pixel)
        if name == "visionzip":
            want, rows = visionzip_by_hand(r["policy"], r)
            assert got == want
            sel = r["sel"]
            for j, index in enumerate(sel.indices.tolist()):
                g = int(r["alive"][index])
                if g in rows:
                    torch.testing.assert_close(sel.values[j].float().cpu(), rows[g], rtol=1e-4, atol=1e-5)
        else:
            assert got == hiprune_by_hand(r["policy"], r)


# ----------------------------------------------------------------- HiPrune's buffers on a grid with holes
def test_hiprune_dropped_neighbours_leave_their_share_to_the_registers():
    """A 4 x 5 grid, units 1 and 5 dropped (the right and lower neighbours of anchor 0): the anchor's buffer is
    what is alive around it (0 itself, clamped), the registers fill the budget to exactly k."""
    grid = SubGrid(offset=0, height=4, width=5)
    alive = torch.tensor([u for u in range(20) if u not in (1, 5)])
    obj = torch.zeros(18)
    obj[0] = 1.0  # unit 0 is the anchor
    deep = torch.arange(18, dtype=torch.float32)  # registers: the last alive units first
    image = SimpleNamespace(num_tokens=20, grids=[grid])
    ctx = SimpleNamespace(
        layouts=[SimpleNamespace(images=[image])],
        alive=[[alive]],
        vision_attention=lambda b, i, layer: obj if layer == 0 else deep,
    )
    ctx.alive_rank = lambda b, i: StageContext.alive_rank(ctx, b, i)  # the real mapping, on this stub's fields
    policy = HiPrune(keep=5, alpha=1.0, object_layer=1, deep_layer=2)  # round(1.0 * 5 / 5) = 1 anchor
    sel = policy.select_image(ctx, 0, 0, 5)
    kept = sorted(alive[sel.indices].tolist())
    assert kept == [0, 16, 17, 18, 19]  # neighbours 1 and 5 dropped; 4 registers from the deep scores
    assert kept == hiprune_by_hand(policy, dict(alive=alive, k=5, image=image, obj=obj, deep=deep))
    # the whole grid alive: the buffers 1 and 5 are kept, 2 registers
    everything = torch.arange(20)
    ctx.alive = [[everything]]
    obj20, deep20 = torch.zeros(20), torch.arange(20, dtype=torch.float32)
    obj20[0] = 1.0
    ctx.vision_attention = lambda b, i, layer: obj20 if layer == 0 else deep20
    assert sorted(policy.select_image(ctx, 0, 0, 5).indices.tolist()) == [0, 1, 5, 18, 19]


# ----------------------------------------------------------------- vit_layer=k after PixelPrune
SAME_SIGNALS = {
    "visionzip": (dict(keep=6), dict(keep=6, layer=2, cls_token=False)),
    "hiprune": (dict(keep=10), dict(keep=10, deep_layer=2)),
}


@torch.no_grad()
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("family", VIT_FAMILIES)
def test_vit_layer_keep_sets_equal_the_same_signals_read_after_the_encoder(family, name):
    """Both after PixelPrune: blocks up to k run on its units either way, so layer k's signals, and the selection
    from them, are the same inside the encoder as after it."""
    model = deep_model(family)
    batch, _ = with_pattern(model, inputs(model, unmixed_specs(family)), "duplicates")
    inside, after = SAME_SIGNALS[name]
    vtprune.wrap(model, Pipeline([PixelPrune(), make(name, vit_layer=2, **inside)]))
    model(**batch)
    got = stages_of(model)
    vtprune.unwrap(model)
    vtprune.wrap(model, Pipeline([PixelPrune(), make(name, **after)]))
    model(**batch)
    assert got == stages_of(model)
    first = got[0][0]
    assert len(first[1]) == (6 if name == "visionzip" else 10)
    assert set(first[1]) <= set(first[0]) and len(first[0]) < max(first[0]) + 1  # among PixelPrune's, some dropped


@torch.no_grad()
@pytest.mark.parametrize("where", ["after", "vit"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_alone_and_cache_equals_recomputation(family, name, where):
    """The signals over the kept units do not depend on the batch (CLIP pads a call's images to the longest kept
    set: CLS attention, received attention and keys leave the padding out)."""
    if where == "vit" and family not in VIT_FAMILIES:
        pytest.skip(f"{family}: pixelprune then vit_layer not built")
    model = deep_model(family)
    batch, _ = with_pattern(model, inputs(model, unmixed_specs(family)), "duplicates")
    vtprune.wrap(model, Pipeline([PixelPrune(), make(name, vit_layer=1 if where == "vit" else None)]))
    together = model(**batch).logits[:, -1]
    assert torch.isfinite(together).all()
    kept = stages_of(model)
    for b in range(batch["input_ids"].shape[0]):
        alone = model(**sample_alone(batch, b, family)).logits[:, -1]
        assert stages_of(model)[0] == kept[b]
        torch.testing.assert_close(alone[0], together[b], rtol=1e-4, atol=1e-5)
    kw = gen_kwargs(4)
    assert torch.equal(model.generate(**batch, **kw), model.generate(**batch, use_cache=False, **kw))


# ----------------------------------------------------------------- the Pipeline's order rule
def test_only_pixelprune_may_come_before():
    Pipeline([PixelPrune(), VisionZip(keep=8)])
    Pipeline([PixelPrune(), HiPrune(keep=8, vit_layer=1)])
    for second in (VisionZip(keep=8), HiPrune(keep=8)):
        with pytest.raises(ValueError, match="put it first in a Pipeline or right after pixelprune"):
            Pipeline([Random(keep=16, where="vision"), second])
        with pytest.raises(ValueError, match="put it first in a Pipeline or right after pixelprune"):
            Pipeline([PixelPrune(), Random(keep=16, where="vision"), second])


# ----------------------------------------------------------------- the signals: the tower's attention as it ran
def record_weights(monkeypatch, module, attention_class) -> list:
    """Every eager attention call of `attention_class` modules: (module, softmax weights ``(B, heads, q, k)``)."""
    calls: list = []
    original = module.eager_attention_forward

    def eager(mod, *args, **kwargs):
        out, weights = original(mod, *args, **kwargs)
        if isinstance(mod, attention_class):
            calls.append((mod, weights.float()))
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", eager)
    return calls


@torch.no_grad()
def test_clip_cls_attention_is_over_the_kept_patches(monkeypatch):
    """VisionZip's dominant score on LLaVA-1.5 (CLS attention) equals the weights the tower's eager attention
    computed on CLS and the kept patches (each image its own row of the call, padding after its kept patches)."""
    from transformers.models.clip import modeling_clip

    model = model_for("llava", "eager")
    batch, dropped = with_pattern(model, inputs(model, unmixed_specs("llava")), "duplicates")
    records = spy(monkeypatch, VisionZip, visionzip_reads)
    calls = record_weights(monkeypatch, modeling_clip, modeling_clip.CLIPAttention)
    vtprune.wrap(model, Pipeline([PixelPrune(), make("visionzip")]))
    model(**batch)
    policy = next(iter(records.values()))["policy"]
    assert policy.dominant_score == "cls"
    layer = model.model.vision_tower.encoder.layers[policy.layer - 1].self_attn
    (weights,) = [w for mod, w in calls if mod is layer]
    assert weights.shape[0] == len(records)  # one row of the call per image
    for row, key in enumerate(sorted(records)):
        r = records[key]
        n = r["alive"].numel()
        want = weights[row, :, 0, 1 : 1 + n].sum(0)  # the CLS query, the kept patches' columns, summed over heads
        torch.testing.assert_close(r["score"], want, rtol=1e-5, atol=1e-6)
        assert float(weights[row, :, 0, 1 + n :].sum()) < 1e-6  # padding gets nothing
    assert records[(0, 0)]["alive"].numel() == 64 - len(dropped) and weights.shape[-1] == 1 + 64  # padded


@torch.no_grad()
@pytest.mark.parametrize("name", NAMES)
def test_qwen_received_attention_is_over_the_kept_units(monkeypatch, name):
    """HiPrune's and VisionZip's Qwen score (attention received) equals the tower's eager attention over each
    image's kept units (its own segment): column sums over the segment's queries, mean over heads, the 4 patches
    of a unit averaged."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    model = model_for("qwen2_vl", "eager")
    batch, dropped = with_pattern(model, inputs(model, unmixed_specs("qwen2_vl")), "duplicates")
    cls, reads = (VisionZip, visionzip_reads) if name == "visionzip" else (HiPrune, hiprune_reads)
    records = spy(monkeypatch, cls, reads)
    calls = record_weights(monkeypatch, modeling_qwen2_vl, modeling_qwen2_vl.VisionAttention)
    vtprune.wrap(model, Pipeline([PixelPrune(), make(name)]))
    model(**batch)
    policy = next(iter(records.values()))["policy"]
    blocks = model.model.visual.blocks
    layers = {"score": policy.layer - 1} if name == "visionzip" else dict(zip(("obj", "deep"), policy.layers))
    images = sorted(k for k, r in records.items() if r["image"].kind == "image")  # the image call's segments, in order
    assert images and records[images[0]]["alive"].numel() == records[images[0]]["image"].num_tokens - len(dropped)
    for signal, layer in layers.items():
        segments = [w for mod, w in calls if mod is blocks[layer].attn][: len(images)]
        for key, weights in zip(images, segments):
            r = records[key]
            received = weights[0].sum(1).mean(0)  # (rows,): over the segment's queries, mean over heads
            assert received.numel() == 4 * r["alive"].numel()  # the segment holds the kept units only
            torch.testing.assert_close(r[signal], received.view(-1, 4).mean(1), rtol=1e-5, atol=1e-6)
