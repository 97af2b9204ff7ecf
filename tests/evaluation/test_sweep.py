"""The sweep: grid with baselines, resumable JSONL (a half-written row is redone), summary tables and plots."""

from __future__ import annotations

import json

import pytest
import yaml

from vtprune import toyvqa
from vtprune.eval.sweep import family_of, main, paper_point, read_results

SHIPPED = pytest.mark.skipif(not (toyvqa.checkpoint_path("llava") / "config.json").exists(), reason="no shipped toy model")


@SHIPPED
def test_sweep_runs_baselines_resumes_and_plots(tmp_path):
    cfg = {"out": str(tmp_path / "out"), "models": ["llava"], "policies": ["divprune"], "budgets": [32], "n": 5, "stability": 2}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path), "--threads", "1"]) == 0
    results = tmp_path / "out" / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["policy"], r["keep"]) for r in rows] == [("none", "all"), ("random", 32), ("pooling", 32), ("divprune", 32)]
    assert all(r["kept_tokens"] == 32 and r["visual_tokens"] == 576 for r in rows[1:]) and rows[0]["kept_tokens"] is None
    assert all(0.0 <= r["agreement"] <= 1.0 for r in rows[1:])
    # one definition per column: batch 1 and batch 8 both measured, labelled by batch size
    assert all(set(r["prefill_ms"]) == {"1", "8"} and r["prefill_ms"]["8"] > r["prefill_ms"]["1"] > 0 for r in rows)
    # a policy that does not read the image keeps the same set under every perturbation
    assert rows[1]["stability"]["jaccard"] == {"noise": 1.0, "shift": 1.0, "jpeg": 1.0}
    assert all(0.0 <= v <= 1.0 for v in rows[3]["stability"]["jaccard"].values())
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "prefill ms b1 | prefill ms b8" in summary and "Jaccard noise/shift/jpeg" in summary
    assert "ocr (toy reading)" in summary and "toyvqa-llava" in summary  # family table; the zoo entry matched
    assert main([str(path)]) == 0  # resumed: nothing re-run
    assert len(results.read_text().splitlines()) == 4
    for name in ("summary.md", "retained_vs_tokens.png", "retained_vs_prefill.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0

    # a run killed while writing leaves half a row: it is dropped and redone, the others are kept
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    with pytest.warns(UserWarning, match="line\\(s\\) \\[4\\]"):
        assert main([str(path), "--threads", "1"]) == 0
    again = [json.loads(line) for line in results.read_text().splitlines()]
    assert again[:3] == rows[:3] and [r["policy"] for r in again] == ["none", "random", "pooling", "divprune"]
    assert again[3]["accuracy"] == rows[3]["accuracy"] and again[3]["kept_tokens"] == 32


def test_half_written_rows_are_dropped_and_the_file_rewritten(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, "b"\n{"a": 3}\n{"a": 4, "prefill_ms": 12.5}\n{"a": 5, "c": [1, 2')
    with pytest.warns(UserWarning, match=r"\[2, 5\]"):
        rows = read_results(path)
    assert [r["a"] for r in rows] == [1, 3, 4]
    assert rows[2] == {"a": 4, "prefill_ms_old_definition": 12.5}  # a number under the old definition is set apart
    assert [json.loads(line)["a"] for line in path.read_text().splitlines()] == [1, 3, 4]


def test_families_and_paper_points():
    assert family_of("lmms:textvqa_val") == "ocr" and family_of("ocrbench") == "ocr" and family_of("pope") == "hallucination"
    assert family_of("mmbench_en_dev_lite") == "multiple-choice" and family_of("gqa") == "open vqa"
    assert paper_point("llava-1.5-7b", "mmtok", 64) == (pytest.approx(0.966), "MMTok Table 1")
    assert paper_point("qwen2.5-vl-7b", "idpruner:received", 0.25)[0] == pytest.approx(0.9518)
    assert paper_point("llava-1.5-7b", "mmtok", 0.5) is None and paper_point(None, "mmtok", 64) is None


def test_sweep_refuses_bad_budgets(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"models": ["llava"], "budgets": [9.0]}))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        main([str(path)])


# ---- issue 18 item 10: the whole YAML checked before the first run, no duplicate rows, stray lines skipped


def _write(tmp_path, cfg, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return path


@pytest.fixture
def runs(monkeypatch):
    """The grid entries the sweep runs, each answered by a stand-in row (no model is loaded)."""
    from vtprune.eval import sweep

    done = []

    def fake(self, run, base):
        model, task, policy, keep = run
        done.append((policy, keep))
        return {"model": model, "task": task, "policy": policy, "keep": keep, "n": self.cfg.n, "accuracy": 0.5}

    monkeypatch.setattr(sweep.Runner, "__call__", fake)
    monkeypatch.setattr(sweep, "write_summary", lambda rows, out: (out / "summary.md").write_text(""))
    return done


def test_every_problem_of_the_config_is_reported_before_the_first_run(tmp_path, runs, capsys):
    from vtprune.cli import main as cli

    a_file = tmp_path / "taken"
    a_file.write_text("")
    cfg = {
        "out": str(a_file),
        "models": ["llava", "lava"],
        "policies": ["divprune", "idprunr", "divprune:x"],
        "budgets": [64, 9.0, "x"],
        "tasks": ["toyvqa", "mme"],
        "timed_items": 0,
        "stability": -3,
        "n": 0,
        "polices": ["fastv"],
    }
    assert cli(["sweep", str(_write(tmp_path, cfg)), "--threads", "-1"]) == 2
    err = capsys.readouterr().err
    assert runs == [] and "Traceback" not in err  # nothing ran: the misspelt policy is not found after the baselines
    expected = [
        "'idprunr'",
        "policy 'divprune:x'",
        "budgets[1] as a fraction must be in (0, 1]; got 9.0",
        "budgets[2] must be",
        "unknown task 'mme'",
        "'timed_items' must be an int >= 1; got 0",
        "'stability' must be an int >= 0",
        "'n' must be null (every item) or an int >= 1; got 0",
        "'threads' must be an int >= 1; got -1",
        "unknown setting 'polices' (did you mean 'policies'?)",
        f"{str(a_file)!r} is a file, not a folder",
        "model 'lava': task toyvqa needs a toyvqa arch",
    ]
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(problems) == len(expected), err
    for text in expected:  # one line per problem, all of them at once
        assert sum(text in line for line in problems) == 1, (text, err)
    assert f"{len(expected)} problem(s)" in err


@pytest.mark.parametrize(
    "text, says",
    [
        ("", "got an empty file"),
        ("- llava\n- 64\n", "got a list"),
        ("models: [llava]\n", "'budgets' is required"),
        ("models: llava\nbudgets: 64\n", "'models' must be a non-empty list"),
    ],
)
def test_a_config_that_is_no_grid_is_one_message_not_a_traceback(text, says, tmp_path, runs, capsys):
    from vtprune.cli import main as cli

    assert cli(["sweep", str(_write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and runs == []


def test_duplicate_budgets_run_once(tmp_path, runs):
    path = _write(
        tmp_path,
        {"out": str(tmp_path / "out"), "models": ["llava", "llava"], "budgets": [64, 64, 1, 1.0], "policies": ["random"]},
    )
    with pytest.warns(UserWarning) as warned:
        assert main([str(path)]) == 0
    messages = [str(w.message) for w in warned]
    assert any("repeat a budget" in m for m in messages) and any("'models' lists llava" in m for m in messages)
    # the int 1 (one token) and the float 1.0 (full budget) are two budgets; 64 twice is one
    assert sorted(runs, key=str) == sorted(
        [("none", "all")] + [(p, k) for p in ("random", "pooling") for k in (64, 1, 1.0)], key=str
    )
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and len({(r["policy"], str(r["keep"])) for r in rows}) == 7


def test_lines_that_are_no_row_are_skipped_with_a_warning_and_the_sweep_resumes(tmp_path, runs):
    out = tmp_path / "out"
    out.mkdir()
    row = {"model": "llava", "task": "toyvqa", "policy": "none", "keep": "all", "n": 200, "accuracy": 0.5}
    (out / "results.jsonl").write_text("\n".join([json.dumps(row), "null", "{}", "[1, 2]", "7", '{"model": "llava"}']) + "\n")
    with pytest.warns(UserWarning, match=r"\[2, 3, 4, 5, 6\]"):
        rows = read_results(out / "results.jsonl", ("model", "task", "policy", "keep", "n"))
    assert rows == [row]
    assert (out / "results.jsonl").read_text() == json.dumps(row) + "\n"  # rewritten without them
    (out / "results.jsonl").write_text(json.dumps(row) + "\nnull\n{}\n")
    path = _write(tmp_path, {"out": str(out), "models": ["llava"], "budgets": [32]})
    with pytest.warns(UserWarning, match=r"\[2, 3\]"):
        assert main([str(path)]) == 0
    assert runs == [("random", 32), ("pooling", 32)]  # resumed: the unpruned row was kept


def test_shipped_configs_pass_the_check():
    from pathlib import Path

    from vtprune.eval.sweep import check_config

    pytest.importorskip("lmms_eval")
    configs = sorted((Path(__file__).resolve().parents[2] / "eval" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = yaml.safe_load(path.read_text())
        checked = check_config(cfg, str(path)).to_dict()
        assert {k: v for k, v in checked.items() if k in cfg} == cfg  # typed, and nothing given was changed
