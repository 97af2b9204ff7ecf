"""What one call of a wrapped model captures: a typed record per call, never state on shared objects.

A call is one ``generate`` (all its forwards, the encoder calls generate
makes before the first one, the selections its prefills reuse) or, outside
``generate``, one forward of the model. The runtime keeps the open record
per thread, so two threads on one wrapped model never mix their calls, and
encoder calls made outside any call (a user or a data pipeline calling
``get_image_features`` directly) are not recorded at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .context import LayerCall
from .policies.base import Selection
from .reporting import Report
from .sequence import PrefillState


@dataclass
class VisionCapture:
    """What the vision encoder saw since the last prefill consumed it.

    ``generate`` may encode images before its first forward and hand the
    result over as ``mm_encoder_outputs`` (without ``pixel_values``), so
    the capture lasts until the next encoder call after a prefill used it.
    """

    calls: list[dict[str, Any]] = field(default_factory=list)
    pre_projector: list[torch.Tensor] = field(default_factory=list)
    layers: dict[int, list[LayerCall]] = field(default_factory=dict)
    #: per vision-tower call, (its grid, the units the tower's last blocks and merger encoded: the encoder-side
    #: policy's keep set, PixelPrune's or a ``vit_layer`` policy's)
    pixel_keep: list[tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=list)
    #: per vision-tower call, where PixelPrune ran before a ``vit_layer`` policy: (its grid, the units PixelPrune
    #: kept, which blocks 0 .. keep_layer - 1 encoded); empty otherwise
    first_keep: list[tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=list)
    #: milliseconds the encoder-side policies spent choosing inside the tower calls: "before" (PixelPrune's
    #: predictor), "inside" (a ``vit_layer`` policy's selection); the report adds them to those policies' ``ms``
    encoder_ms: dict[str, float] = field(default_factory=dict)
    #: the first ViT layer that ran on the kept units only (0: PixelPrune's, before the encoder; k: ``vit_layer=k``)
    keep_layer: int = 0
    #: (expand_size, input_ids) when generate() repeated each sample after encoding
    expand: tuple[int, torch.Tensor] | None = None
    used: bool = False


@dataclass
class CallRecord:
    """One call of the wrapped model (see the module docstring)."""

    scope: str  # "generate" or "forward"
    vision: VisionCapture = field(default_factory=VisionCapture)
    #: the base forward's inputs, while a forward runs (None between forwards)
    outer: dict[str, Any] | None = None
    forward_depth: int = 0
    #: generate's own inputs (input_ids, grids), for what runs before its first forward (the media encoded ahead)
    generate_inputs: dict[str, Any] | None = None
    #: the prefill or decode state of the forward running now
    state: PrefillState | None = None
    #: the base inputs completed with the encoder's grid arguments, for this prefill
    captured: dict[str, Any] = field(default_factory=dict)
    #: (index in the pipeline, layer) -> selections of the call's first prefill, reused by later ones
    #: (generate(use_cache=False) recomputes the prompt every step: it must not re-select)
    selections: dict[tuple[int, int | None], list[list[Selection]]] = field(default_factory=dict)
    prefills: int = 0
    #: the last wrapped decoder layer that ran in this forward (which level the decoder loop is at)
    current_layer: int = 0
    #: True while the running forward's language model runs a prefill (hooks capture only then)
    in_prefill: bool = False
    #: the call's report (its first prefill's) and the one the running prefill writes
    report: Report | None = None
    prefill_report: Report | None = None
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_q: dict[int, torch.Tensor] = field(default_factory=dict)
    #: per policy (its index in the pipeline): ``(layer, part) -> (B, L)`` sub-block statistics
    sub_block_stats: dict[int, dict[tuple[int, str], torch.Tensor]] = field(default_factory=dict)
    #: what a progressive policy computes at its first prune point and reads at the later ones of this prefill
    prefill_memo: dict[Any, Any] = field(default_factory=dict)

    def fresh_vision(self) -> VisionCapture:
        """The capture to record an encoder call into: a new one once a prefill consumed the last."""
        if self.vision.used:
            self.vision = VisionCapture()
        return self.vision

    def end_prefill(self) -> None:
        """Drop what only the prefill needed (captured layer inputs, queries, statistics)."""
        self.layer_inputs.clear()
        self.layer_q.clear()
        self.sub_block_stats.clear()
        self.prefill_memo.clear()
