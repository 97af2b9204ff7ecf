"""lmms-eval hooks of the toyvqa task: image, prompt, first-word exact match per question type.

Scored exactly as :func:`vtprune.toyvqa.scoring.score`: the first word of the
generated text (lower-cased, full stops dropped) must equal the one-word
answer. ``accuracy`` is over all items; ``color``, ``exist``, ``count``,
``position`` and ``reading`` are over the items of that type (NaN when the
slice has none).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from vtprune.toyvqa.questions import TYPES
from vtprune.toyvqa.scoring import first_word


def doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict) -> list[Image.Image]:
    """The item's PNG; ``image`` is relative to the export folder given as ``root``."""
    with Image.open(Path(lmms_eval_specific_kwargs["root"]) / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question as the toy models were trained to see it (the model's wrapper adds the image token and template)."""
    return doc["prompt"]


def process_results(doc: dict, results: list[str]) -> dict[str, dict]:
    """One record per metric: the item's type and whether its first word is the answer."""
    record = {"type": doc["type"], "correct": first_word(results[0]) == doc["answer"]}
    return {"accuracy": record, **{kind: record for kind in TYPES}}


def accuracy(records: list[dict]) -> float:
    return sum(r["correct"] for r in records) / len(records)


def _type_accuracy(kind: str):
    def aggregate(records: list[dict]) -> float:
        hits = [r["correct"] for r in records if r["type"] == kind]
        return sum(hits) / len(hits) if hits else float("nan")

    aggregate.__name__ = kind
    aggregate.__doc__ = f"Accuracy over the {kind!r} questions."
    return aggregate


color = _type_accuracy("color")
exist = _type_accuracy("exist")
count = _type_accuracy("count")
position = _type_accuracy("position")
reading = _type_accuracy("reading")
