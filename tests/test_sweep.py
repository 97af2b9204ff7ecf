"""The sweep: grid with baselines, resumable JSONL, summary and plots (on the shipped toy model)."""

from __future__ import annotations

import json

import pytest
import yaml

from vtprune import toyvqa
from vtprune.eval.sweep import main


@pytest.mark.skipif(not (toyvqa.checkpoint_path("llava") / "config.json").exists(), reason="no shipped toy model")
def test_sweep_runs_baselines_resumes_and_plots(tmp_path):
    cfg = {"out": str(tmp_path / "out"), "models": ["llava"], "policies": ["divprune"], "budgets": [32], "n": 4}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path), "--threads", "1"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["policy"], r["keep"]) for r in rows] == [("none", "all"), ("random", 32), ("pooling", 32), ("divprune", 32)]
    assert all(r["kept_tokens"] == 32 for r in rows[1:]) and rows[0]["kept_tokens"] is None
    assert all(0.0 <= r["agreement"] <= 1.0 for r in rows[1:])
    assert main([str(path)]) == 0  # resumed: nothing re-run
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 4
    for name in ("summary.md", "retained_vs_tokens.png", "retained_vs_prefill.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_sweep_refuses_bad_budgets(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"models": ["llava"], "budgets": [9.0]}))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        main([str(path)])
