"""Cluttered synthetic scenes: sampling, rendering and dense per-cell labels.

A scene lives on a 336x336 canvas (the LLaVA-1.5 geometry); ``render`` draws it
at any square size by scaling every coordinate, so the same scene can be shown
to a 336 px LLaVA model and a 448 px Qwen2.5-VL model. The background is a
low-contrast texture with desaturated distractor blobs; the objects are 1-4
saturated shapes and one small bitmap character.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from vtprune.toyvqa.font import CHARS, glyph

CANVAS = 336
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 60, 235),
    "yellow": (245, 225, 20),
    "purple": (150, 40, 200),
    "orange": (255, 135, 0),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
CHAR_SCALE = 2  # glyph pixels per font pixel on the 336 canvas: 10x14 px
# The glyph's top-left corner sits on this canvas grid, so at 336 px (and at
# 448 px, where the grid is 56 px) it falls inside a single 14 px patch: a
# glyph cut across patches was beyond what the tiny ViTs learnt on a CPU.
CHAR_GRID = 42
# Object boxes start on this canvas grid and their sides are multiples of it,
# so each 14 px patch at 336 px sees one of few canonical edge pieces; with
# free placement the tiny ViTs did not learn shapes in hours of CPU training.
SNAP = 14


@dataclass(frozen=True)
class Obj:
    """One shape: centre (x, y) and side ``size`` in canvas pixels."""

    shape: str
    color: str
    x: float
    y: float
    size: float


@dataclass(frozen=True)
class Blob:
    """A desaturated distractor ellipse."""

    x: float
    y: float
    rx: float
    ry: float
    rgb: tuple[int, int, int]


@dataclass
class Scene:
    """Everything needed to render an image and to answer questions about it."""

    objects: list[Obj]
    char: str
    char_xy: tuple[float, float]  # top-left corner of the glyph box
    char_ink: int
    blobs: list[Blob]
    bg_base: tuple[int, int, int]
    texture_seed: int
    meta: dict = field(default_factory=dict)

    def count(self, shape: str) -> int:
        """Number of objects with this shape."""
        return sum(o.shape == shape for o in self.objects)

    def has(self, color: str, shape: str) -> bool:
        """Whether an object of this colour and shape is present."""
        return any(o.shape == shape and o.color == color for o in self.objects)


@dataclass(frozen=True)
class Difficulty:
    """Scene difficulty knobs; ``TARGET`` is what the test split uses."""

    min_size: float = 20.0
    max_size: float = 60.0
    n_blobs: tuple[int, int] = (4, 10)
    texture_amp: float = 14.0
    snap: int = SNAP

    @staticmethod
    def at(level: float) -> Difficulty:
        """Interpolate from an easy scene (level 0) to the target one (level 1)."""
        level = float(np.clip(level, 0.0, 1.0))
        return Difficulty(
            min_size=40.0 - 20.0 * level,
            max_size=60.0,
            n_blobs=(round(4 * level), round(2 + 8 * level)),
            texture_amp=4.0 + 10.0 * level,
        )

    def size(self, rng: np.random.Generator) -> float:
        """An object side: uniform, or a random multiple of ``snap`` in range."""
        if not self.snap:
            return float(rng.uniform(self.min_size, self.max_size))
        lo, hi = -int(-self.min_size // self.snap), int(self.max_size // self.snap)
        return float(self.snap * rng.integers(lo, hi + 1))


TARGET = Difficulty()


def sample_specs(rng: np.random.Generator, kind: str) -> tuple[list[tuple[str, str]], str | None]:
    """Choose the (shape, colour) of each object; ``kind`` biases it for counting.

    For ``kind == "count"`` a target shape (returned second) gets 0-4 copies,
    uniformly, so count answers are balanced; otherwise 1-4 objects with
    independent attributes and no target.
    """
    colors = list(COLOR_NAMES)
    if kind == "count":
        target = SHAPES[rng.integers(len(SHAPES))]
        k = int(rng.integers(0, 5))
        n = int(rng.integers(max(k, 1), 5))
        others = [s for s in SHAPES if s != target]
        shapes = [target] * k + [others[rng.integers(3)] for _ in range(n - k)]
        order = rng.permutation(n)
        return [(shapes[i], colors[rng.integers(6)]) for i in order], target
    n = int(rng.integers(1, 5))
    return [(SHAPES[rng.integers(4)], colors[rng.integers(6)]) for _ in range(n)], None


def _place_char(rng: np.random.Generator, boxes: list[tuple[float, float, float]]) -> tuple[float, float] | None:
    """Top-left corner, on the ``CHAR_GRID``, of a glyph box that clears ``boxes``."""
    w, h, margin = 5 * CHAR_SCALE, 7 * CHAR_SCALE, 3.0
    cells = [(i * CHAR_GRID, j * CHAR_GRID) for i in range(CANVAS // CHAR_GRID) for j in range(CANVAS // CHAR_GRID)]
    for k in rng.permutation(len(cells)):
        x, y = cells[k]
        cx, cy = x + w / 2, y + h / 2
        if all(abs(cx - bx) > w / 2 + bh + margin or abs(cy - by) > h / 2 + bh + margin for bx, by, bh in boxes):
            return float(x), float(y)
    return None


def _place(
    rng: np.random.Generator, half: float, boxes: list[tuple[float, float, float]], snap: int = 0
) -> tuple[float, float] | None:
    """Rejection-sample a centre whose box (half-side ``half``) clears ``boxes``.

    With ``snap`` the box's top-left corner lies on a ``snap``-pixel grid.
    """
    margin = 4.0
    for _ in range(200):
        x = float(rng.uniform(half + margin, CANVAS - half - margin))
        y = float(rng.uniform(half + margin, CANVAS - half - margin))
        if snap:
            x = min(max(snap * round((x - half) / snap), snap), CANVAS - 2 * half - snap) + half
            y = min(max(snap * round((y - half) / snap), snap), CANVAS - 2 * half - snap) + half
        if all(abs(x - bx) > half + bh + margin or abs(y - by) > half + bh + margin for bx, by, bh in boxes):
            return x, y
    return None


def _rgb(channels) -> tuple[int, int, int]:
    """Three channel values (drawn in order) as an RGB triple."""
    r, g, b = channels
    return r, g, b


def sample_scene(rng: np.random.Generator, kind: str = "any", difficulty: Difficulty = TARGET) -> Scene:
    """Sample a scene; ``kind`` is the question type it is drawn for."""
    while True:
        specs, count_shape = sample_specs(rng, kind)
        boxes: list[tuple[float, float, float]] = []
        objects: list[Obj] = []
        for shape, color in specs:
            size = difficulty.size(rng)
            xy = _place(rng, size / 2, boxes, difficulty.snap)
            if xy is None:
                break
            boxes.append((xy[0], xy[1], size / 2))
            objects.append(Obj(shape, color, xy[0], xy[1], size))
        else:
            cxy = _place_char(rng, boxes)
            if cxy is not None:
                break
    char = CHARS[rng.integers(len(CHARS))]
    base = int(rng.integers(95, 165))
    bg = _rgb(int(np.clip(base + rng.integers(-12, 13), 0, 255)) for _ in range(3))
    blobs = []
    for _ in range(int(rng.integers(difficulty.n_blobs[0], difficulty.n_blobs[1] + 1))):
        grey = int(np.clip(base + rng.integers(-45, 46), 0, 255))
        rgb = _rgb(int(np.clip(grey + rng.integers(-18, 19), 0, 255)) for _ in range(3))
        blobs.append(
            Blob(
                float(rng.uniform(0, CANVAS)),
                float(rng.uniform(0, CANVAS)),
                float(rng.uniform(6, 28)),
                float(rng.uniform(6, 28)),
                rgb,
            )
        )
    return Scene(
        objects=objects,
        char=char,
        char_xy=cxy,
        char_ink=int(rng.choice([15, 245])),
        blobs=blobs,
        bg_base=bg,
        texture_seed=int(rng.integers(2**31)),
        meta={"texture_amp": difficulty.texture_amp, "count_shape": count_shape},
    )


def _shape_polygon(o: Obj, s: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape at render scale ``s`` (None for circles)."""
    x, y, h = o.x * s, o.y * s, o.size * s / 2
    if o.shape == "square":
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if o.shape == "triangle":
        return [(x, y - h), (x + h, y + h), (x - h, y + h)]
    if o.shape == "cross":
        a = h / 3
        return [
            (x - a, y - h), (x + a, y - h), (x + a, y - a), (x + h, y - a),
            (x + h, y + a), (x + a, y + a), (x + a, y + h), (x - a, y + h),
            (x - a, y + a), (x - h, y + a), (x - h, y - a), (x - a, y - a),
        ]  # fmt: skip
    return None


def _draw_obj(draw: ImageDraw.ImageDraw, o: Obj, s: float, fill) -> None:
    poly = _shape_polygon(o, s)
    if poly is None:
        h = o.size * s / 2
        draw.ellipse([o.x * s - h, o.y * s - h, o.x * s + h, o.y * s + h], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def _char_box(scene: Scene, size: int) -> tuple[np.ndarray, int, int]:
    scale = max(1, CHAR_SCALE * size // CANVAS)
    mask = glyph(scene.char, scale)
    s = size / CANVAS
    return mask, round(scene.char_xy[1] * s), round(scene.char_xy[0] * s)


def render(scene: Scene, size: int = CANVAS) -> tuple[Image.Image, np.ndarray]:
    """Draw ``scene`` at ``size`` x ``size``.

    Returns the RGB image and an int label map: 0 background, ``i + 1`` for
    ``scene.objects[i]``, ``len(objects) + 1`` for the character.
    """
    s = size / CANVAS
    trng = np.random.default_rng(scene.texture_seed)
    amp = scene.meta.get("texture_amp", TARGET.texture_amp)
    coarse = trng.normal(0.0, 1.0, (12, 12, 3)).astype(np.float32)
    coarse_img = Image.fromarray(((coarse.clip(-3, 3) + 3) * (255 / 6)).astype(np.uint8))
    smooth = np.asarray(coarse_img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / (255 / 6) - 3
    fine = trng.normal(0.0, 1.0, (size, size, 3)).astype(np.float32)
    pixels = np.asarray(scene.bg_base, dtype=np.float32) + amp * smooth + 0.4 * amp * fine
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for b in scene.blobs:
        draw.ellipse(
            [(b.x - b.rx) * s, (b.y - b.ry) * s, (b.x + b.rx) * s, (b.y + b.ry) * s],
            fill=b.rgb,
        )
    labels = Image.new("L", (size, size), 0)
    ldraw = ImageDraw.Draw(labels)
    for i, o in enumerate(scene.objects):
        _draw_obj(draw, o, s, COLORS[o.color])
        _draw_obj(ldraw, o, s, i + 1)
    arr = np.array(img)
    lab = np.array(labels)
    mask, top, left = _char_box(scene, size)
    ys, xs = np.nonzero(mask)
    arr[top + ys, left + xs] = scene.char_ink
    # the glyph's whole box is labelled: its thin strokes alone cover too little of a cell
    lab[top : top + mask.shape[0], left : left + mask.shape[1]] = len(scene.objects) + 1
    return Image.fromarray(arr), lab


# Dense targets: one class per cell for each of these heads.
N_COLOR_CLASSES = 1 + len(COLOR_NAMES)  # background + colours
N_SHAPE_CLASSES = 2 + len(SHAPES)  # background + shapes + "character"
N_CHAR_CLASSES = 1 + len(CHARS)  # none + characters


def cell_owner(scene: Scene, labels: np.ndarray, cell: int, min_frac: float = 0.12) -> np.ndarray:
    """Who covers each cell of a ``cell``-pixel grid (row-major): 0 background,
    ``i + 1`` for ``scene.objects[i]``, ``len(objects) + 1`` for the glyph.

    A cell takes the label covering most of it if that covers ``min_frac`` of it.
    """
    size = labels.shape[0]
    if size % cell:
        raise ValueError(f"image size {size} is not a multiple of cell {cell}")
    g = size // cell
    blocks = labels.reshape(g, cell, g, cell).transpose(0, 2, 1, 3).reshape(g * g, cell * cell)
    counts = np.stack([(blocks == k).sum(1) for k in range(1, len(scene.objects) + 2)], axis=1)
    hit = counts.max(1) >= min_frac * cell * cell
    return np.where(hit, counts.argmax(1) + 1, 0)


def cell_targets(scene: Scene, labels: np.ndarray, cell: int, min_frac: float = 0.12) -> np.ndarray:
    """Per-cell dense targets for a ``cell``-pixel grid over the label map.

    Returns int64 (6, G*G) in row-major cell order: colour class, shape class,
    character class, 1 where the cell holds an object's centre, and the cell's
    half of the image (1 right, 1 bottom). A cell takes the label that covers
    most of it if that covers ``min_frac`` of it.
    """
    size = labels.shape[0]
    g = size // cell
    who = cell_owner(scene, labels, cell, min_frac)
    color = np.zeros(g * g, dtype=np.int64)
    shape = np.zeros(g * g, dtype=np.int64)
    char = np.zeros(g * g, dtype=np.int64)
    center = np.zeros(g * g, dtype=np.int64)
    s = size / CANVAS
    for i, o in enumerate(scene.objects):
        sel = who == i + 1
        color[sel] = 1 + COLOR_NAMES.index(o.color)
        shape[sel] = 1 + SHAPES.index(o.shape)
        cy = min(int(o.y * s) // cell, g - 1)
        cx = min(int(o.x * s) // cell, g - 1)
        center[cy * g + cx] = 1
    sel = who == len(scene.objects) + 1
    shape[sel] = 1 + len(SHAPES)
    char[sel] = 1 + CHARS.index(scene.char)
    right = np.tile(np.arange(g) >= g // 2, g).astype(np.int64)
    bottom = np.repeat(np.arange(g) >= g // 2, g).astype(np.int64)
    return np.stack([color, shape, char, center, right, bottom])
