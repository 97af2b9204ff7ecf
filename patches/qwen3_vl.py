"""Qwen3-VL (`qwen3_vl`, and its MoE variant `qwen3_vl_moe`): Qwen2-VL's layout plus DeepStack.

The ViT attends over all patches of each image or frame (no windows; one
``cu_seqlens`` segment each), adds a learned absolute position table
interpolated to every grid, and merges 2x2 patches; merge units stay in
raster order, as on Qwen2-VL. DeepStack: extra mergers tap ViT blocks
(``deepstack_visual_indexes``, 8/16/24 of 27 in the released models) and
the language model adds their outputs to the hidden states at the visual
positions after decoder layers 0, 1, 2 (``visual_pos_masks`` and one
``deepstack_visual_embeds`` tensor per tap, rows in row-major order of the
mask).

So every keep set applies to those tensors too:
- at the vision/projector stages they are declared sequence tensors, and
  `Sequence.compact` shortens ``visual_pos_masks`` and gathers the kept
  rows of every DeepStack tensor;
- an llm-stage prune inside the DeepStack range (``at_layer`` 1 or 2)
  happens inside the decoder loop, whose locals still hold the longer
  tensors: the language model's ``_deepstack_process`` is bound per
  instance to add the remaining taps to the kept rows only (the current
  level's shortened mask and rows).

Video prompts carry a timestamp (text) before every temporal frame, each
frame in its own vision span: one video is one `ImageLayout` whose patch
positions skip the timestamps, which are text and never pruned.
``mm_token_type_ids`` is required (the model raises without it). Positions
are M-RoPE rows (a text row plus t/h/w in ``generate``), so only
``positions="original"`` is defined.
"""

from __future__ import annotations

from typing import Any

import torch

from ..sequence import PrefillState, SequenceTensor
from .qwen2_vl import Qwen2VLAdapter

MASK = "visual_pos_masks"
DEEPSTACK = "deepstack_visual_embeds"


class Qwen3VLAdapter(Qwen2VLAdapter):
    model_type = "qwen3_vl"
    lmms_model = "qwen3_vl"  # lmms-eval's wrapper loads the dense and the MoE checkpoints alike
    sequence_tensors = (SequenceTensor(MASK), SequenceTensor(DEEPSTACK, dim=0, rows_of=MASK))

    def language_model_methods(self) -> dict[str, Any]:
        return {"_deepstack_process": deepstack_on_kept_rows}


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE: the same vision tower, DeepStack and decoder loop; sparse MLPs (per token, so prune-safe)."""

    model_type = "qwen3_vl_moe"


def deepstack_on_kept_rows(original, state: PrefillState | None, hidden: torch.Tensor, visual_pos_masks: torch.Tensor,
                           visual_embeds: torch.Tensor) -> torch.Tensor:
    """``_deepstack_process`` after an llm-stage prune: add the tap to the kept visual rows only.

    The decoder loop passes the mask and the tap's rows as the language model
    received them (level 0); once a prune point shortened the sequence, the
    current level's declared tensors (shortened by the same `compact` as the
    hidden states) replace them. Which tap this is follows from the loop's
    argument: the same tensor object the language model got at level 0.
    """
    if state is None or len(state.levels) == 1:
        return original(hidden, visual_pos_masks, visual_embeds)
    first, current = state.levels[0].extras, state.levels[-1].extras
    for tap, rows in enumerate(first.get(DEEPSTACK) or ()):
        if rows is visual_embeds:
            mask = current[MASK]
            if mask.shape[1] != hidden.shape[1]:
                raise RuntimeError(
                    f"qwen3_vl: the current level's visual-position mask has {mask.shape[1]} positions but the hidden "
                    f"states {hidden.shape[1]}"
                )
            return original(hidden, mask, current[DEEPSTACK][tap])
    raise RuntimeError("qwen3_vl: DeepStack features the pruned prefill did not hand to the language model")
