"""Shared mechanics of the model adapters.

An adapter knows where one model family keeps its language model, decoder
layers, projector and visual spans; it knows nothing about policies. Family
modules subclass `Adapter` and implement `find_images` (visual spans of one
sample) and, where it differs, how pre-projector features are captured.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers.masking_utils import (
    create_causal_mask,
    create_recurrent_attention_mask,
    create_sliding_window_causal_mask,
)

from ..context import LayerCall
from ..layout import ImageLayout, SampleLayout, SubGrid
from ..sequence import SequenceTensor
from .attention import HFModule, attention_rows, layer_keys, split_queries
from .family import FamilySpec

_EMPTY = torch.zeros(0, dtype=torch.long)


#: CLIP's pixel mean and std (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD), written out here: importing
#: transformers.image_utils imports torchvision wherever it is installed, which a torchvision built for another
#: torch turns into an import error of vtprune itself
CLIP_PIXEL_NORM: tuple[tuple[float, ...], tuple[float, ...]] = (
    (0.48145466, 0.4578275, 0.40821073),
    (0.26862954, 0.26130258, 0.27577711),
)


class Adapter:
    """Base adapter: the structure every supported HF vision-language model shares.

    ``model`` is the object the user wrapped (``...ForConditionalGeneration``
    or the bare ``...Model``); ``base`` is the module whose forward receives
    ``input_ids`` and the grid metadata and calls the language model.
    """

    model_type: ClassVar[str] = ""
    #: True where position ids are M-RoPE rows (Qwen); `compact` positions are
    #: then undefined (the rows are a 3-D grid, not a count)
    mrope: ClassVar[bool] = False
    #: inputs of the base forward that describe the visual content
    grid_keys: ClassVar[tuple[str, ...]] = ()
    #: text the family's chat template puts right after the user's question; with a tokenizer
    #: (``vtprune.wrap(..., tokenizer=...)``) the question stops where one of them starts
    template_markers: ClassVar[tuple[str, ...]] = ()
    #: True where the family takes videos (a video is one `ImageLayout` of kind "video", one sub-grid per frame)
    videos: ClassVar[bool] = False
    #: True where the vision encoder has a CLS token (`vision_cls_attention`)
    vision_cls: ClassVar[bool] = False
    #: True where each image has exactly one CLS token (one crop per image: `vision_cls_feature`)
    vision_cls_per_image: ClassVar[bool] = False
    #: lmms-eval's HF model wrapper that loads this family (the eval runner reads it)
    lmms_model: ClassVar[str] = ""
    #: modules that wrapper needs beyond the ``[eval]`` extra (the eval runner checks they import)
    lmms_needs: ClassVar[tuple[str, ...]] = ()
    #: the family's knowledge outside the runtime: tiny model and inputs, demo, bench, show (`FamilySpec`)
    spec: ClassVar[FamilySpec]
    #: methods of the base model that run the vision encoder (their grid arguments are recorded)
    vision_methods: ClassVar[tuple[str, ...]] = ("get_image_features",)
    #: language-model inputs beyond embeddings, mask and positions that carry sequence length (or rows of
    #: visual positions) and must be shortened by every prune, e.g. Qwen3-VL's visual-position mask and
    #: DeepStack features; the runtime shortens exactly these, so a family adds them here, not in the runtime
    sequence_tensors: ClassVar[tuple[SequenceTensor, ...]] = ()
    #: methods of the language model that its decoder loop calls with those tensors between layers, as
    #: ``{method: {argument: declared tensor name}}`` (Qwen3-VL: ``{"_deepstack_process": {"visual_pos_masks":
    #: "visual_pos_masks", "visual_embeds": "deepstack_visual_embeds"}}``); after an llm-stage prune each
    #: such argument gets the level's shortened tensor (a ``rows_of`` one: the level's rows of what was passed)
    sequence_methods: ClassVar[dict[str, dict[str, str]]] = {}
    #: True where the adapter can run its vision tower on a subset of the patches (`encode_kept`: PixelPrune)
    pixel_prune: ClassVar[bool] = False
    #: True where the adapter prunes inside its vision tower after a block (``vit_layer``, `encode_pruned_after`)
    vit_prune: ClassVar[bool] = False
    #: True where `encode_pruned_after` also takes the units kept before the encoder (PixelPrune, then ``vit_layer``)
    pixel_then_vit: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        base: HFModule = model.model if hasattr(model, "model") and hasattr(model.model, "language_model") else model
        self.base = base
        if not hasattr(self.base, "language_model"):
            raise TypeError(f"{type(model).__name__} has no language_model; is it a vision-language model?")
        self.config: HFModule = self.base.config
        self.check_config()
        eos = getattr(self.text_config, "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        # The question ends at an end-of-turn token (Qwen's <|im_end|> is its eos) or at a template marker.
        self.stop_sequences: list[list[int]] = [[e] for e in eos]

    def set_tokenizer(self, tokenizer) -> None:
        """Learn the ids of the chat template's markers, so questions exclude the assistant prefix."""
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor carries one
        if not hasattr(tokenizer, "encode"):
            raise TypeError(f"tokenizer must be a transformers tokenizer or processor; got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer  # policies that need the question as text (CDPruner's text="clip") decode with it
        for marker in self.template_markers:
            for text in (marker, " " + marker):
                ids = tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in self.stop_sequences:
                    self.stop_sequences.append(list(ids))

    # --- structure -----------------------------------------------------
    @property
    def language_model(self) -> HFModule:
        return self.base.language_model

    @property
    def decoder_layers(self) -> HFModule:
        """The language model's decoder layers (an ``nn.ModuleList``; each layer's parts are read by name)."""
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def text_config(self):
        return self.language_model.config

    def sub_blocks(self, layer: int) -> tuple[tuple[str, nn.Module], ...]:
        """The residual sub-blocks of decoder ``layer`` in order, named: its attention, then its MLP.

        Each module's input is the normed hidden state and its output is what
        the layer adds to the residual stream (HF Llama/Qwen2 decoder layers).
        """
        decoder_layer = self.decoder_layers[layer]
        return (("attention", decoder_layer.self_attn), ("mlp", decoder_layer.mlp))

    def query_module(self, layer: int) -> nn.Module:
        """The module of decoder ``layer`` whose output is its pre-RoPE queries (``q_proj``)."""
        return self.decoder_layers[layer].self_attn.q_proj

    def decoder_queries(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """`query_module` output of decoder ``layer`` ``(..., H * d)`` -> pre-RoPE queries ``(..., H, d)``."""
        return split_queries(self.decoder_layers[layer].self_attn, q)

    def attention_rows(
        self,
        layer: int,
        hidden: torch.Tensor,
        position_embeddings,
        query_index: torch.Tensor,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The probe's causal attention rows of decoder ``layer`` for one sample (`patches.attention.attention_rows`)."""
        return attention_rows(self.decoder_layers[layer], hidden, position_embeddings, query_index, key_valid)

    def layer_keys(self, layer: int, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
        """Post-RoPE keys of decoder ``layer`` for one sample, ``(L, kv_heads, head_dim)`` fp32 (`attention.layer_keys`)."""
        return layer_keys(self.decoder_layers[layer], hidden, position_embeddings)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The language model's final norm (before the LM head) applied to ``hidden``."""
        return self.language_model.norm(hidden)

    def layer_type(self, layer: int) -> str:
        """The attention kind of decoder ``layer`` (``full_attention`` or ``sliding_attention``), from the config."""
        kinds = getattr(self.text_config, "layer_types", None)
        return kinds[layer] if kinds else "full_attention"

    def attention_layers(self) -> tuple[int, ...]:
        """Decoder layers with softmax attention: queries and keys an attention probe can read.

        Every layer but linear-attention ones (``layer_type``); a hybrid model
        (Qwen3.5's Gated DeltaNet layers) has only a few.
        """
        return tuple(i for i in range(self.num_layers) if self.layer_type(i) != "linear_attention")

    def seq_length_layer(self) -> int:
        """The first decoder layer whose cache holds keys and values: the length of the kept sequence.

        Linear-attention layers hold a fixed-size state. transformers 5.24's
        ``Cache.get_seq_length()`` reads this layer when no layer is named;
        5.25's reads layer 0 whatever it is (a linear layer counts the tokens it
        saw), so the runtime reads lengths from this layer itself.
        """
        return min(self.attention_layers(), default=0)

    def layer_mask(self, layer_type: str, layer: int, mask_kwargs: dict[str, Any]) -> Any:
        """The attention mask decoder layers of ``layer_type`` get above an llm-stage prune point.

        ``mask_kwargs`` describe the level's sequence (its 2-D mask, embeddings,
        cache); ``layer`` is the first layer of that type in the level, whose
        cache sizes a causal mask (transformers sizes it from that layer's cache length). Linear-attention layers take the
        2-D padding mask itself, trimmed to the new tokens, as transformers
        builds it for them.
        """
        if layer_type == "sliding_attention":
            return create_sliding_window_causal_mask(**mask_kwargs)
        if layer_type == "linear_attention":
            return create_recurrent_attention_mask(**mask_kwargs)
        return create_causal_mask(**mask_kwargs, layer_idx=layer)

    def projector_module(self) -> nn.Module:
        """Module whose input is the pre-projector visual features."""
        raise NotImplementedError

    def check_config(self) -> None:
        """Refuse configurations the adapter cannot lay out (raise ValueError)."""

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """Position embeddings the decoder layers take, for the given position ids."""
        return self.language_model.rotary_emb(hidden, position_ids)

    # --- pruning before the encoder (PixelPrune): families with ``pixel_prune`` implement these ----
    def vision_tower(self) -> HFModule:
        """The vision encoder whose forward the runtime replaces with `encode_kept`."""
        raise NotImplementedError

    def unit_keep(self, pixel_values: torch.Tensor, grid_thw: Any, tau: float) -> torch.Tensor:
        """Which units (patches, or merge units) of one encoder call to keep, bool."""
        raise NotImplementedError

    def encode_kept(
        self, original: Any, pixel_values: torch.Tensor, grid_thw: Any, keep: torch.Tensor, kwargs: dict[str, Any]
    ) -> tuple[Any, torch.Tensor | None]:
        """Run the tower's forward ``original`` on the kept units; (its output at full length, the merger's input or None)."""
        raise NotImplementedError

    def full_vit_rows(self, values: torch.Tensor, grid_thw: Any, keep: torch.Tensor) -> torch.Tensor:
        """Per-token values of a tower call on the kept units -> one per unit of the call, zero where dropped."""
        raise NotImplementedError

    def raster_unit_rows(
        self, captured: dict[str, Any], layouts: list[SampleLayout], b: int, i: int, per_call: list[torch.Tensor]
    ) -> torch.Tensor:
        """Values per unit of every encoder call, in the processor's (raster) order -> image ``i`` of sample ``b``'s."""
        raise NotImplementedError

    # --- pruning inside the encoder (vit_layer; families with `vit_prune` implement these) ---------------
    def encoder_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states between two ViT blocks -> the projector input's rows (one per patch / unit)."""
        raise NotImplementedError

    def encoder_keep_units(self, grid_thw: Any, hidden: torch.Tensor, chosen: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """``(image, indices)`` pairs of one tower call -> the bool keep mask the tower applies."""
        raise NotImplementedError

    def encode_pruned_after(
        self,
        original: Any,
        pixel_values: torch.Tensor,
        grid_thw: Any,
        kwargs: dict[str, Any],
        at: int,
        choose: Any,
        first: torch.Tensor | None = None,
    ) -> tuple[Any, torch.Tensor | None]:
        """Run the tower, choosing the kept tokens after block ``at - 1`` and running the blocks after on them only.

        ``first`` (adapters with ``pixel_then_vit``): the units kept before
        the encoder (`unit_keep`'s layout); the blocks before ``at`` run on
        those, and ``choose`` keeps a subset of them.
        """
        raise NotImplementedError

    # --- layouts -------------------------------------------------------
    def layouts(self, captured: dict[str, Any], inputs_embeds: torch.Tensor) -> list[SampleLayout] | None:
        """Visual layout of every sample, or None when the batch holds no visual tokens."""
        input_ids = captured.get("input_ids")
        if input_ids is None:
            return None
        device = inputs_embeds.device
        bsz, seq_len = input_ids.shape
        mask = captured.get("attention_mask")
        valid = mask.bool() if mask is not None and mask.dim() == 2 else torch.ones(bsz, seq_len, dtype=torch.bool)
        valid = valid.to(device)
        counter = {"image": 0, "video": 0}
        layouts = []
        any_visual = False
        for b in range(bsz):
            images = self.find_images(captured, input_ids[b], counter)
            images = [
                ImageLayout(
                    index=i,
                    positions=img.positions.to(device),
                    grids=img.grids,
                    newline_positions=img.newline_positions.to(device),
                    kind=img.kind,
                )
                for i, img in enumerate(images)
            ]
            any_visual = any_visual or bool(images)
            question = self.question_positions(input_ids[b], images, valid[b])
            layouts.append(SampleLayout(images=images, question_positions=question, valid=valid[b]))
        return layouts if any_visual else None

    def find_images(self, captured: dict[str, Any], ids: torch.Tensor, counter: dict[str, int]) -> list[ImageLayout]:
        """Images of one sample in order of appearance; `counter` tracks the batch-global image index."""
        raise NotImplementedError

    def visual_token_mask(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def question_positions(self, ids: torch.Tensor, images: list[ImageLayout], valid: torch.Tensor) -> torch.Tensor:
        """The user's question: text after the last visual token, up to the chat template's end of turn.

        The chat prefix and system prompt come before the image; the end of
        turn is an eos token or (with a tokenizer) a template marker such as
        LLaVA's ``ASSISTANT:``. Vision start/end tokens are not question text.
        """
        device = valid.device
        positions = torch.arange(ids.numel(), device=device)
        text = valid & ~self.visual_token_mask(ids).to(device) & ~self.structure_token_mask(ids).to(device)
        if images:
            text &= positions >= max(img.span[1] for img in images)
        found = positions[text]
        if found.numel():
            end = self._first_stop(ids.tolist(), int(found[0]))
            found = found[found < end]
        return found

    def _first_stop(self, ids: list[int], start: int) -> int:
        for pos in range(start, len(ids)):
            for seq in self.stop_sequences:
                if ids[pos : pos + len(seq)] == seq:
                    return pos
        return len(ids)

    def structure_token_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokens that frame visual content (Qwen's vision start/end); never question text."""
        return torch.zeros_like(ids, dtype=torch.bool)

    @staticmethod
    def split_runs(positions: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """Cut the sorted positions of visual tokens into consecutive chunks of the given sizes."""
        total = sum(sizes)
        if positions.numel() != total:
            raise ValueError(
                f"the sample holds {positions.numel()} visual placeholder tokens but its images need {total}; "
                "inputs and image metadata do not match"
            )
        return list(torch.split(positions, sizes))

    # --- features ------------------------------------------------------
    def pre_projector_features(self, captured: dict[str, Any], layouts: list[SampleLayout], b: int, i: int) -> torch.Tensor:
        """Pre-projector features of image i of sample b, one row per patch token, span order."""
        raise NotImplementedError

    def global_image_index(
        self, layouts: list[SampleLayout], b: int, i: int, kind: str = "image", captured: dict | None = None
    ) -> int:
        """Index of image i of sample b among the images the vision encoder saw (in encoding order).

        When generate() expanded the batch after encoding (beam search,
        ``num_return_sequences``), ``captured["image_source"]`` maps the
        expanded order back to the encoded one.
        """
        before = sum(1 for s in layouts[:b] for img in s.images if img.kind == kind)
        g = before + sum(1 for img in layouts[b].images[:i] if img.kind == kind)
        source = (captured or {}).get("image_source")
        return source[kind][g] if source else g

    @staticmethod
    def encoded(captured: dict[str, Any], key: str):
        """Grid metadata as the vision encoder saw it (before any generate() batch expansion)."""
        return captured.get("encoded", {}).get(key, captured.get(key))

    def expand_metadata(self, captured: dict[str, Any], input_ids: torch.Tensor, expand: int) -> dict[str, Any]:
        """Grid metadata for a batch that generate() repeated `expand` times per sample after encoding."""
        counter = {"image": 0, "video": 0}
        source: dict[str, list[int]] = {"image": [], "video": []}
        for row in input_ids:
            start = dict(counter)
            self.find_images(captured, row, counter)
            for _ in range(expand):
                for kind in source:
                    source[kind].extend(range(start[kind], counter[kind]))
        out: dict[str, Any] = {"image_source": source, "encoded": {}}
        for key in self.grid_keys:
            if captured.get(key) is not None:
                out["encoded"][key] = captured[key]
                out[key] = self.expand_grid_value(key, captured[key], source, expand)
        return out

    def expand_grid_value(self, key: str, value, source: dict[str, list[int]], expand: int):
        """Grid metadata `key` of the encoded batch -> the expanded batch's (`expand_metadata`).

        By default `value` holds one row per encoded image (or video, for
        ``video*`` keys), gathered in the expanded order ``source``; a family
        whose metadata is per sample (LLaVA-OneVision's ``batch_num_images``)
        overrides this.
        """
        kind = "video" if key.startswith("video") else "image"
        return value[torch.as_tensor(source[kind], dtype=torch.long)]

    def vision_layers(self) -> HFModule:
        """The vision encoder's transformer layers."""
        raise NotImplementedError(f"{self.model_type}: the vision-layer probe is not available for this family yet")

    @property
    def feature_vision_layer(self) -> int:
        """1-based number of the vision-encoder layer whose output becomes the visual features."""
        return len(self.vision_layers())

    def vision_attention_received(self, layer: int, call: LayerCall) -> torch.Tensor:
        """Attention each token of one captured call of vision ``layer`` (0-based) receives, per ViT token."""
        raise NotImplementedError(f"{self.model_type}: the vision-layer probe is not available for this family yet")

    def vision_frame_query_attention(self, layer: int, call: LayerCall) -> torch.Tensor:
        """FastVID's Qwen frame saliency in one captured call of vision ``layer``: each frame's mean query against
        its merge units' mean keys, per ViT token (its unit's value)."""
        raise NotImplementedError(f"{self.model_type}: the frame-query probe exists for the Qwen vision towers only")

    def vision_cls_attention(self, layer: int, call: LayerCall) -> torch.Tensor:
        """Attention the CLS token pays each token in one captured call of vision ``layer``, summed over heads."""
        raise NotImplementedError(f"{self.model_type}: its vision encoder has no CLS token")

    def vision_cls_feature(
        self, captured: dict[str, Any], layouts: list[SampleLayout], b: int, i: int, calls: list[LayerCall]
    ) -> torch.Tensor:
        """The CLS row of image i's hidden states in the captured calls of one vision layer, ``(D',)``."""
        raise NotImplementedError(f"{self.model_type}: its vision encoder has no CLS token per image")

    def vision_keys(self, layer: int, call: LayerCall) -> torch.Tensor:
        """Keys of one captured call of vision ``layer`` as the layer computes them, mean over heads, per ViT token."""
        raise NotImplementedError(f"{self.model_type}: the vision-layer probe is not available for this family yet")

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The projector applied to rows shaped as `pre_projector_features` gives them -> post-projector rows.

        Calls ``forward`` directly: module hooks (vtprune's own capture of the
        projector's input among them) must not see a policy's side computation.
        """
        return self.projector_module().forward(features)

    def vision_token_values(
        self, captured: dict[str, Any], layouts: list[SampleLayout], b: int, i: int, per_call: list[torch.Tensor]
    ) -> torch.Tensor:
        """Per-ViT-token values of every encoder call (``(..., T)`` or ``(..., T, d)``) -> one row per patch token of image i.

        ``per_call`` holds one tensor per captured vision-encoder call, in call
        order, shaped as the layer saw its tokens; the result follows image i's
        patch tokens in span order (CLS dropped, crops packed, Qwen merge units
        averaged and restored to raster order).
        """
        raise NotImplementedError(f"{self.model_type}: the vision-layer probe is not available for this family yet")

    # --- decode ----------------------------------------------------------
    def decode_positions_from_cache(self, outer: dict[str, Any]) -> bool:
        """True when HF derives this decode step's positions from the cache length.

        The cache holds the pruned length, so those positions need the removed
        count added back (``positions="original"``).
        """
        return outer.get("position_ids") is None


def single_grid_image(index: int, positions: torch.Tensor, height: int, width: int, frames: int = 1, kind: str = "image"):
    """An ImageLayout with one sub-grid per frame and no newline tokens."""
    grids = [SubGrid(f * height * width, height, width) for f in range(frames)]
    return ImageLayout(index=index, positions=positions, grids=grids, newline_positions=_EMPTY, kind=kind)
