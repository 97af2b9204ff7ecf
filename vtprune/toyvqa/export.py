"""Write a split as a local dataset: ``DIR/{split}.jsonl`` plus ``DIR/images/*.png``.

``DIR/manifest.json`` holds the SHA-256 of every file written, so a reader
can check the folder holds exactly what was exported (:func:`check_manifest`).

Each JSONL line has ``id``, ``question``, ``answer``, ``type``, ``subtype``,
``image`` (path relative to ``DIR``) and ``prompt`` (the question as the
models were trained to see it, without the image token), so an lmms-eval task
YAML can read it with the ``json`` dataset builder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from vtprune.checks import BadValue
from vtprune.toyvqa.models import IMAGE_SIZE
from vtprune.toyvqa.questions import make_item


def export(out: str | Path, n: int = 500, split: str = "test", size: int = IMAGE_SIZE["llava"]) -> Path:
    """Export the first ``n`` items of ``split`` at ``size`` px; returns the JSONL path."""
    if n < 1:
        raise BadValue(f"n must be >= 1, got {n}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / f"{split}.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            item, image, _ = make_item(split, i, size=size)
            rel = f"images/{item.id}.png"
            image.save(out / rel)
            f.write(json.dumps({**item.to_dict(), "image": rel, "prompt": item.question}) + "\n")
    write_manifest(out)
    return path


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _entries(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """Files, folders and other entries (links, sockets, ...) under ``folder``, as POSIX paths relative to it."""
    files, folders, others = [], [], []
    for root, dirs, names in os.walk(folder, followlinks=False):
        base = Path(root)
        for name in dirs:
            (others if (base / name).is_symlink() else folders).append((base / name).relative_to(folder).as_posix())
        for name in names:
            path = base / name
            ok = path.is_file() and not path.is_symlink()
            (files if ok else others).append(path.relative_to(folder).as_posix())
    return sorted(files), sorted(folders), sorted(others)


def write_manifest(folder: str | Path) -> Path:
    """``folder/manifest.json``: the SHA-256 of every file in ``folder`` (the manifest itself excepted)."""
    folder = Path(folder)
    files, _, _ = _entries(folder)
    digests = {rel: _sha256(folder / rel) for rel in files if rel != MANIFEST}
    path = folder / MANIFEST
    path.write_text(json.dumps({"files": digests}, indent=0, sort_keys=True) + "\n")
    return path


def check_manifest(folder: str | Path) -> str | None:
    """Why ``folder`` is not exactly what :func:`export` wrote (per its manifest), or None when it is.

    Refused: a missing or unreadable manifest, a file or folder the manifest
    does not name (a planted ``.yaml`` or ``.py``), a link or other special
    entry, a missing file, a file whose content hash differs.
    """
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        digests = json.loads((folder / MANIFEST).read_text())["files"]
        assert isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values())
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{folder} has no readable {MANIFEST}"
    files, folders, others = _entries(folder)
    if others:
        return f"{folder} holds links or special files: {', '.join(others[:5])}"
    extra = sorted(set(files) - set(digests) - {MANIFEST})
    if extra:
        return f"{folder} holds files the export did not write: {', '.join(extra[:5])}"
    expected_folders = {p.as_posix() for rel in digests for p in Path(rel).parents if p.as_posix() != "."}
    stray = sorted(set(folders) - expected_folders)
    if stray:
        return f"{folder} holds folders the export did not write: {', '.join(stray[:5])}"
    missing = sorted(set(digests) - set(files))
    if missing:
        return f"{folder} is missing {', '.join(missing[:5])}"
    changed = [rel for rel, digest in sorted(digests.items()) if _sha256(folder / rel) != digest]
    if changed:
        return f"{folder}: content changed since the export: {', '.join(changed[:5])}"
    return None
