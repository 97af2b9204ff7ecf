"""Deterministic accuracy of a (possibly pruned) toy VLM on a split.

The model is run through the normal HF API: the processor builds a batch
(left padding), ``model.generate`` decodes greedily, and the first word of the
output is compared with the one-word answer. Any wrapper that keeps the
model's ``generate`` working (e.g. a pruning policy) is scored the same way.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from vtprune.checks import BadValue
from vtprune.toyvqa.models import IMAGE_SIZE
from vtprune.toyvqa.questions import Item, make_item
from vtprune.toyvqa.vocab import ARCHS, prompt


def _arch(model) -> str:
    arch = getattr(getattr(model, "config", None), "model_type", None)
    if arch not in ARCHS:
        raise BadValue(f"model_type {arch!r} is not a toy arch; expected one of {ARCHS}")
    return arch


def first_word(text: str) -> str:
    """The normalised first word of a generated answer ('' if none)."""
    words = text.strip().lower().replace(".", " ").split()
    return words[0] if words else ""


@torch.no_grad()
def predict(model, processor, items: list[Item], images, max_new_tokens: int = 3) -> list[str]:
    """Greedy one-word answers of ``model`` for ``items`` (one batch)."""
    arch = _arch(model)
    texts = [prompt(arch, it.question) for it in items]
    inputs = processor(images=list(images), text=texts, padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [first_word(t) for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def score(
    model,
    processor,
    n: int = 500,
    split: str = "test",
    batch_size: int = 16,
    return_predictions: bool = False,
) -> dict:
    """Accuracy per question type and overall on the first ``n`` items of ``split``.

    Returns ``{"overall", "per_type", "exist_by_negative", "n", "split"}``
    (plus ``"predictions"`` when asked). Items are balanced over the five
    types by construction; the result is deterministic for a given model.
    """
    if n < 1 or batch_size < 1:
        raise BadValue(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    arch = _arch(model)
    was_training = model.training
    model.eval()
    hits: dict[str, list[int]] = defaultdict(list)
    negatives: dict[str, list[int]] = defaultdict(list)
    predictions = []
    for start in range(0, n, batch_size):
        made = [make_item(split, i, size=IMAGE_SIZE[arch]) for i in range(start, min(n, start + batch_size))]
        items = [m[0] for m in made]
        answers = predict(model, processor, items, [m[1] for m in made])
        for item, pred in zip(items, answers):
            ok = int(pred == item.answer)
            hits[item.type].append(ok)
            if item.type == "exist":
                negatives[item.subtype].append(ok)
            predictions.append({**item.to_dict(), "prediction": pred, "correct": bool(ok)})
    model.train(was_training)
    every = [h for v in hits.values() for h in v]
    result = {
        "split": split,
        "n": len(every),
        "overall": round(sum(every) / len(every), 4),
        "per_type": {t: round(sum(v) / len(v), 4) for t, v in sorted(hits.items())},
        "exist_by_negative": {t: round(sum(v) / len(v), 4) for t, v in sorted(negatives.items())},
    }
    if return_predictions:
        result["predictions"] = predictions
    return result
