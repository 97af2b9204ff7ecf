"""Per-model defaults from model_zoo.yaml, matched on config.model_type (never on a path)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml


@lru_cache(maxsize=1)
def zoo() -> dict[str, Any]:
    """The parsed model_zoo.yaml: the installed copy, or the repository's in a source checkout."""
    here = Path(__file__).resolve().parent
    for path in (here / "model_zoo.yaml", here.parent / "model_zoo.yaml"):
        if path.exists():
            return yaml.safe_load(path.read_text(encoding="utf-8"))
    raise FileNotFoundError("model_zoo.yaml is missing from the vtprune installation")


def policy_defaults(model_type: str, policy: str) -> dict[str, Any]:
    """Defaults of `policy` for a model family (empty when the zoo has none)."""
    family = zoo()["families"].get(model_type, {})
    return dict(family.get("defaults", {}).get(policy, {}))
