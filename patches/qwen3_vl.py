"""Qwen3-VL (`qwen3_vl`, and its MoE variant `qwen3_vl_moe`): Qwen2-VL's layout plus DeepStack.

The ViT attends over all patches of each image or frame (no windows; one
``cu_seqlens`` segment each), adds a learned absolute position table
interpolated to every grid, and merges 2x2 patches; merge units stay in
raster order, as on Qwen2-VL, so the ViT probe and the pre-projector rows
are Qwen2-VL's. DeepStack: extra mergers tap ViT blocks
(``deepstack_visual_indexes``, 8/16/24 of 27 in the released models) and
the language model adds their outputs to the hidden states at the visual
positions after decoder layers 0, 1, 2 (``visual_pos_masks`` and one
``deepstack_visual_embeds`` tensor per tap, rows in row-major order of the
mask).

So every keep set applies to those tensors too, through declarations only:
- both are declared sequence tensors, so `Sequence.compact` shortens
  ``visual_pos_masks`` and gathers the kept rows of every tap at the
  vision/projector stages and at every llm-stage prune point;
- an llm-stage prune inside the DeepStack range (``at_layer`` 1 or 2)
  happens inside the decoder loop, whose locals still hold level 0's
  tensors: ``_deepstack_process`` is declared a sequence method, so the
  runtime hands it the current level's mask and rows, and the remaining
  taps go to the kept rows only.

Video prompts carry a timestamp (text) before every temporal frame, each
frame in its own vision span: one video is one `ImageLayout` whose patch
positions skip the timestamps, which are text and never pruned.
``mm_token_type_ids`` is required (the model raises without it). Positions
are M-RoPE rows (a text row plus t/h/w in ``generate``), so only
``positions="original"`` is defined.
"""

from __future__ import annotations

from ..sequence import SequenceTensor
from .qwen2_vl import Qwen2VLAdapter

MASK = "visual_pos_masks"
DEEPSTACK = "deepstack_visual_embeds"


class Qwen3VLAdapter(Qwen2VLAdapter):
    model_type = "qwen3_vl"
    lmms_model = "qwen3_vl"  # lmms-eval's wrapper loads the dense and the MoE checkpoints alike
    sequence_tensors = (SequenceTensor(MASK), SequenceTensor(DEEPSTACK, dim=0, rows_of=MASK))
    # Qwen3VLTextModel._deepstack_process(hidden_states, visual_pos_masks, visual_embeds) after layers 0-2
    sequence_methods = {"_deepstack_process": {"visual_pos_masks": MASK, "visual_embeds": DEEPSTACK}}


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE: the same vision tower, DeepStack and decoder loop; sparse MLPs (per token, so prune-safe)."""

    model_type = "qwen3_vl_moe"
