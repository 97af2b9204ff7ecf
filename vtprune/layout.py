"""Where the visual tokens of each sample sit in the sequence.

An adapter (``vtprune.patches``) builds these from ``input_ids`` and the grid
metadata of the batch (``image_sizes``, ``image_grid_thw``); policies read them
and never look at model-specific structures. Positions are never hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SubGrid:
    """A rectangular block of patch tokens inside one image, in raster order.

    LLaVA-NeXT has two (the base view and the unpadded high-resolution view),
    a Qwen video has one per temporal frame, everything else has one.
    ``offset`` counts patch tokens (newlines skipped) from the image's start.
    """

    offset: int
    height: int
    width: int

    @property
    def size(self) -> int:
        return self.height * self.width


@dataclass
class ImageLayout:
    """One image (or video) inside one sample.

    ``positions`` are the absolute sequence positions of the image's patch
    tokens in span order (which is raster order within each sub-grid);
    ``newline_positions`` are structure tokens (LLaVA-NeXT row ends) that are
    always kept and never counted in a budget.
    """

    index: int
    positions: torch.Tensor
    grids: list[SubGrid]
    newline_positions: torch.Tensor
    kind: str = "image"

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())

    @property
    def grid(self) -> tuple[int, int]:
        """(height, width) of the first sub-grid, the image's main token grid."""
        return self.grids[0].height, self.grids[0].width

    @property
    def span(self) -> tuple[int, int]:
        """First and one-past-last sequence position of the image, newlines included."""
        ends = [self.positions]
        if self.newline_positions.numel():
            ends.append(self.newline_positions)
        allpos = torch.cat(ends)
        return int(allpos.min()), int(allpos.max()) + 1


@dataclass
class SampleLayout:
    """All visual content of one sample, plus where its prompt text is.

    ``question_positions``: the user's question tokens (no chat template, no
    system prompt), for text-conditioned policies such as MMTok.
    ``valid``: non-padding positions of the sequence.
    """

    images: list[ImageLayout]
    question_positions: torch.Tensor
    valid: torch.Tensor

    @property
    def visual_positions(self) -> torch.Tensor:
        if not self.images:
            return self.valid.new_zeros(0, dtype=torch.long)
        return torch.cat([img.positions for img in self.images])
