"""The shipped sweep YAMLs (eval/configs/) for the papers' protocols on real checkpoints, checked offline.

Every YAML parses into a valid grid; every task is in the installed
lmms-eval's task index; every model is named by a model_zoo.yaml checkpoint
entry (whose family has an lmms-eval wrapper here, and that wrapper takes
every key of model_args); the full grids meet the papers' reported points.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import yaml

from vtprune.eval.sweep import LMMS, _grid, check_config, paper_point, validate
from vtprune.policies.base import available_policies
from vtprune.zoo import zoo

if not os.environ.get("CI"):
    pytest.importorskip("lmms_eval")

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "eval" / "configs").glob("*.yaml"))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _zoo_entry(model: str) -> tuple[str, dict]:
    for name, entry in zoo()["checkpoints"].items():
        if model in entry.get("hub", []):
            return name, entry
    raise AssertionError(f"{model} is named by no model_zoo.yaml checkpoint entry (hub: [...])")


@pytest.fixture(scope="module")
def task_index() -> set[str]:
    from lmms_eval.tasks import TaskManager

    return set(TaskManager("ERROR").all_tasks)


def test_every_protocol_has_a_full_and_a_lite_config():
    names = {p.stem for p in CONFIGS}
    assert {"llava15_7b", "llava_next_7b", "qwen25vl_7b"} <= names
    assert all(f"{n}_lite" in names for n in names if not n.endswith("_lite"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_is_a_runnable_grid(path, task_index):
    from vtprune.eval.lmms import FAMILIES, _wrapper_class, parse_model_args

    assert "gqa_lite" in task_index and "mme_lite" not in task_index  # the real index, not a stand-in
    cfg = _load(path)
    budgets = [validate(b) for b in cfg["budgets"]]
    assert _grid(check_config(cfg, str(path)))
    assert set(p.partition(":")[0] for p in cfg["policies"]) <= set(available_policies())
    missing = [t for t in cfg["tasks"] if not t.startswith(LMMS) or t[len(LMMS) :] not in task_index]
    assert not missing, f"not lmms:NAME of an installed lmms-eval 0.7.3 task: {missing}"
    assert cfg.get("batch_size") == 1  # lmms-eval's llava_hf runs batch 1; batch size moves scores: state it
    for model in cfg["models"]:
        name, entry = _zoo_entry(model)
        model_type = entry["match"]["model_type"]
        assert model_type in FAMILIES
        wrapper = _wrapper_class(model_type, force_simple=False, require_imports=False)
        accepted = set(inspect.signature(wrapper.__init__).parameters)
        args = parse_model_args(cfg.get("model_args") or "")
        assert set(args) <= accepted, f"{path.name}: {sorted(set(args) - accepted)} not taken by {wrapper.__name__}"
        if model_type.startswith("qwen"):  # resolution pinned: a fraction of a fixed N
            assert args["min_pixels"] == args["max_pixels"]
        if not path.stem.endswith("_lite"):  # the summary shows the papers' numbers beside ours
            points = [(p, k) for p in cfg["policies"] for k in budgets if paper_point(name, p, k)]
            assert len(points) >= len(budgets) * 3, points
