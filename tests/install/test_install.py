"""What a fresh install must give a user: one package from the repo root or anywhere, a task cache that
survives a recreated venv, a folder for lmms-eval's --include_path, safe checkpoint loading."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH="")
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_repo_root_imports_the_whole_package():
    """From the repo root the source folder vtprune/ shadows any installed copy: its subpackages must still resolve."""
    out = _run(
        "import vtprune, vtprune.patches, vtprune.cuda, vtprune.eval, vtprune.eval.tasks\n"
        "print(vtprune.__file__); print(vtprune.patches.__file__); print(vtprune.eval.tasks.__file__)",
        ROOT,
    )
    init, patches, tasks = (Path(line) for line in out.splitlines())
    assert init == ROOT / "vtprune" / "__init__.py"
    assert patches == ROOT / "patches" / "__init__.py"
    assert tasks == ROOT / "eval" / "tasks" / "__init__.py"


def test_repo_root_runs_a_module_command():
    out = _run(
        "import runpy, sys; sys.argv = ['vtprune.cli', '--help']; runpy.run_module('vtprune.cli', run_name='__main__')", ROOT
    )
    assert "calibrate-ecl" in out and "eval" in out


def test_task_yaml_names_this_installation_and_the_exported_items_are_reused(tmp_path):
    """The include folder's YAML is written anew at each call (a YAML left by another installation, a recreated
    venv, is replaced); the exported items are reused while they are what was exported."""
    from vtprune.eval.tasks import HERE, prepare

    include = Path(prepare(["toyvqa"], n=2, cache_dir=tmp_path)[0])
    config = json.loads((include / "toyvqa.yaml").read_text())
    template = HERE / "toyvqa" / "_default_template_yaml"
    assert Path(config["include"]) == template
    data = Path(config["lmms_eval_specific_kwargs"]["default"]["root"])
    assert Path(config["dataset_kwargs"]["data_files"]["test"]) == data / "test.jsonl"
    stamp = (data / "test.jsonl").stat().st_mtime_ns
    config["include"] = "/old-venv/lib/python3.11/site-packages/vtprune/eval/tasks/toyvqa/_default_template_yaml"
    (include / "toyvqa.yaml").write_text(json.dumps(config))

    assert prepare(["toyvqa"], n=2, cache_dir=tmp_path) == [str(include)]
    assert Path(json.loads((include / "toyvqa.yaml").read_text())["include"]) == template
    assert (data / "test.jsonl").stat().st_mtime_ns == stamp  # the exported items are kept
    assert not [p for p in (tmp_path / "toyvqa").iterdir() if p.name.startswith(".")]  # no staging left behind


def test_print_include_path_prints_a_folder(tmp_path, capsys):
    from vtprune.eval.lmms import main

    assert main(["--print-include-path", "toyvqa", "--limit", "2", "--cache_dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and (Path(lines[0]) / "toyvqa.yaml").is_file()
    assert Path(lines[0]).parent.parent == tmp_path


def test_print_include_path_refuses_tasks_that_need_none(capsys):
    from vtprune.eval.lmms import main

    assert main(["--print-include-path", "gqa"]) == 2
    assert "toyvqa" in capsys.readouterr().err


def test_qwen_wrapper_without_its_imports_is_a_clear_error(monkeypatch):
    from vtprune.eval import lmms

    monkeypatch.setattr(lmms, "_importable", lambda name: name != "torchvision")
    # the advice names the torchvision that pairs with this torch and keeps that torch (--no-deps)
    minor = int(torch.__version__.split(".")[1])
    with pytest.raises(ImportError, match=rf"needs torchvision.*torchvision 0\.{minor + 15}\.x.*--no-deps"):
        lmms._wrapper_class("qwen2_5_vl", force_simple=False)


def test_resume_checkpoint_loads_weights_only(tmp_path):
    from vtprune.toyvqa.train import _save_checkpoint, load_checkpoint

    model, head = nn.Linear(3, 2), nn.Linear(2, 4)
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    _save_checkpoint(tmp_path, 7, model, head, opt, best=0.5)
    state = load_checkpoint(tmp_path / "ckpt-7.pt")
    assert state["step"] == 7 and state["best"] == 0.5
    assert torch.equal(state["model"]["weight"], model.weight)


class _Planted:
    def __reduce__(self):
        return (os.system, ("echo planted",))


def test_resume_refuses_a_planted_pickle(tmp_path):
    from vtprune.toyvqa.train import load_checkpoint

    path = tmp_path / "ckpt-1.pt"
    path.write_bytes(pickle.dumps({"step": _Planted()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)


def test_ci_runs_both_ends_of_the_declared_transformers_range():
    """setup.py admits exactly the releases CI runs: constraints.txt's (leg 1) and .ci/run's newest (leg 2)."""
    import re

    from packaging.specifiers import SpecifierSet

    root = Path(__file__).resolve().parents[2]
    declared = re.search(r'"transformers([^"]+)"', (root / "setup.py").read_text()).group(1)
    pinned = re.search(r"^transformers==(\S+)$", (root / "constraints.txt").read_text(), re.M).group(1)
    newest = re.search(r"^NEWEST_TRANSFORMERS=(\S+)$", (root / ".ci" / "run").read_text(), re.M).group(1)
    spec = SpecifierSet(declared)
    assert pinned in spec and newest in spec
    lower = min(s.version for s in spec if s.operator == ">=")
    upper = max(s.version for s in spec if s.operator == "<")
    assert pinned.startswith(lower), f"leg 1 runs {pinned}, the declared lower bound is {lower}"
    # the upper bound admits no minor release newer than the one leg 2 runs
    assert [int(x) for x in upper.split(".")[:2]] == [int(x) for x in newest.split(".")[:2]][:1] + [int(newest.split(".")[1]) + 1]


def test_public_names_stay_the_api_functions_whatever_is_imported_first():
    """The lazily imported public names are never shadowed by a submodule of the same name."""
    code = (
        "import vtprune, vtprune.reporting, vtprune.api, vtprune.policies; "
        "assert vtprune.report.__module__ == 'vtprune.api', vtprune.report; "
        "assert vtprune.wrap.__module__ == 'vtprune.api'; print('ok')"
    )
    assert _run(code, Path(__file__).resolve().parents[2]).strip().endswith("ok")
