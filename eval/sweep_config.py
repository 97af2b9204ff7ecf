"""The sweep's configuration: a typed, checked `SweepConfig` from the YAML mapping (:func:`check_config`)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checks import BadValue

LMMS = "lmms:"
TIMED_ITEMS = 8  # toyvqa items timed one by one for "prefill ms b1"; also the size of the b8 batch


@dataclass(frozen=True)
class SweepConfig:
    """A checked sweep configuration (every field as the YAML names it; None where the YAML gave nothing)."""

    models: tuple[str, ...]
    budgets: tuple[int | float, ...]
    policies: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ("toyvqa",)
    n: int | None = 200  # null: every item
    out: str = "runs/sweep"
    stability: int = 0
    timed_items: int = TIMED_ITEMS
    model_args: str | None = None
    batch_size: int = 1
    device: str = "cpu"
    offline: bool = False
    cache_dir: str | None = None
    gen_kwargs: str | None = None
    ray_gpus_per_run: float | None = None  # None: 1 when device is cuda, else 0
    threads: int = 1

    def to_dict(self) -> dict:
        """The settings as a YAML-able mapping (lists for tuples)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)}

    @property
    def gpus_per_run(self) -> float:
        if self.ray_gpus_per_run is not None:
            return self.ray_gpus_per_run
        return 1 if self.device.startswith("cuda") else 0


class SweepConfigError(BadValue):
    """A sweep configuration with problems, one line each (raised before the first run)."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            f"sweep config {source}: {len(problems)} problem(s), nothing was run:\n" + "\n".join(f"  - {p}" for p in problems)
        )


#: every setting a sweep YAML may have (``threads``: set by ``--threads``)
SETTINGS = (
    "out",
    "models",
    "policies",
    "budgets",
    "tasks",
    "n",
    "stability",
    "timed_items",
    "model_args",
    "batch_size",
    "device",
    "offline",
    "cache_dir",
    "gen_kwargs",
    "ray_gpus_per_run",
    "threads",
)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(cfg: dict, key: str, problems: list[str], what: str) -> list[str]:
    """``cfg[key]`` as a list of non-empty strings, duplicates dropped (with a warning); problems appended."""
    value = cfg[key]
    if not isinstance(value, list) or not value:
        problems.append(f"{key!r} must be a non-empty list of {what}; got {value!r}")
        return []
    bad = [v for v in value if not isinstance(v, str) or not v.strip()]
    if bad:
        problems.append(f"{key!r} must hold {what}; got {', '.join(map(repr, bad))}")
    good = [v for v in value if isinstance(v, str) and v.strip()]
    unique = list(dict.fromkeys(good))
    if len(unique) < len(good):
        warnings.warn(
            f"sweep config: {key!r} lists {', '.join(sorted({v for v in good if good.count(v) > 1}))} "
            "more than once; each is run once",
            stacklevel=3,
        )
    return unique


def check_config(cfg, source: str = "", backend: str = "local") -> SweepConfig:
    """The sweep configuration, checked as a whole before anything runs, with duplicates removed.

    Raises :class:`SweepConfigError` listing every problem (a misspelt policy
    or model, a bad budget, a negative count, an unknown setting, an output
    path that is a file, ...), one line each. Duplicate models, policies,
    budgets or tasks are run once (a warning says so); the int budget 1 (one
    token) and the float 1.0 (full budget) are different budgets.
    """
    if not isinstance(cfg, dict):
        got = "an empty file" if cfg is None else f"a {type(cfg).__name__}"
        raise SweepConfigError(source, [f"must be a mapping of settings (at least models: [...] and budgets: [...]); got {got}"])
    problems: list[str] = []
    cfg = _known_settings(cfg, problems)
    for key in ("models", "budgets"):
        if cfg.get(key) is None:
            problems.append(f"{key!r} is required")
    if cfg.get("models") is not None:
        cfg["models"] = _strings(cfg, "models", problems, "toyvqa arch names, checkpoint folders or hub ids")
    if cfg.get("budgets") is not None:
        cfg["budgets"] = _budgets(cfg["budgets"], problems)
    if cfg.get("policies") is not None:
        cfg["policies"] = _strings(cfg, "policies", problems, "policy names (name or name:variant)")
        _check_policies(cfg["policies"], cfg.get("budgets") or [], problems)
    if cfg.get("tasks") is not None:
        cfg["tasks"] = _strings(cfg, "tasks", problems, "task names (toyvqa or lmms:NAME)")
        _check_tasks(cfg["tasks"], problems)
    _check_models(cfg.get("models") or [], cfg.get("tasks") or ["toyvqa"], problems)
    _check_scalars(cfg, problems)
    if backend not in ("local", "ray"):
        problems.append(f"unknown backend {backend!r}; choose local or ray")
    if problems:
        raise SweepConfigError(source, problems)
    given = {k: v for k, v in cfg.items() if v is not None or k == "n"}  # null is the default (n: null is every item)
    if given.get("stability") is False:
        given["stability"] = 0
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}  # checked above
    return SweepConfig(**fields)


def _known_settings(cfg: dict, problems: list[str]) -> dict:
    """The settings vtprune knows (a copy); each unknown one is a problem, with the closest known name."""
    import difflib

    for key in cfg:
        if key not in SETTINGS:
            close = difflib.get_close_matches(str(key), SETTINGS, n=1)
            problems.append(
                f"unknown setting {key!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; settings: {', '.join(SETTINGS)}"
            )
    return {k: v for k, v in cfg.items() if k in SETTINGS}


def _budgets(value, problems: list[str]) -> list:
    """The valid budgets, each once (1 and 1.0 differ: one token, the full budget)."""
    from ..budget import validate_keep

    if not isinstance(value, list) or not value:
        problems.append(
            f"'budgets' must be a non-empty list of token counts (int >= 1) or fractions (float in (0, 1]); got {value!r}"
        )
        return []
    budgets = []
    for i, keep in enumerate(value):
        try:
            budgets.append(validate_keep(keep, name=f"budgets[{i}]"))
        except (TypeError, ValueError) as exc:
            problems.append(str(exc))
    unique = list({(type(k), k): k for k in budgets}.values())
    if len(unique) < len(budgets):
        warnings.warn(f"sweep config: budgets {value} repeat a budget; each is run once: {unique}", stacklevel=3)
    return unique


def _check_policies(policies: list[str], budgets: list, problems: list[str]) -> None:
    """Each policy built with its options at every budget, as the run will build it."""
    from ..policies.base import make_policy, policy_spec, unknown_policy

    for policy in policies:
        name, options = policy_spec(policy)
        if name == "none":
            problems.append("policy 'none' is not a policy to list: every model's unpruned run is added")
        elif error := unknown_policy([name]):
            problems.append(error)
        else:
            for keep in budgets:
                try:
                    make_policy(name, keep=keep, **options)
                except (TypeError, ValueError) as exc:
                    variant = (
                        (f" (':{policy.partition(':')[2]}' sets the option importance, which only idpruner takes)")
                        if options and name != "idpruner"
                        else ""
                    )
                    problems.append(f"policy {policy!r} at keep {keep!r}{variant}: {exc}")
                    break


def _check_tasks(tasks: list[str], problems: list[str]) -> None:
    import importlib.util

    for task in tasks:
        if task != "toyvqa" and not (task.startswith(LMMS) and task[len(LMMS) :]):
            problems.append(
                f"unknown task {task!r}; use toyvqa (offline scorer) or lmms:NAME (an lmms-eval task, e.g. lmms:toyvqa)"
            )
    if any(t.startswith(LMMS) for t in tasks) and importlib.util.find_spec("lmms_eval") is None:
        problems.append(
            "lmms: tasks need lmms-eval, which is not installed (README: pip install '.[eval]' && "
            "pip install --no-deps lmms-eval==0.7.3)"
        )


def _check_models(models: list[str], tasks: list[str], problems: list[str]) -> None:
    """toyvqa loads toy checkpoints from disk; lmms-eval also takes hub ids."""
    from .. import toyvqa

    for model in models:
        local = model in toyvqa.ARCHS or (Path(model) / "config.json").is_file()
        if not local and "toyvqa" in tasks:
            problems.append(
                f"model {model!r}: task toyvqa needs a toyvqa arch ({', '.join(toyvqa.ARCHS)}) or a "
                "checkpoint folder with config.json"
            )
        elif not local and "/" not in model:
            problems.append(
                f"model {model!r} is neither a toyvqa arch ({', '.join(toyvqa.ARCHS)}), a checkpoint "
                "folder with config.json, nor a hub id (org/name)"
            )


COUNTS = {
    "n": (1, "null (every item) or an int >= 1"),
    "timed_items": (1, "an int >= 1"),
    "stability": (0, "an int >= 0 (toyvqa items; 0 or null: off)"),
    "batch_size": (1, "an int >= 1"),
    "threads": (1, "an int >= 1"),
}


def _check_scalars(cfg: dict, problems: list[str]) -> None:
    """The counts, the strings, the flags, the device and the folders."""
    from .outputs import folder_problem

    for key, (low, allowed) in COUNTS.items():
        value = cfg.get(key)
        if value is None or (key == "stability" and value is False):
            continue
        if not _is_int(value) or value < low:
            problems.append(f"{key!r} must be {allowed}; got {value!r}")
    gpus = cfg.get("ray_gpus_per_run")
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not gpus >= 0):
        problems.append(f"'ray_gpus_per_run' must be a number >= 0; got {gpus!r}")
    for key in ("out", "model_args", "device", "cache_dir", "gen_kwargs"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            problems.append(f"{key!r} must be a string; got {cfg[key]!r}")
    if cfg.get("offline") is not None and not isinstance(cfg["offline"], bool):
        problems.append(f"'offline' must be true or false; got {cfg['offline']!r}")
    if isinstance(cfg.get("device"), str):
        try:
            torch.device(cfg["device"])
        except (RuntimeError, ValueError):
            problems.append(f"'device' {cfg['device']!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    for key, default in (("out", "runs/sweep"), ("cache_dir", None)):
        value = cfg.get(key, default)
        if isinstance(value, str) and (problem := folder_problem(value, repr(key))):
            problems.append(problem)
