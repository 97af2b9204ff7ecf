"""Local (offline) lmms-eval tasks shipped with vtprune, and the data they read.

``toyvqa``: the test split of :mod:`vtprune.toyvqa`. Its task template and hooks
live in ``toyvqa/``; the items are exported on demand (JSONL + PNG, by
:func:`vtprune.toyvqa.export.export`) into a cache folder, next to a
``toyvqa.yaml`` that includes the template and names that data. The folder is
what lmms-eval's ``--include_path`` takes::

    vtprune eval --print-include-path toyvqa   # then: lmms-eval --include_path THAT --tasks toyvqa ...

The YAML names this installation's template by absolute path; a cached
folder written by another installation (a recreated venv) gets its YAML
rewritten, so a stale cache never breaks a run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCAL_TASKS = ("toyvqa",)
TOYVQA_N = 500  # the test items scored by default (vtprune.toyvqa.score's n)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$VTPRUNE_CACHE``, else ``~/.cache/vtprune``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("VTPRUNE_CACHE", Path.home() / ".cache" / "vtprune"))


def prepare_toyvqa(n: int = TOYVQA_N, image_size: int = 336, cache_dir: str | Path | None = None) -> Path:
    """Folder holding the first ``n`` toyvqa test items at ``image_size`` px and their task YAML.

    Exported once per (n, size) and reused; the export goes to a temporary
    folder renamed into place, so concurrent ranks never read a half-written one.
    """
    if n < 1:
        raise ValueError(f"toyvqa needs n >= 1 items, got {n}")
    from vtprune.toyvqa.export import export

    target = cache_root(cache_dir) / "toyvqa" / f"test-n{n}-{image_size}px"
    if (target / "toyvqa.yaml").is_file() and (target / "test.jsonl").is_file():
        if not _yaml_is_current(target):
            _write_task_yaml(target, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        export(staging, n=n, split="test", size=image_size)
        _write_task_yaml(staging, target)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "toyvqa.yaml").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _task_config(final: Path) -> dict:
    # Paths name the final folder: the YAML is read only after the rename.
    return {
        "include": str(HERE / "toyvqa" / "_default_template_yaml"),
        "task": "toyvqa",
        "dataset_kwargs": {"data_files": {"test": str(final / "test.jsonl")}, "cache_dir": str(final / "hf_datasets")},
        "lmms_eval_specific_kwargs": {"default": {"root": str(final)}},
    }


def _yaml_is_current(folder: Path) -> bool:
    """Whether ``folder``'s task YAML is the one this installation writes (same template, same data paths)."""
    try:
        return json.loads((folder / "toyvqa.yaml").read_text()) == _task_config(folder)
    except (OSError, ValueError):
        return False


def _write_task_yaml(folder: Path, final: Path) -> None:
    # JSON is valid YAML, and quotes every path safely. Written beside and renamed
    # over, so a concurrent reader sees the old YAML or the new one, never half.
    staging = folder / f".toyvqa.yaml.{os.getpid()}"
    staging.write_text(json.dumps(_task_config(final), indent=2) + "\n")
    staging.replace(folder / "toyvqa.yaml")


def prepare(tasks: list[str], n: int = TOYVQA_N, image_size: int = 336, cache_dir: str | Path | None = None) -> list[str]:
    """lmms-eval include paths for the local tasks among ``tasks`` (exported if absent)."""
    paths = []
    if "toyvqa" in tasks:
        paths.append(str(prepare_toyvqa(n, image_size, cache_dir)))
    return paths
