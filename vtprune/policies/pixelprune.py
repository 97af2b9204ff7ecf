"""PixelPrune: drop merge units a 2-D predictor reproduces from their neighbours, before the vision encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import check_number
from ..context import StageContext
from .base import Policy, Selection, Signals, register
from .vit_layer import encoder_kept


@register
@dataclass(frozen=True)
class PixelPrune(Policy):
    """Drop the merge units that equal their 2-D prediction, before the vision encoder runs.

    Source: PixelPrune (OPPO, 2026; code OPPO-Mente-Lab/PixelPrune,
    ``pixelprune/methods/pred_2d.py``). Per image (every temporal frame of a
    video is its own grid) the merge units are scanned in raster order and
    a unit is dropped when it matches its LOCO-I prediction from the units
    left, above and above-left (`vtprune.ops.pixel.pred2d_keep`): max
    absolute pixel difference, in [0, 1], at most ``tau``. ``tau=0`` (the
    default) drops exact duplicates only. The vision tower then encodes the
    kept units only (their patches, rotary positions and absolute position
    embeddings gathered, each image's attention segment rebuilt), and the
    language model sees the kept tokens at their original positions.

    It reads whole images and acts before every other policy, so it must
    come first in a Pipeline; the budget of every later policy counts from
    the image's unpruned token count as usual. A later policy with
    ``vit_layer=k`` then selects inside the tower among the kept units, so
    the blocks after k run on fewer still. Supported where the adapter can
    run its tower on a subset (``Adapter.pixel_prune``). A later policy that
    reads the encoder's layers (HiPrune, VisionZip, IDPruner's received
    attention) reads them as the encoder ran: over the kept units. Of the
    policies that read each image's whole grid, those with
    ``after_pixelprune`` (HiPrune, VisionZip, SCOPE, VisPruner, PruneSID,
    Pooling) may follow it, after the encoder or (the first four) with
    ``vit_layer=k``.

    Parameters:
        tau: the largest pixel difference still counted as a match (>= 0; 0: exact).
    """

    keep: int | float = 1.0
    tau: float = 0.0

    name: ClassVar[str] = "pixelprune"
    paper: ClassVar[str] = "PixelPrune (OPPO, 2026), code OPPO-Mente-Lab/PixelPrune"
    stage: ClassVar[str] = "vision"
    whole_grid: ClassVar[bool] = True
    before_encoder: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep != 1.0:
            raise ValueError(f"pixelprune keeps what its predictor cannot reproduce; it takes no keep (got {self.keep})")
        self._set("tau", check_number(self.name, "tau", self.tau, 0.0, 1.0))

    def resolve(self, adapter) -> Policy:
        if not adapter.pixel_prune:
            from ..patches import supported_pixel_prune

            raise ValueError(
                f"pixelprune cannot run the vision tower of {adapter.model_type} on a subset of its patches yet; "
                f"supported: {', '.join(supported_pixel_prune())}"
            )
        return self

    def signals(self) -> Signals:
        return Signals(encoder_prune=(0,))  # the tower runs on `encoder_keep`'s units only

    def encoder_keep(self, adapter, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None) -> torch.Tensor:
        """Bool per merge unit of one encoder call: the units the tower encodes."""
        return adapter.unit_keep(pixel_values, grid_thw, self.tau)

    def select(self, ctx: StageContext) -> list[list[Selection]]:
        return encoder_kept(ctx, self.name, before=True)  # the units the tower encoded, as `vit_layer` policies read theirs

    def describe(self) -> str:
        return f"pixelprune(tau={self.tau:g})"
