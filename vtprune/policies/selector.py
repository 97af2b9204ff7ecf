"""Loader for trained token-importance scorers in the VisionSelector format.

IDPruner's published numbers use such a scorer ("IDPruner: Harmonizing
Importance and Diversity in Visual Token Pruning for MLLMs"; code in
Tencent/AngelSlim, ``vision_selector_utils.py``). A scorer directory holds

- ``config.json`` with ``in_features`` (D, the LLM hidden size),
  ``hidden_dim`` (1792 in the releases; read, never assumed) and
  ``"architecture": "TransformerScorer"``;
- one or more ``*.safetensors`` files with ``q_proj.weight`` ``(hidden_dim, D)``,
  ``q_proj.bias``, ``k_proj.weight``, ``k_proj.bias`` (a ``norm.weight`` may be
  present and is unused), possibly under the training wrappers' prefixes
  ``module.``, ``visual.importance_scorer.`` or ``_orig_mod.``.

The score of token i is the reference's raw logit
``s_i = q_i . mean_j(k_j) / sqrt(hidden_dim)`` with ``q = Wq x + bq``,
``k = Wk x + bk`` over the tokens scored together (not the soft-top-k
variant the paper describes). Nothing is downloaded: the path must be local.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

ARCHITECTURE = "TransformerScorer"
PREFIXES = ("module.", "visual.importance_scorer.", "_orig_mod.")
REQUIRED = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")


class SelectorNotFoundError(FileNotFoundError, ValueError):
    """A selector path, config or weights file that is not there (a ValueError too, like every bad wrap option)."""


def strip_prefixes(name: str) -> str:
    """`name` without any leading training-wrapper prefixes (in any order, repeated)."""
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return name


@dataclass
class VisionSelector:
    """A loaded scorer: fp32 weights on CPU, copied to a device on first use there."""

    path: str
    in_features: int
    hidden_dim: int
    q_weight: torch.Tensor
    q_bias: torch.Tensor
    k_weight: torch.Tensor
    k_bias: torch.Tensor
    _on_device: dict = field(default_factory=dict, repr=False)

    def check_features(self, dim: int) -> None:
        """Raise unless the scorer reads features of width `dim` (the model's hidden size)."""
        if dim != self.in_features:
            raise ValueError(
                f"selector {self.path!r} scores {self.in_features}-dim features (config in_features) "
                f"but this model's visual tokens are {dim}-dim; use a selector trained for this model"
            )

    def _weights(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = tuple(w.to(device) for w in (self.q_weight, self.q_bias, self.k_weight, self.k_bias))
        return self._on_device[key]

    @torch.no_grad()
    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Raw importance logits ``(n,)`` in fp32 of `features` ``(n, D)``, keys averaged over all n tokens."""
        if features.dim() != 2:
            raise ValueError(f"features must be (tokens, dim); got shape {tuple(features.shape)}")
        self.check_features(features.shape[-1])
        wq, bq, wk, bk = self._weights(features.device)
        x = features.float()
        # Linear algebra instead of the reference's (n, n) logits, same value:
        # mean_j(q_i . k_j) = q_i . k_mean with k_mean = Wk mean_j(x_j) + bk, and
        # q_i . k_mean = x_i . (Wq^T k_mean) + bq . k_mean: O(n D), no (n, hidden_dim) queries.
        k_mean = wk @ x.mean(dim=0) + bk
        return (x @ (wq.T @ k_mean) + bq @ k_mean) / math.sqrt(self.hidden_dim)


def _read_config(root: Path) -> dict:
    config_path = root / "config.json"
    if not config_path.is_file():
        raise SelectorNotFoundError(f"selector directory {str(root)!r} has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"selector config {str(config_path)!r} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"selector config {str(config_path)!r} must be a JSON object with in_features and hidden_dim; "
            f"got a {type(config).__name__}"
        )
    arch = config.get("architecture", ARCHITECTURE)
    if arch != ARCHITECTURE:
        raise ValueError(f"selector {str(root)!r}: architecture must be {ARCHITECTURE!r}; got {arch!r}")
    for key in ("in_features", "hidden_dim"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"selector config {str(config_path)!r}: {key} must be an int >= 1; got {value!r}")
    return config


def load_selector(path: str | os.PathLike) -> VisionSelector:
    """Load a VisionSelector-format scorer from a local directory (see the module docstring).

    Raises `FileNotFoundError` for a missing directory, config or weights
    file, `ValueError` for a bad config, a missing tensor or a tensor whose
    shape does not match the config.
    """
    from safetensors.torch import load_file

    root = Path(path)
    if not root.is_dir():
        raise SelectorNotFoundError(
            f"selector path {str(path)!r} is not a directory; give the local folder holding the scorer's "
            "config.json and *.safetensors (nothing is downloaded)"
        )
    config = _read_config(root)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise SelectorNotFoundError(f"selector directory {str(root)!r} has no *.safetensors weights file")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            loaded = load_file(str(file))
        except Exception as err:  # safetensors raises its own error types for a truncated or foreign file
            raise ValueError(f"selector weights {str(file)!r} are not a readable safetensors file: {err}") from None
        for name, tensor in loaded.items():
            tensors[strip_prefixes(name)] = tensor
    missing = [name for name in REQUIRED if name not in tensors]
    if missing:
        found = ", ".join(sorted(tensors)) or "none"
        raise ValueError(f"selector {str(root)!r} lacks tensors {missing}; found: {found}")
    d, h = config["in_features"], config["hidden_dim"]
    expected = {
        "q_proj.weight": (h, d),
        "q_proj.bias": (h,),
        "k_proj.weight": (h, d),
        "k_proj.bias": (h,),
    }
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"selector {str(root)!r}: {name} has shape {tuple(tensors[name].shape)}, but config.json "
                f"(in_features={d}, hidden_dim={h}) needs {shape}"
            )
    return VisionSelector(
        path=str(path),
        in_features=d,
        hidden_dim=h,
        q_weight=tensors["q_proj.weight"].float(),
        q_bias=tensors["q_proj.bias"].float(),
        k_weight=tensors["k_proj.weight"].float(),
        k_bias=tensors["k_proj.bias"].float(),
    )
