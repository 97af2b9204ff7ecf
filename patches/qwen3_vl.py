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
from .family import Geometry
from .qwen2_vl import Qwen2VLAdapter, Qwen2VLSpec

MASK = "visual_pos_masks"
DEEPSTACK = "deepstack_visual_embeds"


class Qwen3VLSpec(Qwen2VLSpec):
    """The tiny Qwen3-VL model: q/k norms per head, interleaved M-RoPE, a learned ViT position table and three
    DeepStack taps.

    The real models tap ViT blocks 8/16/24 of 27 and add the taps after decoder
    layers 0-2; the tiny ViT taps its first three blocks (at least three
    blocks), so ``at_layer`` 1 and 2 prune inside the DeepStack range here too.
    Video frames carry a three-token timestamp in the tiny inputs.
    """

    hf_class = "Qwen3VLForConditionalGeneration"
    timestamp_tokens = 3
    drawn = False
    video_demo = False  # its videos carry timestamp text per frame: no demo video yet

    def tiny_config(self, g: Geometry):
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig(**self.deepstack_parts(g))

    def deepstack_parts(self, g: Geometry) -> dict:
        """The config keywords of the dense and the MoE model."""
        text, vision, ids = self.parts(g)
        head_dim = g.hidden // g.heads
        half = head_dim // 2  # interleaved sections (as 24/20/20 of 64): h at 1::3, w at 2::3, t on the rest
        hw = half // 3
        text.update(
            head_dim=head_dim,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [half - 2 * hw, hw, hw],
                "mrope_interleaved": True,
            },
        )
        depth = max(g.vision_layers, 3)
        side = max(g.image_size // g.patch, 2)
        vision.update(depth=depth, deepstack_visual_indexes=[0, 1, 2], num_position_embeddings=side * side)
        for key in ("embed_dim", "in_chans"):
            vision.pop(key)
        return dict(text_config=text, vision_config=vision, **ids)


class Qwen3VLMoeSpec(Qwen3VLSpec):
    """The tiny Qwen3-VL-MoE model: Qwen3-VL's with 4 experts, 2 per token, in every decoder layer."""

    hf_class = "Qwen3VLMoeForConditionalGeneration"

    def tiny_config(self, g: Geometry):
        from transformers import Qwen3VLMoeConfig

        kwargs = self.deepstack_parts(g)
        kwargs["text_config"].update(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=g.intermediate // 2, decoder_sparse_step=1
        )
        return Qwen3VLMoeConfig(**kwargs)


class Qwen3VLAdapter(Qwen2VLAdapter):
    model_type = "qwen3_vl"
    spec = Qwen3VLSpec()
    lmms_model = "qwen3_vl"  # lmms-eval's wrapper loads the dense and the MoE checkpoints alike
    pixel_norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # its image processor's mean and std
    sequence_tensors = (SequenceTensor(MASK), SequenceTensor(DEEPSTACK, dim=0, rows_of=MASK))
    # Qwen3VLTextModel._deepstack_process(hidden_states, visual_pos_masks, visual_embeds) after layers 0-2
    sequence_methods = {"_deepstack_process": {"visual_pos_masks": MASK, "visual_embeds": DEEPSTACK}}


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE: the same vision tower, DeepStack and decoder loop; sparse MLPs (per token, so prune-safe)."""

    model_type = "qwen3_vl_moe"
    spec = Qwen3VLMoeSpec()
