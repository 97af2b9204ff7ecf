"""Question templates with one-word answers, and the seeded train/validation/test items.

Five question types:

- ``color``: "what color is the circle ?" (the shape is unique in the scene).
- ``exist``: "is there a red circle ?" yes/no, balanced; negatives are chosen
  like POPE's (Li et al., 2023): ``random`` (any absent colour-shape pair),
  ``popular`` (the scene's most frequent shape in a colour it does not have)
  and ``adversarial`` (a colour that is in the scene, on a shape that is in the
  scene, but never together).
- ``count``: "how many circles are there ?" 0-4 (balanced by construction).
- ``position``: "is the red circle on the left or the right ?" or "... at the
  top or the bottom ?" (objects near the middle line are never asked about).
- ``reading``: "what character is written in the image ?" a small glyph.

Item ``i`` of a split is drawn from ``numpy.random.default_rng([seed, i])``,
so every item is reproducible on its own and splits never share a stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from vtprune.toyvqa.font import CHARS
from vtprune.toyvqa.scene import (
    CANVAS,
    COLOR_NAMES,
    SHAPES,
    TARGET,
    Difficulty,
    Scene,
    render,
    sample_scene,
)

TYPES: tuple[str, ...] = ("color", "exist", "count", "position", "reading")
NEGATIVES: tuple[str, ...] = ("random", "popular", "adversarial")
SPLIT_SEEDS: dict[str, int] = {"train": 1000, "validation": 2000, "test": 3000}
PLURAL = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
}
POSITION_MARGIN = 20.0  # canvas px an object must be away from the middle line
ANSWERS: tuple[str, ...] = (
    *COLOR_NAMES,
    "yes",
    "no",
    "0",
    "1",
    "2",
    "3",
    "4",
    "left",
    "right",
    "top",
    "bottom",
    *CHARS,
)


@dataclass(frozen=True)
class QA:
    """One question about a scene: its type, the one-word answer, a subtype.

    ``focus`` lists the indexes (into ``scene.objects``) of the objects the
    answer depends on, -1 standing for the glyph; training uses it to ground
    the model's attention. It is empty when nothing in the image answers
    (a count of 0, an absent shape).
    """

    question: str
    answer: str
    type: str
    subtype: str = ""
    focus: tuple[int, ...] = ()


def _where(scene: Scene, shape: str | None = None, color: str | None = None) -> tuple[int, ...]:
    """Indexes of the objects matching ``shape`` and ``color`` (None matches any)."""
    return tuple(
        i for i, o in enumerate(scene.objects) if (shape is None or o.shape == shape) and (color is None or o.color == color)
    )


def _exist(scene: Scene, rng: np.random.Generator, want_yes: bool, negative: str) -> QA:
    if want_yes:
        o = scene.objects[rng.integers(len(scene.objects))]
        return QA(f"is there a {o.color} {o.shape} ?", "yes", "exist", "positive", _where(scene, o.shape, o.color))
    absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if not scene.has(c, s)]
    pool = absent
    if negative in ("popular", "adversarial"):
        counts = {s: scene.count(s) for s in SHAPES}
        top = max(counts.values())
        popular = [(c, s) for c, s in absent if counts[s] == top]
        pool = popular or absent
    if negative == "adversarial":
        colors = {o.color for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        adversarial = [(c, s) for c, s in absent if c in colors and s in shapes]
        pool = adversarial or pool
    c, s = pool[rng.integers(len(pool))]
    return QA(f"is there a {c} {s} ?", "no", "exist", negative)  # nothing in the image answers


def ask(
    scene: Scene,
    kind: str,
    rng: np.random.Generator,
    want_yes: bool | None = None,
    negative: str | None = None,
) -> QA | None:
    """Ask a ``kind`` question about ``scene``; None if the scene cannot support it."""
    if kind == "color":
        unique = [o for o in scene.objects if scene.count(o.shape) == 1]
        if not unique:
            return None
        o = unique[rng.integers(len(unique))]
        return QA(f"what color is the {o.shape} ?", o.color, "color", focus=_where(scene, o.shape))
    if kind == "exist":
        yes = bool(rng.integers(2)) if want_yes is None else want_yes
        neg = NEGATIVES[rng.integers(3)] if negative is None else negative
        return _exist(scene, rng, yes, neg)
    if kind == "count":
        shape = scene.meta.get("count_shape") or SHAPES[rng.integers(4)]
        return QA(f"how many {PLURAL[shape]} are there ?", str(scene.count(shape)), "count", focus=_where(scene, shape))
    if kind == "position":
        axis = int(rng.integers(2))
        mid = CANVAS / 2
        ok = [
            o
            for o in scene.objects
            if sum(p.color == o.color and p.shape == o.shape for p in scene.objects) == 1
            and abs((o.x, o.y)[axis] - mid) >= POSITION_MARGIN
        ]
        if not ok:
            return None
        o = ok[rng.integers(len(ok))]
        if axis == 0:
            return QA(
                f"is the {o.color} {o.shape} on the left or the right ?",
                "left" if o.x < mid else "right",
                "position",
                "horizontal",
                _where(scene, o.shape, o.color),
            )
        return QA(
            f"is the {o.color} {o.shape} at the top or the bottom ?",
            "top" if o.y < mid else "bottom",
            "position",
            "vertical",
            _where(scene, o.shape, o.color),
        )
    if kind == "reading":
        return QA("what character is written in the image ?", scene.char, "reading", focus=(-1,))
    raise ValueError(f"unknown question type {kind!r}; expected one of {TYPES}")


def scene_for(rng: np.random.Generator, kind: str, difficulty: Difficulty = TARGET, **ask_kwargs) -> tuple[Scene, QA]:
    """Sample scenes until one supports a ``kind`` question; return it with the question."""
    while True:
        scene = sample_scene(rng, kind, difficulty)
        qa = ask(scene, kind, rng, **ask_kwargs)
        if qa is not None:
            return scene, qa


@dataclass(frozen=True)
class Item:
    """One evaluation item: ``id`` is ``{split}-{index}``."""

    id: str
    question: str
    answer: str
    type: str
    subtype: str

    def to_dict(self) -> dict:
        """Plain-dict form (for JSONL export and score reports)."""
        return asdict(self)


def split_rng(split: str, index: int) -> np.random.Generator:
    """The generator for item ``index`` of ``split``."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_SEEDS)}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return np.random.default_rng([SPLIT_SEEDS[split], index])


def item_spec(split: str, index: int) -> tuple[str, bool | None, str | None]:
    """Balanced design of item ``index``: its type, and for ``exist`` the yes/no and negative kind."""
    kind = TYPES[index % len(TYPES)]
    if kind != "exist":
        return kind, None, None
    k = index // len(TYPES)
    return kind, k % 2 == 0, NEGATIVES[(k // 2) % len(NEGATIVES)]


def make_item(split: str, index: int, size: int = CANVAS, difficulty: Difficulty = TARGET) -> tuple[Item, Image.Image, Scene]:
    """Item ``index`` of ``split`` rendered at ``size`` px: (item, image, scene)."""
    rng = split_rng(split, index)
    kind, want_yes, negative = item_spec(split, index)
    kwargs = {"want_yes": want_yes, "negative": negative} if kind == "exist" else {}
    scene, qa = scene_for(rng, kind, difficulty, **kwargs)
    image, _ = render(scene, size)
    item = Item(f"{split}-{index}", qa.question, qa.answer, qa.type, qa.subtype)
    return item, image, scene
