"""`vtprune sweep --backend ray` on a local Ray instance with 2 workers: the same rows as the local backend."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from vtprune import toyvqa
from vtprune.eval.sweep import main

if not os.environ.get("CI"):  # CI installs ray with the [test] extra: a missing ray fails there
    pytest.importorskip("ray")

pytestmark = pytest.mark.skipif(not (toyvqa.checkpoint_path("llava") / "config.json").exists(), reason="no shipped toy model")
COMPARED = (
    "policy",
    "keep",
    "kept_tokens",
    "visual_tokens",
    "accuracy",
    "per_type",
    "agreement",
    "retained",
    "predictions",
    "checkpoint",
)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ray_backend_gives_the_local_rows_and_resumes(tmp_path):
    cfg = {"models": ["llava"], "policies": ["divprune"], "budgets": [16], "n": 3, "timed_items": 2}
    for name in ("local", "ray"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**cfg, "out": str(tmp_path / name)}))
    assert main([str(tmp_path / "local.yaml"), "--threads", "1"]) == 0
    assert main([str(tmp_path / "ray.yaml"), "--threads", "1", "--backend", "ray", "--ray-workers", "2"]) == 0
    local, remote = _rows(tmp_path / "local" / "results.jsonl"), _rows(tmp_path / "ray" / "results.jsonl")
    key = lambda r: (r["policy"], str(r["keep"]))  # noqa: E731 - Ray writes rows as they finish
    assert sorted(map(key, remote)) == sorted(map(key, local)) and len(remote) == 4
    by_key = {key(r): r for r in local}
    for row in remote:
        assert {k: row.get(k) for k in COMPARED} == {k: by_key[key(row)].get(k) for k in COMPARED}
    assert remote[0]["policy"] == "none"  # the reference runs first
    assert main([str(tmp_path / "ray.yaml"), "--backend", "ray"]) == 0  # resumed: nothing left, no cluster started
    assert len(_rows(tmp_path / "ray" / "results.jsonl")) == 4
