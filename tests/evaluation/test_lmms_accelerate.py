"""`accelerate launch` data parallel, as lmms-eval does, with 2 CPU processes (gloo): the same results as 1 process.

lmms-eval shards the documents by rank and gathers the responses on rank 0;
vtprune gathers its report there too. Both ranks must have evaluated
documents, and the merged accuracy, per-item answers and report must equal
the single-process run's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vtprune import toyvqa
from vtprune.cli import main

if not os.environ.get("CI"):
    pytest.importorskip("lmms_eval")
    pytest.importorskip("accelerate")

CHECKPOINT = toyvqa.checkpoint_path("llava")
ROOT = Path(__file__).resolve().parents[2]
N = 6
pytestmark = pytest.mark.skipif(not (CHECKPOINT / "config.json").exists(), reason="no shipped toy model")


def _args(out: Path, cache: Path) -> list[str]:
    return [
        "eval",
        "--model_args",
        f"pretrained={CHECKPOINT},policy=divprune,keep=32",
        "--tasks",
        "toyvqa",
        "--limit",
        str(N),
        "--device",
        "cpu",
        "--offline",
        "--threads",
        "1",
        "--output_path",
        str(out),
        "--cache_dir",
        str(cache),
    ]


def _answers(out: Path) -> dict:
    return {s["doc_id"]: s["filtered_resps"] for s in map(json.loads, (out / "samples_toyvqa.jsonl").read_text().splitlines())}


def test_two_cpu_processes_equal_one(tmp_path):
    launcher = shutil.which("accelerate") or pytest.fail("accelerate's launcher is not on PATH")
    cache = tmp_path / "cache"
    # accelerate's --cpu flag starts one process unless MPI is set up; its torch.distributed launcher
    # (--multi_gpu) with ACCELERATE_USE_CPU gives MULTI_CPU over gloo, one process per rank.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "ACCELERATE_USE_CPU": "true",
    }
    cmd = [
        launcher,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
        "-m",
        "vtprune.cli",
        *_args(tmp_path / "two", cache),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert main(_args(tmp_path / "one", cache)) == 0

    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert two["n-samples"]["toyvqa"]["effective"] == one["n-samples"]["toyvqa"]["effective"] == N
    metrics = lambda r: {k: v for k, v in r["results"]["toyvqa"].items() if "stderr" not in k}  # noqa: E731
    assert metrics(two) == metrics(one)
    assert _answers(tmp_path / "two") == _answers(tmp_path / "one") and len(_answers(tmp_path / "one")) == N

    report_two = json.loads((tmp_path / "two" / "vtprune_report.json").read_text())
    report_one = json.loads((tmp_path / "one" / "vtprune_report.json").read_text())
    ranks = [p["rank"] for p in report_two["prefills"]]
    assert sorted(set(ranks)) == [0, 1] and len(ranks) == N  # both ranks prefilled, every item once
    for key in ("prefills", "images", "visual_tokens_before", "visual_tokens_after"):
        assert report_two["summary"][key] == report_one["summary"][key], key
    assert {p["rank"] for p in report_one["prefills"]} == {0}
