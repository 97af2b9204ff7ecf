"""Every policy on every family: budgets, a sample alone == in a batch, cached == uncached generation, eager == SDPA == a
backend without attention weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import ATTNS, gen_kwargs, inputs, mixed_specs, model_for, patch_positions, sample_alone

import vtprune
from vtprune import zoo
from vtprune.policies import (
    DART,
    CDPruner,
    DivPrune,
    EntropyPrune,
    FastV,
    Fixed,
    HiPrune,
    HoloV,
    IDPruner,
    MMTok,
    Pipeline,
    PruneSID,
    PyramidDrop,
    Scope,
    SparseVLM,
    TransPrune,
    VisionZip,
    VisPruner,
)

POLICIES = {
    "idpruner": lambda k: IDPruner(keep=k, per_image=True),
    "idpruner_pooled": lambda k: IDPruner(keep=k),
    "idpruner_received": lambda k: IDPruner(keep=k, importance="received"),
    "mmtok": lambda k: MMTok(keep=k),
    "divprune": lambda k: DivPrune(keep=k),
    "entropyprune": lambda k: EntropyPrune(keep=k),
    "fastv": lambda k: FastV(keep=k),
    # a short schedule for the 4-layer tiny models; `keep` sets the last stage
    "transprune": lambda k: TransPrune(keep=k, prune_after=(1, 3), ratios=(0.5, 0.25), ttv_from=1),
    # the tiny ViTs have 2 layers (the defaults, 9 / block 16, are refused there); alpha=1 so anchors and buffers show
    "hiprune": lambda k: HiPrune(keep=k, alpha=1.0, object_layer=1, deep_layer=2),
    "visionzip": lambda k: VisionZip(keep=k),  # per-model defaults (LLaVA: 10/64 of k contextual; Qwen: 5 % of N)
    "dart": lambda k: DART(keep=k, budget="exact"),  # the reference budget keeps 4 pivots above keep (unit tests)
    "pdrop": lambda k: PyramidDrop(keep=k, prune_after=(1, 3), ratios=(0.5, 0.25)),
    "holov": lambda k: HoloV(keep=k),  # overflow="redistribute": exactly k per image
    "cdpruner": lambda k: CDPruner(keep=k),  # text="llm": the question's LLM embeddings
    "cdpruner_split": lambda k: CDPruner(keep=k, relevance_weight=0.5, split=True),  # OpenVINO's settings
    "scope": lambda k: Scope(keep=k),
    "vispruner": lambda k: VisPruner(keep=k),
    # the Qwen variant's reference count, max(round(M keep / 576), 16), would keep tiny images whole: keep per image
    "prunesid": lambda k: PruneSID(keep=k, reference_budget=False),
    # two pruning layers on the 4-layer tiny models (scoring layers 1 and 2); K_s = (2k, k), merged rows inserted
    "sparsevlm": lambda k: SparseVLM(budgets=(2 * k, k) if isinstance(k, int) else (4, 2), prune_after=(2, 3)),
}


def make(policy: str, k, family: str):
    """``POLICIES[policy](k)`` for `family`'s tiny model (sparsevlm on qwen3_5: its one full-attention layer, 1, scores)."""
    made = POLICIES[policy](k)
    if policy == "sparsevlm" and family == "qwen3_5":
        made = dataclasses.replace(made, budgets=made.budgets[-1:], prune_after=(2,))
    return made


def sparsevlm_merged(n: int, k: int) -> int:
    """Merged rows one SparseVLM pruning layer adds to n current tokens at budget k (the reference's arithmetic)."""
    kept = min(k, n - 1)
    return int((int((n - kept) * 0.3) + 1) / 10) + 1


def zoo_layer(family: str, policy: str, default: int) -> int:
    """The family's ``at_layer`` in model_zoo.yaml (e.g. qwen3_5: K-1 = 3, its first full-attention layer)."""
    return zoo.policy_defaults(family, policy).get("at_layer", default)


PROMPT_CONDITIONED = (
    "idpruner",
    "idpruner_pooled",
    "mmtok",
    "fastv",
    "transprune",
    "dart",
    "pdrop",
    "cdpruner",
    "cdpruner_split",
)


def _stage(image):
    """The image's last stage, (name, record): the only one, or TransPrune's last prune point."""
    return list(image["stages"].items())[-1]


def _replay(data):
    """`fixed` steps that redo every stage of a report (recomputation sees the generated tokens in the prompt too)."""
    names = next(list(i["stages"]) for s in data["samples"] for i in s["images"])
    steps = []
    for name in names:
        kept = [[i["stages"][name]["kept"] for i in s["images"]] for s in data["samples"]]
        steps.append(Fixed(kept=kept, at_layer=int(name[4:]) if name.startswith("llm@") else None))
    return Pipeline(steps)


@torch.no_grad()
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_budgets_and_cache(family, attn, policy):
    model = model_for(family, attn)
    batch = inputs(model, mixed_specs(family))
    vtprune.wrap(model, make(policy, 3, family))
    kw = gen_kwargs(4)
    cached = model.generate(**batch, **kw)
    want_stages = {
        "entropyprune": [f"llm@{zoo_layer(family, 'entropyprune', 1)}"],
        "fastv": [f"llm@{zoo_layer(family, 'fastv', 2)}"],
        "transprune": ["llm@1", "llm@3"],
        "hiprune": ["vision"],
        "dart": [f"llm@{zoo_layer(family, 'dart', 2)}"],
        "pdrop": ["llm@1", "llm@3"],
        "visionzip": ["vision"],
        "scope": ["vision"],
        "vispruner": ["vision"],
        "prunesid": ["vision"],
        "sparsevlm": ["llm@2"] if family == "qwen3_5" else ["llm@2", "llm@3"],
    }.get(policy, ["projector"])
    data = vtprune.report(model).to_dict()
    if policy in PROMPT_CONDITIONED:
        vtprune.wrap(model, _replay(data))  # the cached run's keep sets, every stage
    assert torch.equal(cached, model.generate(**batch, use_cache=False, **kw))
    for sample in data["samples"]:
        afters = []
        for image in sample["images"]:
            assert list(image["stages"]) == want_stages
            name, stage = _stage(image)
            assert stage["kept"] == sorted(set(stage["kept"])) and all(0 <= k < image["tokens"] for k in stage["kept"])
            afters.append(stage["after"])
            if policy == "sparsevlm":  # min(K, n - 1) kept (merged rows of the last layer among them), new merged rows
                n = stage["before"]
                assert stage["after"] == min(3, n - 1) + sparsevlm_merged(n, 3)
                assert len(stage["kept"]) + stage["inserted"] == stage["after"]
                assert stage["inserted"] >= sparsevlm_merged(n, 3)
            elif policy not in ("idpruner_pooled", "idpruner_received"):
                assert stage["after"] == min(3, image["tokens"])
        if policy in ("idpruner_pooled", "idpruner_received"):  # one selection over the sample's images: the total is exact
            assert sum(afters) == min(3 * len(afters), sum(i["tokens"] for i in sample["images"]))


@torch.no_grad()
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_batch_equals_one_by_one(family, policy):
    model = model_for(family, "sdpa")
    vtprune.wrap(model, make(policy, 0.25, family))
    batch = inputs(model, mixed_specs(family))
    together = model(**batch).logits[:, -1]
    kept_together = vtprune.report(model).to_dict()["samples"]
    for b in range(batch["input_ids"].shape[0]):
        alone = model(**sample_alone(batch, b, family)).logits[:, -1]
        assert vtprune.report(model).to_dict()["samples"][0] == kept_together[b] | {
            "images": [
                dict(i, stages={k: dict(v, ms=i2["stages"][k]["ms"]) for k, v in i["stages"].items()})
                for i, i2 in zip(kept_together[b]["images"], vtprune.report(model).to_dict()["samples"][0]["images"])
            ]
        }
        torch.testing.assert_close(alone[0], together[b], rtol=1e-4, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_selections_do_not_depend_on_the_attention_backend(family, policy):
    picks = {}
    for name in ("eager", "sdpa", "vtprune_noweights"):
        model = model_for(family, name)
        vtprune.wrap(model, make(policy, 3, family))
        model(**inputs(model, mixed_specs(family)))
        samples = vtprune.report(model).to_dict()["samples"]
        picks[name] = [[{k: v["kept"] for k, v in i["stages"].items()} for i in s["images"]] for s in samples]
    assert picks["eager"] == picks["sdpa"] == picks["vtprune_noweights"]


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models_select_and_generate(family, dtype):
    model = model_for(family, "sdpa").to(dtype)
    batch = inputs(model, mixed_specs(family))
    for key in ("pixel_values", "pixel_values_videos"):
        if key in batch:
            batch[key] = batch[key].to(dtype)
    for policy in ("mmtok", "divprune", "entropyprune", "idpruner", "transprune", "hiprune", "visionzip"):
        vtprune.wrap(model, POLICIES[policy](3))
        out = model.generate(**batch, **gen_kwargs(2))
        assert out.shape[1] == batch["input_ids"].shape[1] + 2
        for sample in vtprune.report(model).to_dict()["samples"]:
            for image in sample["images"]:
                assert _stage(image)[1]["after"] == 3


def test_bad_policy_options_leave_the_model_untouched(tmp_path):
    model = model_for("llava", "sdpa")
    for call, err, words in [
        (lambda: vtprune.wrap(model, "idpruner", keep=4, lam=1.5), ValueError, "1.5"),
        (lambda: vtprune.wrap(model, "mmtok", keep=4, tau_v=0), ValueError, "tau_v"),
        (lambda: vtprune.wrap(model, "mmtok", keep=4, alpha=-1), ValueError, "alpha"),
        (lambda: vtprune.wrap(model, "entropyprune", keep=4, at_layer=9), ValueError, "at_layer"),
        (lambda: vtprune.wrap(model, "idpruner", keep=4, selector=str(tmp_path / "missing")), ValueError, "missing"),
    ]:
        with pytest.raises(err, match=words):
            call()
        assert not vtprune.is_wrapped(model)


@torch.no_grad()
def test_entropyprune_keeps_the_top_entropy_tokens_of_the_unwrapped_model(family):
    """Independent truth: layer K-1's input from the unwrapped model, queries and entropy by brute force."""
    from vtprune.ops.select import topk_indices
    from vtprune.patches.attention import layer_queries

    model = model_for(family, "sdpa")
    batch = inputs(model, mixed_specs(family)[:1])
    at = zoo_layer(family, "entropyprune", 1)
    seen = {}
    layer = model.model.language_model.layers[at - 1]
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.update(h=args[0]))
    model(**batch)
    handle.remove()
    visual = patch_positions(model, batch)
    q = layer_queries(layer, seen["h"][0, visual])
    r = q.double() - q.double().mean(1, keepdim=True)
    lam = torch.linalg.eigvalsh(r @ r.transpose(1, 2) / q.shape[1]).clamp_min(1e-10)
    entropy = -(lam * lam.log()).sum(-1) / torch.log(torch.tensor(float(q.shape[1]), dtype=torch.float64))
    want = topk_indices(entropy, 5).tolist()
    vtprune.wrap(model, EntropyPrune(keep=5))
    model(**batch)
    assert _stage(vtprune.report(model).to_dict()["samples"][0]["images"][0])[1]["kept"] == want


@torch.no_grad()
def test_beam_search_and_several_returns_prune_each_copy_alike(family):
    """generate() encodes images once, then repeats every sample (beams, num_return_sequences)."""
    model = model_for(family, "sdpa")
    batch = inputs(model, mixed_specs(family))
    vtprune.wrap(model, MMTok(keep=3))
    model(**batch)
    single = [[_stage(i)[1]["kept"] for i in s["images"]] for s in vtprune.report(model).to_dict()["samples"]]
    kw = gen_kwargs(3, num_beams=2, num_return_sequences=2)
    out = model.generate(**batch, **kw)
    repeated = [[_stage(i)[1]["kept"] for i in s["images"]] for s in vtprune.report(model).to_dict()["samples"]]
    assert repeated == [k for k in single for _ in range(2)]
    vtprune.wrap(model, Fixed(kept=repeated))  # the same keep sets, recomputed without a cache
    assert torch.equal(out, model.generate(**batch, use_cache=False, **kw))


@torch.no_grad()
def test_idpruner_received_importance_equals_brute_force_on_llava():
    """importance='received': MMR over the projected features with the eager ViT's attention received at the feature layer."""
    from helpers import lm_input_embeds, visual_positions
    from policies.test_greedy_ops import brute_mmr

    from vtprune.tiny import SampleSpec

    model = model_for("llava", "eager")
    batch = inputs(model, [SampleSpec(images=((32, 32), (32, 32)), question=5)])
    tower = model.model.vision_tower
    layer = len(tower.encoder.layers) + model.config.vision_feature_layer  # 0-based; its output is the feature
    attn = tower(batch["pixel_values"], output_attentions=True).attentions[layer]  # (images, heads, T, T)
    received = attn.float().mean(1).sum(1)[:, 1:]  # every query (CLS too), mean over heads, CLS column dropped
    width = model.config.text_config.hidden_size
    feats = lm_input_embeds(model, batch)[0][visual_positions("llava", batch["input_ids"])].view(2, -1, width)
    vtprune.wrap(model, IDPruner(keep=6, importance="received", per_image=True))
    try:
        model(**batch)
        images = vtprune.report(model).to_dict()["samples"][0]["images"]
    finally:
        vtprune.unwrap(model)
    for g, image in enumerate(images):
        assert image["stages"]["projector"]["kept"] == brute_mmr(feats[g], received[g], 6, 0.5)
