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
    assert "stage" not in message and "whole_grid" not in message


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


# ---- issue 18 item 12: budgets read as the user wrote them; output paths checked before any model runs


class _Ran(Exception):
    """Raised by a stand-in for the model-loading step: the command got past its argument checks."""


def _must_not_run(*args, **kwargs):
    raise _Ran


def test_keep_is_read_as_written_and_a_non_number_is_named():
    from vtprune.budget import parse_keep

    parsed = [parse_keep(t) for t in ("64", "1", "0.25", "1.0", "1e-3", " 32 ")]
    assert parsed == [64, 1, 0.25, 1.0, 0.001, 32]
    assert [type(v) for v in parsed] == [int, int, float, float, float, int]  # 1 token vs the full budget
    for text in ("abc", "64tokens", ""):
        with pytest.raises(ValueError) as info:
            parse_keep(text)
        assert repr(text) in str(info.value) and "token count" in str(info.value) and "(0, 1]" in str(info.value)


def test_stability_keep_in_exponent_notation_is_a_fraction(monkeypatch, capsys):
    from vtprune.eval import stability

    seen = []
    monkeypatch.setattr(stability.toyvqa, "load", lambda ref: (None, None))
    monkeypatch.setattr(stability, "measure", lambda model, proc, policies, keep, n, bsz: seen.append(keep) or {})
    monkeypatch.setattr(stability, "markdown", lambda result: "")
    assert main(["stability", "--policies", "random", "--keep", "1e-3"]) == 0
    assert seen == [0.001] and "int()" not in capsys.readouterr().err
    assert main(["stability", "--keep", "1e-3x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'1e-3x'" in err and "token count" in err and "int()" not in err


def test_stability_json_path_is_checked_before_measuring(tmp_path, monkeypatch, capsys):
    from vtprune.eval import stability

    monkeypatch.setattr(stability.toyvqa, "load", _must_not_run)
    monkeypatch.setattr(stability, "measure", _must_not_run)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    for bad, says in ((tmp_path, "is a folder"), (a_file / "s.json", "is a file, not a folder")):
        assert main(["stability", "--policies", "random", "--json", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err and str(bad) in err
    with pytest.raises(_Ran):  # a folder still to be made is made, then the model loads
        main(["stability", "--policies", "random", "--json", str(tmp_path / "new" / "s.json")])
    assert (tmp_path / "new").is_dir()


def test_show_output_and_image_are_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from vtprune.eval import show

    monkeypatch.setattr(show, "_load", _must_not_run)
    image = tmp_path / "scene.png"
    image.write_bytes(b"")  # never opened: the checks come first
    for out, says in ((image / "kept.png", "is a file, not a folder"), (tmp_path, "is a folder")):
        assert main(["show", str(image), "--policy", "random", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err and str(out) in err
    assert main(["show", str(tmp_path / "no.png"), "--policy", "random", "--out", str(tmp_path / "k.png")]) == 2
    assert "is not a file" in capsys.readouterr().err
    with pytest.raises(_Ran):  # a good path gets as far as loading the model
        main(["show", str(image), "--policy", "random", "--out", str(tmp_path / "k.png")])


def test_eval_output_path_is_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lmms_eval")
    from vtprune.eval import lmms

    monkeypatch.setattr(lmms, "load_model", _must_not_run)
    a_file = tmp_path / "results.json"
    a_file.write_text("{}")
    for option, bad in (("--output_path", a_file), ("--output_path", a_file / "sub"), ("--cache_dir", a_file)):
        args = [
            "eval",
            "--model_args",
            "pretrained=x",
            "--tasks",
            "toyvqa",
            "--output_path",
            str(tmp_path / "o"),
            option,
            str(bad),
        ]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and option in err and str(a_file) in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(_Ran):  # a folder still to be created is fine
        main(["eval", "--model_args", "pretrained=x", "--tasks", "toyvqa", "--output_path", str(tmp_path / "o" / "p")])


def test_bench_json_path_is_checked_before_timing(tmp_path, monkeypatch, capsys):
    from vtprune.eval import bench

    monkeypatch.setattr(bench, "bench_model", _must_not_run)
    assert main(["bench", "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a folder" in err


def test_bench_keep_1_is_one_token_of_the_chosen_policy_and_nothing_is_written_unasked(tmp_path, monkeypatch, capsys):
    """`--keep 1` is the int 1 (one token, the chosen policy); only the float 1.0 is the full budget."""
    import functools

    from vtprune import api
    from vtprune.eval import bench

    used = []
    real = api.pruned

    def spy(model, policy, keep=None, **kwargs):  # the bench hands over policy objects (Pipelines with "+")
        used.append((policy.name, type(policy.keep).__name__, policy.keep))
        return real(model, policy, keep, **kwargs)

    monkeypatch.setattr(bench.api, "pruned", spy)
    monkeypatch.setattr(bench, "bench_compaction", functools.partial(bench.bench_compaction, width=64, repeats=1))
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "bench",
                "--policy",
                "divprune",
                "--keep",
                "1",
                "--llm-layers",
                "1",
                "--llm-hidden",
                "64",
                "--batch-sizes",
                "1",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--decode-tokens",
                "1",
            ]
        )
        == 0
    )
    assert set(used) == {("random", "float", 1.0), ("divprune", "int", 1)}
    assert "| 1 (576->1) |" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no bench.json in the current folder: it was not asked for


def test_bench_chains_policies_with_plus():
    from vtprune.eval.bench import bench_policy
    from vtprune.policies import Pipeline, PixelPrune, Random

    assert bench_policy("pixelprune+random", 0.25) == Pipeline([PixelPrune(), Random(keep=0.25)])
    assert bench_policy("pixelprune", 64) == PixelPrune()
    assert main(["bench", "--policy", "pixelprune+nosuch"]) == 2


def test_bench_options_go_to_the_budgeted_policy_and_bad_ones_fail_before_timing(monkeypatch, capsys):
    from vtprune.eval import bench
    from vtprune.policies import Pipeline, PixelPrune, PyramidDrop

    assert bench.parse_option("prune_after=[2,4,6]") == ("prune_after", [2, 4, 6])
    assert bench.parse_option("text=llm") == ("text", "llm")
    made = bench.bench_policy("pixelprune+pdrop", 64, options={"prune_after": [2, 4, 6]})
    assert made == Pipeline([PixelPrune(), PyramidDrop(keep=64, prune_after=[2, 4, 6])])
    monkeypatch.setattr(bench, "bench_model", _must_not_run)
    assert main(["bench", "--policy", "pdrop", "--option", "no_such_option=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no_such_option" in err
    with pytest.raises(SystemExit):
        main(["bench", "--option", "no-equals-sign"])


def test_bench_shares_times_each_policy_with_its_own_options(tmp_path, monkeypatch, capsys):
    """`--shares`: one row per policy, its selection (the report's ms) inside its own pruned prefill; a
    ``NAME.KEY`` option reaches only that policy, and the kept counts are each policy's own."""
    import json

    from vtprune.eval import bench

    assert bench.options_for("pdrop", {"pdrop.prune_after": [1], "dart.at_layer": 1, "seed": 3}) == {
        "prune_after": [1],
        "seed": 3,
    }
    out = tmp_path / "shares.json"
    assert (
        main(
            [
                "bench",
                "--shares",
                "random",
                "pdrop",
                "dart",
                "--option",
                "pdrop.prune_after=[1]",
                "--option",
                "pdrop.ratios=[0.5]",
                "--option",
                "dart.at_layer=1",
                "--keep",
                "64",
                "--llm-layers",
                "2",
                "--llm-hidden",
                "64",
                "--batch-sizes",
                "1",
                "--repeats",
                "2",
                "--warmup",
                "0",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    rows = {r["policy"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["random", "pdrop", "dart"]
    assert rows["pdrop"]["options"] == {"prune_after": [1], "ratios": [0.5]} and rows["dart"]["options"] == {"at_layer": 1}
    assert rows["random"]["visual_after"] == 64 and rows["pdrop"]["visual_after"] == 64
    assert rows["dart"]["visual_after"] == 68  # the reference budget: 4 image pivots on top of keep
    for r in rows.values():
        assert len(r["prefill_runs_ms"]) == 2 and 0 < r["selection_ms"] < r["prefill_vtprune_ms"]
        assert r["selection_share"] == pytest.approx(r["selection_ms"] / r["prefill_vtprune_ms"])
    assert "| llava | 1 | 64 (576->68) | dart |" in capsys.readouterr().out
    assert main(["bench", "--shares", "random", "pdrop", "--option", "pdrop.no_such=1"]) == 2


@pytest.mark.parametrize(
    "module, heavy", [("gpu_suite", "run_tests"), ("selection_time", "time_case"), ("toyvqa_policies", "run")]
)
def test_the_other_eval_scripts_check_their_json_path_first(module, heavy, tmp_path, monkeypatch, capsys):
    import importlib

    mod = importlib.import_module(f"vtprune.eval.{module}")
    monkeypatch.setattr(mod, heavy, _must_not_run)
    try:
        code = mod.main(["--json", str(tmp_path)])
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and "is a folder" in capsys.readouterr().err


def test_only_user_errors_are_one_line_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """The command line prints bad input (a UserInputError) as one line; any other exception propagates."""
    import vtprune.ecl as ecl
    from vtprune.checks import BadType, BadValue

    for err in (BadValue("--n must be >= 1; got 0"), BadType("keep must be an int or a float; got 'x' of type str")):
        monkeypatch.setattr(ecl, "main", lambda argv, err=err: (_ for _ in ()).throw(err))
        assert main(["calibrate-ecl"]) == 2
        out = capsys.readouterr().err
        assert out.startswith(f"vtprune calibrate-ecl: error: {err}") and len(out.splitlines()) == 1
    for bug in (ValueError("too many values to unpack"), TypeError("'NoneType' object is not subscriptable")):
        monkeypatch.setattr(ecl, "main", lambda argv, bug=bug: (_ for _ in ()).throw(bug))
        with pytest.raises(type(bug)) as info:
            main(["calibrate-ecl"])
        assert info.value is bug


def test_help_imports_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = (
        "import sys; from vtprune.cli import main; main(['--help']); print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "commands:" in out and out.strip().endswith("[]")
