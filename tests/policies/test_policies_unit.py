"""IDPruner, MMTok, DivPrune and EntropyPrune on hand-built stage contexts (no model needed)."""

import json
import math
import warnings
from types import SimpleNamespace

import pytest
import torch

import vtprune
from vtprune.context import StageContext, token_rows
from vtprune.layout import ImageLayout, SampleLayout, SubGrid
from vtprune.ops.coverage import coverage_select
from vtprune.ops.diversity import divprune_select
from vtprune.ops.entropy import matrix_entropy
from vtprune.ops.mmr import mmr_select
from vtprune.ops.select import topk_indices
from vtprune.patches.attention import layer_queries
from vtprune.patches.base import Adapter
from vtprune.policies.base import make_policy
from vtprune.policies.baselines import Random
from vtprune.policies.divprune import DivPrune
from vtprune.policies.entropyprune import EntropyPrune
from vtprune.policies.hiprune import HiPrune
from vtprune.policies.idpruner import IDPruner, split_pooled
from vtprune.policies.mmtok import MMTok, coverage_matrix
from vtprune.policies.selector import load_selector

DIM, PRE_DIM = 16, 12


class FakeAdapter:
    """The adapter surface the policies touch."""

    def __init__(self, model_type="llava", num_layers=4, hidden_size=DIM, layers=None):
        self.model_type = model_type
        self.num_layers = num_layers
        self.text_config = SimpleNamespace(hidden_size=hidden_size)
        self.decoder_layers = layers
        self.pre = {}

    def pre_projector_features(self, captured, layouts, b, i):
        return self.pre[b, i]

    decoder_queries = Adapter.decoder_queries


def make_ctx(samples, adapter=None, seed=0, stage="projector", layer=None):
    """A StageContext for samples given as ``{"images": [size or [SubGrid, ...]], "question": m}``.

    Sequence of a sample: one prefix token, its images back to back with one
    separator token after each, then ``m`` question tokens, right-padded.
    """
    g = torch.Generator().manual_seed(seed)
    adapter = adapter or FakeAdapter()
    lengths = [1 + sum(_size(img) + 1 for img in s["images"]) + s.get("question", 0) for s in samples]
    length = max(lengths)
    hidden = torch.randn(len(samples), length, DIM, generator=g)
    layouts, alive, seq_positions, questions = [], [], [], []
    for b, sample in enumerate(samples):
        pos, images = 1, []
        for i, img in enumerate(sample["images"]):
            n = _size(img)
            grids = img if isinstance(img, list) else [SubGrid(0, 1, n)]
            positions = torch.arange(pos, pos + n)
            images.append(ImageLayout(i, positions, grids, torch.zeros(0, dtype=torch.long)))
            adapter.pre[b, i] = torch.randn(n, PRE_DIM, generator=g)
            pos += n + 1
        question = torch.arange(pos, pos + sample.get("question", 0))
        valid = torch.arange(length) < lengths[b]
        layouts.append(SampleLayout(images, question, valid))
        alive.append([torch.arange(img.num_tokens) for img in images])
        seq_positions.append([img.positions for img in images])
        questions.append(question)
    return StageContext(stage, layer, layouts, hidden, alive, seq_positions, questions, adapter)


def _size(img):
    return sum(g.size for g in img) if isinstance(img, list) else img


def kept(selections):
    return [[s.indices.tolist() for s in sample] for sample in selections]


# --- registry and option checks ------------------------------------------------------


@pytest.mark.parametrize("name", ["idpruner", "mmtok", "divprune", "entropyprune"])
def test_registered_by_name(name):
    policy = make_policy(name, keep=0.25)
    assert policy.name == name and policy.keep == 0.25


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: IDPruner(lam=-0.1), r"lam must be a number in \[0, 1\]; got -0.1"),
        (lambda: IDPruner(lam=1.5), r"lam must be a number in \[0, 1\]; got 1.5"),
        (lambda: IDPruner(importance="attention"), r"importance must be one of \('prompt', 'norm', 'received'\)"),
        (lambda: IDPruner(keep=9.0), r"keep as a fraction must be in \(0, 1\]; got 9.0"),
        (lambda: MMTok(alpha=-1), r"alpha must be a finite number >= 0; got -1"),
        (lambda: MMTok(tau_v=0), r"tau_v must be a finite number > 0; got 0"),
        (lambda: MMTok(tau_t=float("nan")), r"tau_t must be a finite number > 0; got nan"),
        (lambda: EntropyPrune(normalize="sum"), r"normalize must be one of \(None, 'trace'\); got 'sum'"),
        (lambda: EntropyPrune(at_layer=0), r"at_layer must be an int >= 1"),
        (lambda: DivPrune(keep=0), r"keep as a token count must be >= 1; got 0"),
    ],
)
def test_bad_options_raise_with_value_and_range(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: IDPruner(lam=True), r"lam must be a number in \[0, 1\]; got True"),
        (lambda: Random(seed="1"), "seed must be an int; got '1'"),
        (lambda: EntropyPrune(at_layer=2.0), "at_layer must be an int >= 1; got 2.0"),
        (lambda: HiPrune(wrap_correct="yes"), "wrap_correct must be True or False"),
    ],
)
def test_a_value_of_the_wrong_type_is_a_type_error_and_a_user_error(make, message):
    from vtprune.checks import BadType, UserInputError

    with pytest.raises(TypeError, match=message) as info:
        make()
    assert isinstance(info.value, BadType) and isinstance(info.value, UserInputError)
    with pytest.raises(ValueError) as info:  # the right type, a value out of range
        Random(seed=1, at_layer=0)
    assert isinstance(info.value, UserInputError) and not isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: IDPruner(per_image="yes"), "per_image must be True or False"),
        (lambda: MMTok(per_crop=1), "per_crop must be True, False or None"),
        (lambda: EntropyPrune(average=1), "average must be True or False"),
        (lambda: IDPruner(selector=3), "selector must be a directory path or None"),
    ],
)
def test_bad_option_types_raise(make, message):
    with pytest.raises(TypeError, match=message):
        make()


# --- IDPruner ------------------------------------------------------------------------------


def test_idpruner_pools_images_of_a_sample():
    ctx = make_ctx([{"images": [30, 20], "question": 5}, {"images": [12], "question": 0}])
    policy = IDPruner(keep=8, importance="norm")
    out = policy.select(ctx)
    # sample 0: one problem over 50 tokens with K = 8 + 8
    x = torch.cat([ctx.features(0, 0), ctx.features(0, 1)])
    expected = mmr_select(x, x.norm(dim=-1), 16, 0.5).tolist()
    got = out[0][0].indices.tolist() + [30 + j for j in out[0][1].indices.tolist()]
    assert got == expected
    assert kept(out)[1] == [mmr_select(ctx.features(1, 0), ctx.features(1, 0).norm(dim=-1), 8).tolist()]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e38])
def test_idpruner_norm_importance_with_nonfinite_or_huge_features_selects_as_on_the_zeroed_features(bad):
    # the norms are the finite check: a NaN/inf entry (or a finite one whose square overflows) is caught there
    ctx = make_ctx([{"images": [40], "question": 3}])
    rows = ctx.seq_positions[0][0]
    ctx.hidden[0, rows[5], 2] = bad
    ctx.hidden[0, rows[17], 0] = -bad
    x = ctx.features(0, 0)
    if bad == 3e38:  # finite: nothing to replace in the features; their inf norms are replaced as importance
        with pytest.warns(RuntimeWarning, match="2 non-finite importance scores replaced"):
            got = IDPruner(keep=9, importance="norm").select(ctx)[0][0].indices.tolist()
        clean = x
    else:
        with pytest.warns(RuntimeWarning, match="2 non-finite features entries set to 0"):
            got = IDPruner(keep=9, importance="norm").select(ctx)[0][0].indices.tolist()
        clean = torch.where(torch.isfinite(x), x, torch.zeros(()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert got == mmr_select(clean, torch.linalg.vector_norm(clean, dim=-1), 9).tolist()


def test_idpruner_fraction_budget_is_rounded_over_the_sample():
    ctx = make_ctx([{"images": [30, 21], "question": 3}])
    out = IDPruner(keep=0.25, importance="norm").select(ctx)
    assert sum(s.indices.numel() for s in out[0]) == round(51 * 0.25)


def test_idpruner_per_image_budgets():
    ctx = make_ctx([{"images": [30, 20], "question": 4}])
    out = IDPruner(keep=0.25, per_image=True, lam=0.3, importance="prompt").select(ctx)
    q = ctx.question(0).mean(dim=0)
    for i, n in enumerate((30, 20)):
        x = ctx.features(0, i)
        scores = torch.nn.functional.cosine_similarity(x, q[None], dim=-1, eps=0)
        assert out[0][i].indices.tolist() == mmr_select(x, scores, round(n * 0.25), 0.3).tolist()


def test_idpruner_prompt_importance_without_question_falls_back_to_norm():
    ctx = make_ctx([{"images": [25], "question": 0}])
    assert kept(IDPruner(keep=6, importance="prompt").select(ctx)) == kept(IDPruner(keep=6, importance="norm").select(ctx))


def test_idpruner_keeps_everything_when_budget_covers_the_sample():
    ctx = make_ctx([{"images": [3, 2], "question": 1}])
    assert kept(IDPruner(keep=10, importance="norm").select(ctx)) == [[[0, 1, 2], [0, 1]]]


def test_split_pooled():
    parts = split_pooled(torch.tensor([0, 2, 5, 6, 9]), [3, 0, 4, 3])
    assert [p.indices.tolist() for p in parts] == [[0, 2], [], [2, 3], [2]]


def test_idpruner_describe_labels_training_free():
    assert IDPruner().describe().startswith("IDPruner-TF")


# --- VisionSelector loader --------------------------------------------------------------------


def write_selector(root, prefix="", in_features=DIM, hidden_dim=6, drop=(), config=None, seed=0):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {
        "q_proj.weight": torch.randn(hidden_dim, in_features, generator=g),
        "q_proj.bias": torch.randn(hidden_dim, generator=g),
        "k_proj.weight": torch.randn(hidden_dim, in_features, generator=g),
        "k_proj.bias": torch.randn(hidden_dim, generator=g),
        "norm.weight": torch.ones(in_features),
    }
    save_file({prefix + k: v for k, v in tensors.items() if k not in drop}, str(root / "scorer.safetensors"))
    cfg = {"in_features": in_features, "hidden_dim": hidden_dim, "architecture": "TransformerScorer"}
    (root / "config.json").write_text(json.dumps(config if config is not None else cfg))
    return tensors


@pytest.mark.parametrize(
    "prefix", ["", "module.", "visual.importance_scorer.", "_orig_mod.", "module._orig_mod.visual.importance_scorer."]
)
def test_selector_loads_any_prefix_and_scores_like_the_reference(tmp_path, prefix):
    w = write_selector(tmp_path / "sel", prefix)
    selector = load_selector(tmp_path / "sel")
    x = torch.randn(7, DIM, generator=torch.Generator().manual_seed(1))
    q = x @ w["q_proj.weight"].T + w["q_proj.bias"]
    k = x @ w["k_proj.weight"].T + w["k_proj.bias"]
    reference = (q @ k.T / math.sqrt(6)).mean(dim=-1)  # the reference: mean over keys of q.k / sqrt(hidden_dim)
    assert torch.allclose(selector.score(x), reference, atol=1e-4, rtol=1e-4)


def test_selector_drives_idpruner(tmp_path):
    write_selector(tmp_path / "sel")
    policy = IDPruner(keep=5, selector=str(tmp_path / "sel"))
    ctx = make_ctx([{"images": [20], "question": 2}])
    x = ctx.features(0, 0)
    assert kept(policy.select(ctx)) == [[mmr_select(x, policy._scorer.score(x), 5).tolist()]]
    assert "IDPruner-TF" not in policy.describe()
    policy.bind(FakeAdapter(hidden_size=DIM))
    with pytest.raises(ValueError, match="scores 16-dim features .* 32-dim"):
        policy.bind(FakeAdapter(hidden_size=32))


def test_selector_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        IDPruner(selector=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_selector(tmp_path / "empty")
    write_selector(tmp_path / "noweights")
    (tmp_path / "noweights" / "scorer.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors"):
        load_selector(tmp_path / "noweights")
    write_selector(tmp_path / "partial", drop=("k_proj.bias",))
    with pytest.raises(ValueError, match=r"lacks tensors \['k_proj.bias'\]"):
        load_selector(tmp_path / "partial")
    write_selector(tmp_path / "arch", config={"in_features": DIM, "hidden_dim": 6, "architecture": "MLP"})
    with pytest.raises(ValueError, match="architecture must be 'TransformerScorer'; got 'MLP'"):
        load_selector(tmp_path / "arch")
    write_selector(tmp_path / "shape", config={"in_features": 8, "hidden_dim": 6})
    with pytest.raises(ValueError, match=r"q_proj.weight has shape \(6, 16\).*needs \(6, 8\)"):
        load_selector(tmp_path / "shape")
    write_selector(tmp_path / "nodim", config={"in_features": DIM})
    with pytest.raises(ValueError, match="hidden_dim must be an int >= 1; got None"):
        load_selector(tmp_path / "nodim")
    write_selector(tmp_path / "wide", in_features=24)
    with pytest.raises(ValueError, match="scores 24-dim features"):
        load_selector(tmp_path / "wide").score(torch.randn(3, DIM))


# --- MMTok -----------------------------------------------------------------------------------------


def test_coverage_matrix_rows():
    g = torch.Generator().manual_seed(0)
    v, pre, t = (
        torch.randn(10, DIM, generator=g),
        torch.randn(10, PRE_DIM, generator=g),
        torch.randn(3, DIM, generator=g),
    )
    cover = coverage_matrix(v, pre, t, alpha=0.5, tau_v=0.2, tau_t=0.02)
    assert cover.shape == (13, 10)
    assert torch.allclose(cover[:3].sum(dim=1), torch.full((3,), 1 / 3))
    assert torch.allclose(cover[3:].sum(dim=1), torch.full((10,), 0.5 / 10))
    assert coverage_matrix(v, pre, t[:0]).shape == (10, 10)


@pytest.mark.parametrize("model_type, tau_t", [("llava", 0.02), ("qwen2_5_vl", 0.01)])
def test_mmtok_selects_by_coverage_with_per_model_text_temperature(model_type, tau_t):
    adapter = FakeAdapter(model_type=model_type)
    ctx = make_ctx([{"images": [40, 30], "question": 4}], adapter=adapter)
    out = MMTok(keep=0.1).bind(ctx.adapter).select(ctx)
    for i, n in enumerate((40, 30)):
        cover = coverage_matrix(ctx.features(0, i), adapter.pre[0, i], ctx.question(0), 0.5, 0.2, tau_t)
        assert out[0][i].indices.tolist() == coverage_select(cover, int(n * 0.1)).indices.tolist()  # floor


def test_mmtok_without_question_uses_visual_rows_only():
    adapter = FakeAdapter()
    ctx = make_ctx([{"images": [30], "question": 0}], adapter=adapter)
    cover = coverage_matrix(ctx.features(0, 0), adapter.pre[0, 0], None)
    assert kept(MMTok(keep=7).bind(ctx.adapter).select(ctx)) == [[coverage_select(cover, 7).indices.tolist()]]


def test_mmtok_per_crop_on_llava_next():
    adapter = FakeAdapter(model_type="llava_next")
    grids = [SubGrid(0, 4, 4), SubGrid(16, 4, 8)]
    ctx = make_ctx([{"images": [grids], "question": 3}], adapter=adapter)
    out = MMTok(keep=12).bind(adapter).select(ctx)[0][0].indices
    assert int((out < 16).sum()) == 4 and int((out >= 16).sum()) == 8  # 12 split 16:32
    whole = MMTok(keep=12, per_crop=False).bind(adapter).select(ctx)[0][0].indices
    v, pre, q = ctx.features(0, 0), adapter.pre[0, 0], ctx.question(0)
    assert whole.tolist() == coverage_select(coverage_matrix(v, pre, q), 12).indices.tolist()
    first = coverage_select(coverage_matrix(v[:16], pre[:16], q), 4).indices.tolist()
    assert out.tolist()[:4] == first


def test_mmtok_unknown_model_needs_tau_t():
    with pytest.raises(ValueError, match="no reference tau_t for model type 'idefics'"):
        MMTok().bind(FakeAdapter(model_type="idefics"))
    MMTok(tau_t=0.05).bind(FakeAdapter(model_type="idefics"))


# --- DivPrune --------------------------------------------------------------------------------------


def test_divprune_per_image():
    ctx = make_ctx([{"images": [30, 5], "question": 2}])
    out = DivPrune(keep=0.2).select(ctx)
    assert kept(out) == [[divprune_select(ctx.features(0, 0), 6).tolist(), [0]]]
    assert DivPrune(keep=0.2).image_budget(ctx, 0, 1) == 1


# --- EntropyPrune ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type, at", [("llava", 2), ("llava_next", 2), ("qwen2_vl", 1), ("qwen2_5_vl", 1), ("qwen3_5", 4)])
def test_entropyprune_per_model_layer(model_type, at):
    policy = EntropyPrune()
    assert policy.at is None
    bound = policy.bind(FakeAdapter(model_type=model_type, num_layers=5))
    assert bound.at == at and bound.signals().decoder_queries == (at - 1,) and bound.stage_key == f"llm@{at}"
    assert policy.at is None and policy == EntropyPrune()  # binding never writes onto the user's object
    other = "qwen2_vl" if at == 2 else "llava"
    assert policy.bind(FakeAdapter(model_type=other)).at == {"llava": 2, "qwen2_vl": 1}[other]  # per model


def test_entropyprune_layer_checks():
    with pytest.raises(ValueError, match=r"at_layer=4 is past the model's depth; .* must be in \[1, 3\]"):
        EntropyPrune(at_layer=4).bind(FakeAdapter(num_layers=4))
    with pytest.raises(RuntimeError, match="bind"):
        EntropyPrune().signals()
    with pytest.raises(ValueError, match="give at_layer explicitly"):
        EntropyPrune().bind(FakeAdapter(model_type="idefics"))


@pytest.mark.parametrize("keep, expected", [(192, 166), (128, 98), (64, 29)])
def test_entropyprune_average_budget_matches_reference(keep, expected):
    ctx = make_ctx([{"images": [576], "question": 1}], adapter=FakeAdapter(num_layers=32))
    policy = EntropyPrune(keep=keep, average=True).bind(ctx.adapter)
    assert policy.image_budget(ctx, 0, 0) == expected
    assert EntropyPrune(keep=keep, at_layer=2).image_budget(ctx, 0, 0) == keep


def test_entropyprune_average_unreachable_is_an_error():
    ctx = make_ctx([{"images": [576], "question": 1}], adapter=FakeAdapter(num_layers=4))
    policy = EntropyPrune(keep=64, average=True).bind(ctx.adapter)
    with pytest.raises(ValueError, match="cannot be met .* raise keep above 288.5"):
        policy.image_budget(ctx, 0, 0)


def test_entropyprune_scores_layer_k_minus_1_queries():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=DIM, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2)
    layers = [LlamaDecoderLayer(config, layer_idx=j).eval() for j in range(4)]
    adapter = FakeAdapter(model_type="llava", num_layers=4, layers=layers)
    ctx = make_ctx([{"images": [24, 10], "question": 3}, {"images": [], "question": 2}], adapter=adapter)
    hidden_in = torch.randn_like(ctx.hidden)
    with torch.no_grad():  # what the runtime captures: layer 1's own q_proj output
        ctx.layer_q[1] = layers[1].self_attn.q_proj(layers[1].input_layernorm(hidden_in))
    policy = EntropyPrune(keep=0.25).bind(adapter)
    out = policy.select(ctx)
    for i, n in enumerate((24, 10)):
        q = layer_queries(layers[1], hidden_in[0, ctx.seq_positions[0][i]])
        assert out[0][i].indices.tolist() == topk_indices(matrix_entropy(q), round(n * 0.25)).tolist()
    assert out[1] == []


def test_idpruner_received_importance_needs_binding():
    ctx = make_ctx([{"images": [12], "question": 3}])
    with pytest.raises(RuntimeError, match="bind"):
        IDPruner(keep=4).select(ctx)


def test_readme_policy_table_is_the_registry():
    """The README's policy table is what the registry's declarations give (regenerate it, never edit it by hand)."""
    from pathlib import Path

    from vtprune.policies import policy_table

    readme = Path(__file__).resolve().parents[2] / "README.md"
    table = policy_table()
    assert table in readme.read_text(), "README.md's policy table differs from policy_table(); paste its output"
    assert table.count("\n") == len(vtprune.available_policies()) + 1


def test_every_registered_policy_runs_in_the_family_matrix():
    """Each registered policy is in tests/families/test_policies_models.py's POLICIES (or is a baseline tested on its own)."""
    from families.test_policies_models import POLICIES

    from policies.test_video_policies import POLICIES as VIDEO_POLICIES  # video policies: their own matrix, video families

    in_matrix = {make(3).name for make in [*POLICIES.values(), *VIDEO_POLICIES.values()]}
    baselines = {"random", "pooling", "fixed"}  # test_runtime / test_policies_unit cover them on every family
    # pixelprune takes no budget (the matrix checks budgets) and runs on the families whose tower it can shorten:
    # tests/policies/test_pixelprune.py runs the same invariants (batch, cache, report) on each of them
    budget_free = {"pixelprune"}
    assert set(vtprune.available_policies()) - baselines - budget_free <= in_matrix


@pytest.mark.parametrize(
    "positions,view",
    [([3, 4, 5, 6], True), ([3, 4, 6, 7], False), ([5, 4, 3, 2], False), ([3, 5, 4, 6], False), ([7], False)],
)
def test_rows_of_is_index_select_and_a_view_only_for_consecutive_positions(positions, view):
    x = torch.randn(10, 6)
    index = torch.tensor(positions)
    got = token_rows(x, index)
    assert torch.equal(got, x.index_select(0, index))
    assert (got.data_ptr() == x[positions[0]].data_ptr()) == view


@pytest.mark.parametrize(
    "policy, family, missing",
    [
        ("pdrop", "llava", "prune_after, ratios"),
        ("transprune", "llava", "prune_after, ratios, ttv_from"),
        ("sparsevlm", "qwen2_5_vl", "prune_after"),
        ("fastvid", "qwen2_5_vl", "keep, tau, ignore"),
        ("fastvid", "llava_onevision", "keep, tau"),
    ],
)
def test_a_model_without_zoo_defaults_names_what_to_give(policy, family, missing, monkeypatch):
    """With no model_zoo.yaml entry for the model, binding names every missing field and the model type."""
    from vtprune import zoo
    from vtprune.patches import adapter_for
    from vtprune.tiny import tiny_model

    monkeypatch.setattr(zoo, "adapter_defaults", lambda adapter, name: {})
    made = make_policy(policy, keep=None) if policy == "fastvid" else make_policy(policy)
    with pytest.raises(ValueError) as err:
        made.bind(adapter_for(tiny_model(family)))
    assert f"{policy}: model_zoo.yaml has no {missing} for model type {family!r}" in str(err.value)
