"""Output paths checked before any model runs, so that a bad path never costs a finished run."""

from __future__ import annotations

import os
from pathlib import Path


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def file_problem(path: str | Path, what: str) -> str | None:
    """Why ``path`` cannot be written as a file (``what`` names the option), or None when it can.

    The path may exist as a file (it is overwritten); its folder must exist.
    """
    path = Path(path)
    if path.is_dir():
        return f"{what} {str(path)!r} is a folder; give a file path, e.g. {str(path / 'out.json')!r}"
    folder = path.parent
    if not folder.exists():
        return f"{what} {str(path)!r}: folder {str(folder)!r} does not exist"
    if not folder.is_dir():
        return f"{what} {str(path)!r}: {str(folder)!r} is not a folder"
    if not os.access(path if path.exists() else folder, os.W_OK):
        return f"{what} {str(path)!r} is not writable"
    return None


def folder_problem(path: str | Path, what: str) -> str | None:
    """Why ``path`` cannot be used as an output folder (created if absent), or None when it can."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{what} {str(path)!r} exists and is not a folder"
    base = _nearest_existing(path)
    if not base.is_dir():
        return f"{what} {str(path)!r}: {str(base)!r} is a file, not a folder"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"{what} {str(path)!r}: {str(base)!r} is not writable"
    return None
