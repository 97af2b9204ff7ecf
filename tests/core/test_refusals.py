"""Values a wrapped model cannot honour are refused where they enter, naming what was given (issue 18, item 12)."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from helpers import inputs, model_for, single_spec

import vtprune
from vtprune.policies import Fixed, Random, VisionZip


def _labels(batch):
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    return labels


@pytest.mark.parametrize(
    "policy", [Random(keep=3), Random(keep=3, at_layer=2), Random(keep=0.5)], ids=["projector", "llm", "fraction"]
)
def test_labels_under_a_prune_that_removes_tokens_are_refused_clearly(family, policy):
    model = model_for(family)
    batch = inputs(model, [single_spec(family)])
    vtprune.wrap(model, policy)
    with torch.no_grad(), pytest.raises(ValueError, match=r"labels= .* not supported .* removed \d+ visual tokens"):
        model(**batch, labels=_labels(batch))
    with torch.no_grad():  # the refusal leaves the model as it was: the same call without labels runs pruned
        out = model(**batch)
    assert out.logits.shape[1] < batch["input_ids"].shape[1]


def test_labels_at_full_budget_give_the_unwrapped_loss(family):
    model = model_for(family)
    batch = inputs(model, [single_spec(family)])  # one sample, no padding column
    labels = _labels(batch)
    with torch.no_grad():
        want = model(**batch, labels=labels).loss
        vtprune.wrap(model, "random", keep=1.0)
        got = model(**batch, labels=labels).loss
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("save", [lambda m: torch.save(m, io.BytesIO()), lambda m: pickle.dumps(m)], ids=["torch.save", "pickle"])
def test_pickling_a_wrapped_model_is_refused_naming_unwrap(save):
    model = model_for("llava")
    vtprune.wrap(model, "random", keep=3)
    with pytest.raises(TypeError, match=r"wrapped \(random\(.*cannot be pickled.*vtprune\.unwrap\(model\)"):
        save(model)
    assert vtprune.is_wrapped(model)
    vtprune.unwrap(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # unwrapped, it pickles as before
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    batch = inputs(model, [single_spec("llava")])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_visionzip_contextual_beyond_keep_is_refused():
    with pytest.raises(ValueError, match=r"contextual=99 .* keep=3 .* contextual in \[0, 3\]"):
        VisionZip(keep=3, contextual=99)
    assert VisionZip(keep=3, contextual=3).contextual == 3  # all contextual: allowed


def test_fixed_refuses_an_empty_keep_set_at_construction():
    with pytest.raises(ValueError, match=r"kept\[0\] keeps no token of its 1 image\(s\).*at least 1"):
        Fixed(kept=[[[]]])
    with pytest.raises(ValueError, match=r"kept\[1\] keeps no token of its 2 image\(s\)"):
        Fixed(kept=[[[0]], [[], []]])
    assert Fixed(kept=[[[0, 1], []]]).kept == (((0, 1), ()),)  # a pooled selection's image may keep none
    with pytest.raises(ValueError, match=r"at least one sample; got \[\]"):
        Fixed(kept=[])
    assert Fixed(kept=[[]]).kept == ((),)  # a sample without images has no lists: allowed


def test_fixed_with_keep_sets_for_more_samples_than_the_batch_is_refused_at_the_call():
    model = model_for("llava")
    batch = inputs(model, [single_spec("llava")])
    vtprune.wrap(model, Fixed(kept=[[[0, 1]], [[2, 3]]]))
    with torch.no_grad(), pytest.raises(ValueError, match=r"keep sets for 2 samples but this batch has 1"):
        model(**batch)
    vtprune.wrap(model, Fixed(kept=[[[0, 1]]]))
    with torch.no_grad():
        model(**batch)
    assert vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]["projector"]["kept"] == [0, 1]
