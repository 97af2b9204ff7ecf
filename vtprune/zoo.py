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


def _shape(config) -> dict[str, Any]:
    """The fields a zoo checkpoint's `match` may name, read from an HF config."""
    text = getattr(config, "text_config", None) or config
    vision = getattr(config, "vision_config", None)
    shape = {
        "model_type": getattr(config, "model_type", None),
        "text_hidden_size": getattr(text, "hidden_size", None),
        "text_layers": getattr(text, "num_hidden_layers", None),
    }
    if vision is not None:
        shape["vision_hidden_size"] = getattr(vision, "hidden_size", None)
        shape["vision_layers"] = getattr(vision, "num_hidden_layers", None) or getattr(vision, "depth", None)
    return shape


def checkpoint_for(config) -> str | None:
    """Name of the model_zoo.yaml checkpoint whose `match` fits `config` (every named field equal), or None."""
    shape = _shape(config)
    for name, entry in zoo().get("checkpoints", {}).items():
        match = entry.get("match", {})
        if match and all(shape.get(key) == value for key, value in match.items()):
            return name
    return None


def policy_defaults(model_type: str, policy: str, config=None) -> dict[str, Any]:
    """Defaults of `policy` for a model family (empty when the zoo has none).

    With `config` (the model's HF config), a matching checkpoint entry's own
    `defaults` override the family's (models whose depth moves the reference
    layers, such as the toyvqa models).
    """
    family = zoo()["families"].get(model_type, {})
    out = dict(family.get("defaults", {}).get(policy, {}))
    name = checkpoint_for(config) if config is not None else None
    if name is not None:
        out.update(zoo()["checkpoints"][name].get("defaults", {}).get(policy, {}))
    return out


def adapter_defaults(adapter, policy: str) -> dict[str, Any]:
    """`policy_defaults` for a bound model adapter: its family, and its config when it has one."""
    return policy_defaults(adapter.model_type, policy, getattr(adapter, "config", None))
