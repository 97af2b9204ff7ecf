"""Local (offline) lmms-eval tasks shipped with vtprune, and the data they read.

``toyvqa``: the test split of :mod:`vtprune.toyvqa`. Its task template and hooks
live in ``toyvqa/`` (this installation's code). Two folders serve a run:

- the data, exported on demand (JSONL + PNG + ``manifest.json``, by
  :func:`vtprune.toyvqa.export.export`) into the cache
  (``--cache_dir``, ``$VTPRUNE_CACHE`` or ``~/.cache/vtprune``) and reused
  only while it is exactly what was exported: no file or folder the
  manifest does not name, every file's SHA-256 as recorded. Anything else
  (a planted ``.yaml`` or ``.py``, an edited item, a half-copied folder) is
  replaced by a fresh export;
- the include folder lmms-eval indexes: only ``toyvqa.yaml``, written anew
  for every run (``vtprune eval``: a private temporary folder, removed
  afterwards), naming this installation's template and the verified data.
  lmms-eval imports task code from the YAML files of the folders it indexes,
  so nothing in the cache is ever indexed or imported.

``vtprune eval --print-include-path toyvqa`` prepares both for lmms-eval's own
CLI and prints the include folder (rebuilt at each call)::

    lmms-eval --include_path "$(vtprune eval --print-include-path toyvqa)" --tasks toyvqa ...
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ...checks import BadValue

HERE = Path(__file__).resolve().parent
LOCAL_TASKS = ("toyvqa",)
TOYVQA_N = 500  # the test items scored by default (vtprune.toyvqa.score's n)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$VTPRUNE_CACHE``, else ``~/.cache/vtprune``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("VTPRUNE_CACHE", Path.home() / ".cache" / "vtprune"))


def prepare_toyvqa(n: int = TOYVQA_N, image_size: int = 336, cache_dir: str | Path | None = None) -> Path:
    """The verified data folder of the first ``n`` toyvqa test items at ``image_size`` px.

    Reused when :func:`vtprune.toyvqa.export.check_manifest` finds it exactly
    as exported, otherwise exported afresh: into a temporary folder renamed
    into place, so concurrent ranks never read a half-written one.
    """
    if n < 1:
        raise BadValue(f"toyvqa needs n >= 1 items, got {n}")
    from vtprune.toyvqa.export import check_manifest, export

    target = cache_root(cache_dir) / "toyvqa" / f"test-n{n}-{image_size}px"
    if target.exists() and check_manifest(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        export(staging, n=n, split="test", size=image_size)
        _install(staging, target, lambda: check_manifest(target) is None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _install(staging: Path, target: Path, target_is_good) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is kept if ``target_is_good()``, else replaced."""
    for _ in range(3):
        try:
            staging.rename(target)
            return
        except OSError:  # target exists: another process finished first, or it is to be replaced
            if target_is_good():
                return
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        try:
            target.rename(trash / target.name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OSError(
                f"{target} is not what vtprune exported and cannot be replaced ({exc}); remove it, or give another --cache_dir"
            ) from None
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    raise OSError(f"could not install {target}: it kept changing while being replaced")


def _task_config(data: Path, include: Path) -> dict:
    return {
        "include": str(HERE / "toyvqa" / "_default_template_yaml"),
        "task": "toyvqa",
        "dataset_kwargs": {"data_files": {"test": str(data / "test.jsonl")}, "cache_dir": str(include / "hf_datasets")},
        "lmms_eval_specific_kwargs": {"default": {"root": str(data)}},
    }


def write_include(include: Path, data: Path, final: Path | None = None) -> None:
    """``include/toyvqa.yaml``: this installation's template on the data in ``data`` (JSON is valid YAML).

    ``final``: where ``include`` will be renamed to (the YAML names the folder it is read from).
    """
    (include / "toyvqa.yaml").write_text(json.dumps(_task_config(data, final or include), indent=2) + "\n")


def prepare(
    tasks: list[str],
    n: int = TOYVQA_N,
    image_size: int = 336,
    cache_dir: str | Path | None = None,
    include_dir: str | Path | None = None,
) -> list[str]:
    """lmms-eval include paths for the local tasks among ``tasks`` (their data verified or exported).

    The include folder is ``include_dir`` (a fresh folder the caller owns and
    removes) or, without one, ``CACHE/toyvqa/include-n{n}-{size}px``, rebuilt
    at each call (what ``--print-include-path`` prints).
    """
    if "toyvqa" not in tasks:
        return []
    data = prepare_toyvqa(n, image_size, cache_dir)
    if include_dir is not None:
        write_include(Path(include_dir), data)
        return [str(include_dir)]
    target = data.parent / f"include-n{n}-{image_size}px"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=data.parent))
    try:
        write_include(staging, data, final=target)
        _install(staging, target, lambda: False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [str(target)]
