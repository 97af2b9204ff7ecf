"""model_zoo.yaml: checkpoint entries match on the config's shape and override the family defaults."""

from __future__ import annotations

import copy

import pytest
import torch

import vtprune
from vtprune.patches import adapter_for
from vtprune.policies.hiprune import HiPrune
from vtprune.policies.transprune import TransPrune
from vtprune.tiny import tiny_model
from vtprune.toyvqa import load
from vtprune.zoo import checkpoint_for, policy_defaults


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def toy(request):
    return load(request.param)


def test_toy_checkpoints_match_their_entries_and_move_the_reference_layers(toy):
    model, _ = toy
    config = model.config
    name = checkpoint_for(config)
    assert name == {"llava": "toyvqa-llava", "qwen2_5_vl": "toyvqa-qwen2.5-vl"}[config.model_type]
    family = policy_defaults(config.model_type, "transprune")
    assert family["prune_after"] == [7, 9, 12]  # full-depth checkpoints
    assert policy_defaults(config.model_type, "transprune", config)["prune_after"] == [1, 2, 3]
    # keys the checkpoint does not name stay the family's
    assert policy_defaults(config.model_type, "fastv", config) == policy_defaults(config.model_type, "fastv")

    # the policies bound to the toy model pick them up
    adapter = adapter_for(model)
    policy = TransPrune().bind(adapter)
    assert policy.prune_layers() == (1, 2, 3)
    hip = HiPrune(keep=32).bind(adapter)
    assert hip.signals().vision_inputs[0] == {"llava": 2, "qwen2_5_vl": 1}[config.model_type] - 1


def test_a_config_differing_in_one_field_matches_no_checkpoint(toy):
    model, _ = toy
    other = copy.deepcopy(model.config)
    other.text_config.num_hidden_layers = 5
    assert checkpoint_for(other) is None
    assert policy_defaults(other.model_type, "transprune", other)["prune_after"] == [7, 9, 12]


def test_tiny_test_models_use_the_family_defaults(family):
    model = tiny_model(family)
    assert checkpoint_for(model.config) is None


def test_wrapping_the_toy_model_with_defaults_runs_the_toy_schedule():
    model, processor = load("llava")
    from vtprune.toyvqa.questions import make_item
    from vtprune.toyvqa.vocab import prompt

    item, image, _ = make_item("test", 0, size=336)
    inputs = processor(images=[image], text=[prompt("llava", item.question)], return_tensors="pt")
    with torch.no_grad():
        vtprune.wrap(model, "transprune")
        try:
            model(**inputs)
            stages = vtprune.report(model)
        finally:
            vtprune.unwrap(model)
    text = str(stages)
    assert "llm@1" in text and "llm@3" in text and "llm@7" not in text
