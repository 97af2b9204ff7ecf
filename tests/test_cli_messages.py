"""Command-line messages (issue 14 item 7): one-line errors, the options a policy really takes, honest warnings."""

from __future__ import annotations

import pytest

from vtprune import toyvqa
from vtprune.cli import _policy_names, main


@pytest.mark.parametrize("command", ["demo", "bench", "stability", "show"])
def test_a_misspelt_policy_is_one_line_not_a_traceback(command, capsys):
    argv = [command, "--policy" if command != "stability" else "--policies", "idprunr"]
    if command == "show":
        argv.insert(1, "image.png")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown policy 'idprunr'" in err and "idpruner" in err
    assert "Traceback" not in err


def test_policy_names_are_read_in_every_spelling():
    assert _policy_names(["--policy", "a", "--keep", "64"]) == ["a"]
    assert _policy_names(["--policy=b", "--policies", "c", "d:prompt", "--n", "3"]) == ["b", "c", "d:prompt"]


def test_bad_values_are_one_line(capsys):
    assert main(["stability", "--keep", "9.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "(0, 1]" in err and len(err.splitlines()) == 1


def test_option_errors_list_the_policys_options_not_its_class_constants():
    from vtprune.eval.lmms import _check_policy

    with pytest.raises(TypeError) as info:
        _check_policy({"policy": "idpruner", "keep": 64, "lamda": 0.3}, "the wrapper takes [...]")
    message = str(info.value)
    assert "no option lamda" in message and "lam, per_image, selector" in message
    assert "stage" not in message and "needs_layer_inputs" not in message


@pytest.mark.parametrize("curve, warned", [([0.1, 0.2, 0.3, 0.4], True), ([0.5, 0.2, 0.1, 0.1], False)])
def test_calibrate_ecl_warns_when_the_entropy_never_collapses(curve, warned, monkeypatch, capsys):
    from vtprune import ecl

    monkeypatch.setattr(ecl, "_model_and_batches", lambda args: (_Model(), [{}], "stub"))
    monkeypatch.setattr(ecl, "entropy_curve", lambda model, batch: curve)
    assert ecl.main(["--n", "1"]) == 0
    out = capsys.readouterr()
    assert ('"collapses": false' in out.out) == warned
    assert ("never drops" in out.err) == warned


class _Model:
    class config:  # noqa: N801 - stands in for an HF config
        model_type = "llava"


@pytest.mark.skipif(not (toyvqa.checkpoint_path("llava") / "config.json").exists(), reason="no shipped toy model")
def test_calibrate_ecl_on_the_toy_llava_says_there_is_no_collapse(capsys):
    """Measured: on the shipped toy LLaVA the entropy rises at every layer; K = 2 must not be presented as a collapse."""
    from vtprune import ecl

    assert ecl.main(["--model", str(toyvqa.checkpoint_path("llava")), "--n", "1"]) == 0
    assert "never drops" in capsys.readouterr().err
