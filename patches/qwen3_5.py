"""Qwen3.5 (`qwen3_5`): Qwen2-VL's visual layout on a hybrid decoder of linear and full attention.

The vision side is Qwen2-VL's: packed ViT blocks with ``cu_seqlens`` and a
2-D RoPE (full attention within each image or frame, no windows), a 2x2
merger that normalises each patch before merging, M-RoPE positions. A video
frame sits in its own vision start/end pair after a timestamp; the
timestamps are text, never pruned.

The decoder interleaves Gated DeltaNet layers (linear attention: a
convolution state and a recurrent state of fixed size per layer) with full
attention layers (``config.layer_types``). What that means for pruning:

- Pruning before either kind is the same sequence operation; a linear layer
  takes the 2-D padding mask (transformers' ``create_recurrent_attention_mask``,
  which zeroes padding before the convolution and the recurrence), built by
  `Adapter.layer_mask` from the level's re-padded mask.
- Only the full-attention layers hold keys and values; their caches shrink
  to text plus kept tokens. The recurrent and convolution states have the
  same size whatever is kept. The runtime reads the kept length from the
  first full-attention layer (`Adapter.seq_length_layer`); since transformers
  5.25 linear layers count their own tokens and ``Cache.get_seq_length()``
  reads layer 0, so after a prefill the linear layers below the first
  full-attention layer are set to report its (kept) length.
- Attention probes (FastV, TransPrune's IGA, EntropyPrune's queries) read
  only full-attention layers (`Adapter.attention_layers`); `wrap` refuses
  the others by name. The full-attention layers are gated (``q_proj`` gives
  queries and an output gate per head) with partial RoPE; the probe handles both.
- TransPrune's TTV observes each layer's token mixer, the Gated DeltaNet on
  linear layers: TTV compares a sub-block's input and output and reads no
  attention weights, so it is defined the same way there.
"""

from __future__ import annotations

from torch import nn

from .family import Geometry, text_kwargs
from .qwen2_vl import Qwen2VLAdapter, Qwen2VLSpec


class Qwen3_5Spec(Qwen2VLSpec):
    """The tiny Qwen3.5 model: Gated DeltaNet (linear attention) layers with full attention at every odd layer.

    One layer more than the other families (5 by default: linear, full,
    linear, full, linear): three linear layers, two full-attention ones, and
    layer 3 full as in the real 3:1 pattern (full attention at 3, 7, 11, ...),
    so the zoo's FastV / EntropyPrune default (K-1 = 3) fits. Gated
    attention with partial RoPE (a quarter of the head dim, as the real
    models) and interleaved M-RoPE sections over the rotated dims. Video
    frames carry a one-token timestamp in the tiny inputs.
    """

    hf_class = "Qwen3_5ForConditionalGeneration"
    timestamp_tokens = 1
    drawn = False
    video_demo = False  # a Qwen3-VL-style video (timestamps per frame): no demo video yet

    def tiny_config(self, g: Geometry):
        from transformers import Qwen3_5Config

        _, _, ids = self.parts(g)
        layers = g.layers + 1
        head_dim = 2 * g.hidden // g.heads
        text = dict(
            text_kwargs(g),
            num_hidden_layers=layers,
            head_dim=head_dim,
            layer_types=["full_attention" if i % 2 else "linear_attention" for i in range(layers)],
            linear_conv_kernel_dim=4,
            linear_key_head_dim=g.hidden // g.heads,
            linear_value_head_dim=g.hidden // g.heads,
            linear_num_key_heads=g.kv_heads,
            linear_num_value_heads=g.heads,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.25,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
            },
        )
        side = 2 * g.image_size // g.patch  # the learned position table is resampled to each grid
        vision = dict(
            depth=g.vision_layers,
            hidden_size=g.vision_hidden,
            intermediate_size=2 * g.vision_hidden,
            num_heads=2,
            patch_size=g.patch,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=g.hidden,
            num_position_embeddings=side * side,
        )
        return Qwen3_5Config(text_config=text, vision_config=vision, **ids)


class Qwen3_5Adapter(Qwen2VLAdapter):
    model_type = "qwen3_5"
    lmms_model = "qwen3_5"
    spec = Qwen3_5Spec()
    pixel_norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # its image processor's (Qwen3-VL's) mean and std

    def check_config(self) -> None:
        if not getattr(self.text_config, "layer_types", None):
            raise ValueError("qwen3_5: the text config has no layer_types (which layers are linear attention)")

    def token_mixer(self, layer: int) -> nn.Module:
        """Decoder ``layer``'s attention: Gated DeltaNet (``linear_attn``) or softmax attention (``self_attn``)."""
        decoder_layer = self.decoder_layers[layer]
        return decoder_layer.linear_attn if self.layer_type(layer) == "linear_attention" else decoder_layer.self_attn

    def sub_blocks(self, layer: int) -> tuple[tuple[str, nn.Module], ...]:
        return (("attention", self.token_mixer(layer)), ("mlp", self.decoder_layers[layer].mlp))

    def query_module(self, layer: int) -> nn.Module:
        if layer not in self.attention_layers():
            raise ValueError(
                f"qwen3_5: decoder layer {layer} is linear attention (Gated DeltaNet) and has no softmax queries; "
                f"the full-attention layers are {list(self.attention_layers())}"
            )
        return super().query_module(layer)
