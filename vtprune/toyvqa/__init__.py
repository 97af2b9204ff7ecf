"""Toy VQA: a synthetic visual question answering task and tiny VLMs trained on it.

Pruning accuracy needs a model that actually answers from the image, and the
real checkpoints cannot be downloaded here; so the generator draws cluttered
scenes with one-word-answer questions (colour, existence, counting, position,
reading), and two small models with the real HF classes
(``LlavaForConditionalGeneration`` at 576 visual tokens and
``Qwen2_5_VLForConditionalGeneration`` at 256) are trained on it and shipped
as package data.

>>> model, processor = load("llava")                      # doctest: +SKIP
>>> score(model, processor, n=200)["overall"]             # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from vtprune.checks import BadValue
from vtprune.toyvqa.questions import TYPES, Item, make_item
from vtprune.toyvqa.vocab import ARCHS

__all__ = ["ARCHS", "TYPES", "Item", "checkpoint_path", "load", "make_item", "score"]


def checkpoint_path(arch: str) -> Path:
    """Folder of the shipped checkpoint of ``arch`` (``llava`` or ``qwen2_5_vl``).

    The folder is package data next to this module, so it resolves in an
    editable checkout and after a plain ``pip install .`` alike. It may not
    exist yet if no model of that arch has been shipped.
    """
    if arch not in ARCHS:
        raise BadValue(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return Path(__file__).resolve().parent / "checkpoints" / arch


def load(arch_or_path: str | Path, dtype=None):
    """Load ``(model, processor)`` from a shipped arch name or a saved folder, offline."""
    from vtprune.toyvqa.models import arch_of, load_processor, model_class

    path = checkpoint_path(str(arch_or_path)) if str(arch_or_path) in ARCHS else Path(arch_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no toy checkpoint at {path} (config.json missing)")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = model_class(arch_of(path)).from_pretrained(str(path), local_files_only=True, **kwargs)
    model.eval()
    return model, load_processor(path)


def score(
    model,
    processor,
    n: int = 500,
    split: str = "test",
    batch_size: int = 16,
    return_predictions: bool = False,
) -> dict:
    """Accuracy per question type and overall; see :func:`vtprune.toyvqa.scoring.score`."""
    from vtprune.toyvqa.scoring import score as _score

    return _score(
        model,
        processor,
        n=n,
        split=split,
        batch_size=batch_size,
        return_predictions=return_predictions,
    )
