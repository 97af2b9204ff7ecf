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

from .qwen2_vl import Qwen2VLAdapter


class Qwen3_5Adapter(Qwen2VLAdapter):
    model_type = "qwen3_5"
    lmms_model = "qwen3_5"

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
