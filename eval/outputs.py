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

    The path may exist as a file (it is overwritten); missing folders above it
    are created by :func:`make_parent` (so the check is that they can be).
    """
    path = Path(path)
    if path.is_dir():
        return f"{what} {str(path)!r} is a folder; give a file path, e.g. {str(path / 'out.json')!r}"
    if path.exists():
        return None if os.access(path, os.W_OK) else f"{what} {str(path)!r} is not writable"
    return folder_problem(path.parent, what, name=path)


def make_parent(path: str | Path) -> None:
    """Create the folders above ``path`` (checked by :func:`file_problem`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)


def folder_problem(path: str | Path, what: str, name: str | Path | None = None) -> str | None:
    """Why ``path`` cannot be used as an output folder (created if absent), or None when it can.

    ``name`` is the path the user gave, when ``path`` is the folder above it.
    """
    path = Path(path)
    base = _nearest_existing(path)
    given = f"{what} {str(path if name is None else name)!r}"
    where = "" if base == Path(path if name is None else name) else f": {str(base)!r}"
    if not base.is_dir():
        return f"{given}{where} is a file, not a folder"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"{given}{where} is not writable"
    return None
