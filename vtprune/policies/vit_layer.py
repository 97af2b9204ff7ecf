"""``vit_layer=k``: a vision-stage policy that selects inside the vision encoder, after its k-th block.

k counts the encoder blocks that have run (1-based, like ``prune_after``):
blocks 0 .. k-1 see every patch, the policy chooses its keep set from the
signals that exist by then (the attention and keys of blocks up to k, the
hidden states leaving block k - 1 as features), and blocks k .. of the
encoder, its merger or projector run on the kept tokens only (CLIP: plus
CLS; Qwen: whole 2x2 merge units). The runtime runs the selection inside the
tower (`vtprune.encoder`); at the vision stage the policy's keep sets are the
ones the encoder kept (`encoder_kept`). ``vit_layer=None`` (the default) is
the method's own behaviour: select after the encoder.
"""

from __future__ import annotations

import torch

from ..checks import BadValue, check_int
from ..context import StageContext
from .base import Selection


def check_vit_layer(who: str, value: object) -> int | None:
    """``vit_layer`` as given: None or an int >= 1 (BadType / BadValue otherwise)."""
    return check_int(who, "vit_layer (encoder blocks run before the selection, 1-based)", value, minimum=1, allow_none=True)


def resolve_vit_layer(who: str, adapter, k: int | None) -> None:
    """Refuse a ``vit_layer`` this model cannot prune at: an unsupported tower, or k outside 1 .. F - 1.

    F is the 1-based layer whose output is the visual feature (CLIP in
    LLaVA-1.5: the second to last; Qwen: the last block): pruning after it
    would change nothing the model reads, which the default already does.
    """
    if k is None:
        return
    if not getattr(adapter, "vit_prune", False):
        from ..patches import supported_vit_prune

        raise BadValue(
            f"{who}: vit_layer prunes inside the vision encoder, which vtprune does for "
            f"{', '.join(supported_vit_prune())}; not yet for {adapter.model_type} (leave vit_layer=None)"
        )
    last = adapter.feature_vision_layer
    if not 1 <= k < last:
        raise BadValue(
            f"{who}: vit_layer={k} is outside 1..{last - 1}: this {adapter.model_type} encoder's visual feature is "
            f"the output of layer {last}, so at least one block of 1..{last} must run before the selection and one "
            f"after it (vit_layer=None selects after the encoder)"
        )


def layer_at_most(who: str, name: str, layer: int | None, k: int | None) -> int | None:
    """A signal layer under ``vit_layer=k``: None -> k; a given layer past k is refused (it has not run yet)."""
    if k is None:
        return layer
    if layer is None:
        return k
    if layer > k:
        raise BadValue(
            f"{who}: {name}={layer} is read after the selection at vit_layer={k}; give {name} in 1..{k} or "
            f"leave it None (then layer {k})"
        )
    return layer


def encoder_kept(ctx: StageContext, who: str, before: bool = False) -> list[list[Selection]]:
    """Keep sets the vision encoder applied (``ctx.captured["pixel_keep"]``), as indices into each image's alive tokens.

    ``before``: the keep sets applied before the encoder's first block
    (PixelPrune's), which differ from the last blocks' where a ``vit_layer``
    policy pruned again inside the tower.
    """
    recorded = (before and ctx.captured.get("pixel_keep_first")) or ctx.captured.get("pixel_keep") or ()
    per_call = [keep for _grid, keep in recorded]
    if not per_call:
        raise RuntimeError(f"{who}: the vision encoder ran without it in this call (no keep sets recorded)")
    out = []
    for b in range(ctx.batch_size):
        sample = []
        for i in range(ctx.num_images(b)):
            keep = ctx.adapter.raster_unit_rows(ctx.captured, ctx.layouts, b, i, per_call)
            alive = ctx.alive[b][i]
            sample.append(Selection(torch.nonzero(keep.to(alive.device)[alive]).flatten()))
        out.append(sample)
    return out
