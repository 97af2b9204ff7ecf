"""Training batches: packed multi-question sequences plus dense per-token targets.

Each training image carries several questions packed as successive chat turns
(the image is encoded once for all of them) and the loss covers only the
answer tokens. The generator also knows which object covers every image
cell, so each visual token gets dense targets (colour, shape, character,
object centre) for an auxiliary linear head on the projector output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast

from vtprune.toyvqa.models import CLIP_MEAN, CLIP_STD, IMAGE_SIZE, TOKEN_CELL
from vtprune.toyvqa.questions import PLURAL, TYPES, ask, scene_for, split_rng
from vtprune.toyvqa.scene import CANVAS, COLOR_NAMES, SHAPES, Difficulty, cell_owner, cell_targets, render
from vtprune.toyvqa.vocab import end_of_answer, follow_up, prompt, token_ids

IGNORE = -100


@dataclass
class Sample:
    """One training image with its packed token ids, labels and cell targets."""

    image: Image.Image
    input_ids: list[int]
    labels: list[int]
    cells: np.ndarray  # (6, n_visual_tokens)
    #: per turn: (index in ``input_ids`` of the answer token, bool mask of
    #: visual tokens, whether it is a count). For a count, the mask marks the
    #: centre cell of each counted object (none for a count of 0); otherwise
    #: the cells covering the question's focus, empty for an existence
    #: question answered "no" (attention then belongs on the first token, a
    #: sink); other turns without focus are left out.
    focus: list[tuple[int, np.ndarray, bool]]
    #: per turn naming a shape: (index in ``input_ids`` of the answer token,
    #: index of the question's colour word or -1, index of its shape word)
    words: list[tuple[int, int, int]] = field(default_factory=list)
    #: answer-token indexes of position questions answered "right" or "bottom"
    far: list[int] = field(default_factory=list)


def n_visual_tokens(arch: str) -> int:
    """Visual tokens per image in the LLM sequence."""
    return (IMAGE_SIZE[arch] // TOKEN_CELL[arch]) ** 2


def _expand_image(arch: str, text: str) -> str:
    token = "<image>" if arch == "llava" else "<|image_pad|>"
    return text.replace(token, token * n_visual_tokens(arch), 1)


def make_sample(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    index: int,
    n_questions: int,
    difficulty: Difficulty,
    split: str = "train",
    weights: tuple[float, ...] | None = None,
) -> Sample:
    """Training sample ``index``: a scene and up to ``n_questions`` packed QA turns.

    ``weights`` (one per question type, default uniform) sets how often each
    type is drawn for the follow-up questions.
    """
    rng = split_rng(split, index)
    kind = TYPES[index % len(TYPES)]
    scene, first = scene_for(rng, kind, difficulty)
    qas = [first]
    probs = None if weights is None else np.asarray(weights, dtype=float) / sum(weights)
    for _ in range(8 * n_questions):
        if len(qas) >= n_questions:
            break
        kind = TYPES[rng.integers(len(TYPES))] if weights is None else TYPES[rng.choice(len(TYPES), p=probs)]
        qa = ask(scene, kind, rng)
        if qa is not None and qa.question not in {q.question for q in qas}:
            qas.append(qa)
    image, label_map = render(scene, IMAGE_SIZE[arch])
    owner = cell_owner(scene, label_map, TOKEN_CELL[arch])
    glyph = len(scene.objects) + 1
    [eos] = token_ids(tokenizer, [end_of_answer(arch)])
    ids: list[int] = []
    labels: list[int] = []
    focus: list[tuple[int, np.ndarray, bool]] = []
    words: list[tuple[int, int, int]] = []
    far: list[int] = []
    colour_ids = set(token_ids(tokenizer, list(COLOR_NAMES)))
    shape_ids = set(token_ids(tokenizer, [*SHAPES, *PLURAL.values()]))
    for turn, qa in enumerate(qas):
        text = _expand_image(arch, prompt(arch, qa.question)) if turn == 0 else follow_up(arch, qa.question)
        q_ids = tokenizer(text, add_special_tokens=turn == 0)["input_ids"]
        a_ids = token_ids(tokenizer, [qa.answer]) + [eos]
        if qa.type == "count":
            focus.append((len(ids) + len(q_ids), _centre_cells(scene, qa.focus, arch, owner.size), True))
        else:
            cells = np.isin(owner, [glyph if i < 0 else i + 1 for i in qa.focus])
            if cells.any() or qa.type == "exist":
                focus.append((len(ids) + len(q_ids), cells, False))
            if qa.type == "position" and qa.answer in ("right", "bottom"):
                far.append(len(ids) + len(q_ids))
        shape = [j for j, t in enumerate(q_ids) if t in shape_ids]
        if shape:
            colour = [j for j, t in enumerate(q_ids) if t in colour_ids]
            answer = len(ids) + len(q_ids)
            words.append((answer, len(ids) + colour[-1] if colour else -1, len(ids) + shape[-1]))
        ids += q_ids + a_ids
        labels += [IGNORE] * len(q_ids) + a_ids
    return Sample(image, ids, labels, cell_targets(scene, label_map, TOKEN_CELL[arch]), focus, words, far)


def _centre_cells(scene, objects: tuple[int, ...], arch: str, n_cells: int) -> np.ndarray:
    """Mask of the cells holding the centres of ``scene.objects[objects]`` (one per object)."""
    grid = IMAGE_SIZE[arch] // TOKEN_CELL[arch]
    scale = IMAGE_SIZE[arch] / CANVAS
    mask = np.zeros(n_cells, dtype=bool)
    for i in objects:
        o = scene.objects[i]
        row = min(int(o.y * scale) // TOKEN_CELL[arch], grid - 1)
        col = min(int(o.x * scale) // TOKEN_CELL[arch], grid - 1)
        mask[row * grid + col] = True
    return mask


def llava_pixels(images: list[Image.Image]) -> torch.Tensor:
    """CLIP normalisation, identical to ``CLIPImageProcessor`` on 336 px input."""
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    arr = (arr - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())


def collate(arch: str, samples: list[Sample], pad_id: int, image_processor=None) -> dict[str, torch.Tensor]:
    """Right-padded model inputs, shifted-free labels and stacked cell targets."""
    length = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    batch["cells"] = torch.from_numpy(np.stack([s.cells for s in samples]))
    # focus: (sample, answer position) rows with their visual-token masks
    rows = [(i, pos, cells, count) for i, s in enumerate(samples) for pos, cells, count in s.focus]
    batch["focus_rows"] = torch.tensor([(i, pos) for i, pos, _, _ in rows], dtype=torch.long).reshape(-1, 2)
    batch["focus_cells"] = torch.from_numpy(np.stack([r[2] for r in rows])) if rows else torch.zeros(0, 0, dtype=torch.bool)
    batch["focus_count"] = torch.tensor([r[3] for r in rows], dtype=torch.bool)
    batch["focus_far"] = torch.tensor([pos in samples[i].far for i, pos, _, _ in rows], dtype=torch.bool)
    # words: (sample, answer position, colour-word position or -1, shape-word position)
    batch["word_rows"] = torch.tensor([(i, *w) for i, s in enumerate(samples) for w in s.words], dtype=torch.long).reshape(-1, 4)
    images = [s.image for s in samples]
    if arch == "llava":
        batch["pixel_values"] = llava_pixels(images)
    else:
        out = image_processor(images=images, return_tensors="pt")
        batch["pixel_values"] = out["pixel_values"]
        batch["image_grid_thw"] = out["image_grid_thw"]
    return batch
