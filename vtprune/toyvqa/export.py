"""Write a split as a local dataset: ``DIR/{split}.jsonl`` plus ``DIR/images/*.png``.

Each JSONL line has ``id``, ``question``, ``answer``, ``type``, ``subtype``,
``image`` (path relative to ``DIR``) and ``prompt`` (the question as the
models were trained to see it, without the image token), so an lmms-eval task
YAML can read it with the ``json`` dataset builder.
"""

from __future__ import annotations

import json
from pathlib import Path

from vtprune.toyvqa.models import IMAGE_SIZE
from vtprune.toyvqa.questions import make_item


def export(out: str | Path, n: int = 500, split: str = "test", size: int = IMAGE_SIZE["llava"]) -> Path:
    """Export the first ``n`` items of ``split`` at ``size`` px; returns the JSONL path."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / f"{split}.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            item, image, _ = make_item(split, i, size=size)
            rel = f"images/{item.id}.png"
            image.save(out / rel)
            f.write(json.dumps({**item.to_dict(), "image": rel, "prompt": item.question}) + "\n")
    return path
