"""The sweep: grid with baselines, resumable JSONL (a half-written row is redone), summary tables and plots."""

from __future__ import annotations

import json

import pytest
import yaml

from vtprune import toyvqa
from vtprune.eval.sweep import family_of, main, paper_point, read_results

SHIPPED = pytest.mark.skipif(not (toyvqa.checkpoint_path("llava") / "config.json").exists(),
                             reason="no shipped toy model")


@SHIPPED
def test_sweep_runs_baselines_resumes_and_plots(tmp_path):
    cfg = {"out": str(tmp_path / "out"), "models": ["llava"], "policies": ["divprune"], "budgets": [32], "n": 5,
           "stability": 2}
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
