"""A vision-stage policy's selection run inside the vision encoder (``vit_layer=k``), between two of its blocks.

The runtime calls `encoder_selection` from the tower (`Adapter.encode_pruned_after`)
with the hidden states leaving block k - 1. It builds the batch's layouts from
the running call's inputs, a `StageContext` whose features are those hidden
states (one row per visual token: CLIP's patch rows, Qwen's merge units as
their four rows side by side, the shape the projector's input has), and asks
the policy for its usual selection; the keep sets go back to the tower as a
bool per unit of the call, and any new rows a policy writes (VisionZip's
merged contextual tokens) replace the kept rows before block k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .context import StageContext
from .layout import SampleLayout


@dataclass
class EncoderContext(StageContext):
    """A `StageContext` inside the encoder: features and the "pre-projector" rows are the hidden states at the
    prune point, and the projector is not applied (a merged row is written back into the encoder as it is)."""

    #: per sample, its media of every kind (the layouts hold only this call's kind)
    media: list[int] | None = None

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def num_media(self, b: int) -> int:
        return self.num_images(b) if self.media is None else self.media[b]


def encoder_selection(
    policy,
    adapter,
    outer: dict[str, Any] | None,
    call: dict[str, Any],
    grid,
    hidden: torch.Tensor,
    layer_calls: dict[int, list],
    first: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The policy's keep sets for the media of one encoder call, chosen from ``hidden`` (between two ViT blocks).

    ``call``: the encoder method's recorded call (``method`` and grid
    arguments); ``layer_calls``: this call's captured ViT layer inputs;
    ``first``: the units a policy before the encoder kept (PixelPrune), the
    only candidates here (None: every unit); ``hidden`` then holds every
    unit, zero where dropped. Returns (bool per unit of the call, ``[(unit
    indices of the call, their new rows)]``), as
    `Adapter.encoder_keep_units` lays units out.
    """
    captured = {k: v for k, v in (outer or {}).items() if v is not None}
    for key, value in call.items():
        if key != "method" and value is not None:
            captured.setdefault(key, value)
    rows = adapter.encoder_rows(hidden)
    # the blocks before this one ran on `first`'s units: their captured inputs map back through it
    ran_on = [] if first is None else [(grid, first)]
    captured.update(vision_calls=[call], vision_layers=layer_calls, pre_projector=[rows], pixel_keep=ran_on)
    kind = "video" if call.get("method") == "get_video_features" else "image"
    layouts = adapter.layouts(captured, hidden) if captured.get("input_ids") is not None else None
    if layouts is None:
        raise RuntimeError(f"{policy.describe()}: vit_layer needs the call's input_ids to lay out its images")
    media = [len(s.images) for s in layouts]
    if any(img.kind != kind for s in layouts for img in s.images):
        # images and videos run through the encoder in separate calls (Qwen): select this call's kind here
        layouts = [
            SampleLayout(
                images=[img for img in s.images if img.kind == kind], question_positions=s.question_positions, valid=s.valid
            )
            for s in layouts
        ]
    bsz, length = captured["input_ids"].shape
    per_image = {
        (b, i): adapter.pre_projector_features(captured, layouts, b, i)
        for b, s in enumerate(layouts)
        for i in range(len(s.images))
    }
    if not per_image:
        raise RuntimeError(f"{policy.describe()}: the encoder ran on {kind}s the prompt does not hold")
    width = next(iter(per_image.values())).shape[-1]
    features = rows.new_zeros(bsz, length, width)
    for (b, i), values in per_image.items():
        features[b, layouts[b].images[i].positions.to(features.device)] = values
    if first is None:
        alive = [[torch.arange(img.num_tokens, device=features.device) for img in s.images] for s in layouts]
    else:
        alive = [
            [
                torch.nonzero(adapter.raster_unit_rows(captured, layouts, b, i, [first]).to(features.device)).flatten()
                for i in range(len(s.images))
            ]
            for b, s in enumerate(layouts)
        ]
    ctx = EncoderContext(
        stage="vision",
        layer=None,
        layouts=layouts,
        hidden=features,
        alive=alive,
        seq_positions=[[img.positions.to(features.device) for img in s.images] for s in layouts],
        question_seq_positions=[s.question_positions for s in layouts],
        adapter=adapter,
        captured=captured,
        media=media,
    )
    with torch.no_grad():
        selections = policy.select(ctx)
    chosen, updates = [], []
    for b, per_image in enumerate(selections):
        for i, sel in enumerate(per_image):
            item = adapter.global_image_index(layouts, b, i, kind)
            units = alive[b][i][sel.indices.to(alive[b][i].device)]  # indices into the alive units -> the image's
            chosen.append((item, units))
            if sel.values is not None:
                updates.append((units, item, sel.values))
    keep = adapter.encoder_keep_units(grid, hidden, chosen)
    return keep, [(_flat_units(adapter, grid, hidden, item, idx), values) for idx, item, values in updates]


def _flat_units(adapter, grid, hidden: torch.Tensor, item: int, indices: torch.Tensor) -> torch.Tensor:
    """Indices of one item's units -> indices among the call's units (flattened as `encoder_keep_units` lays them)."""
    one = adapter.encoder_keep_units(grid, hidden, [(item, indices)]).flatten()
    # the units in the item's own order: the flat index of each selected unit, in the order of `indices`
    flat = torch.nonzero(one).flatten()
    return flat[torch.argsort(torch.argsort(indices.to(flat.device)))]
