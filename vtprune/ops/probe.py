"""Probes into a decoder layer's attention inputs, computed on the side.

The model's own attention keeps running under SDPA or FlashAttention-2 and
never has to return weights; a policy that needs a layer's queries gets
them here from the layer's input hidden states.
"""

from __future__ import annotations

import torch
from torch import nn


def _head_dim(attn: nn.Module, width: int) -> int:
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None:
        config = attn.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if width % head_dim:
        raise ValueError(f"q_proj gives {width} features, not a multiple of head_dim={head_dim}")
    return head_dim


@torch.no_grad()
def layer_queries(decoder_layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE query vectors ``(..., heads, head_dim)`` of `decoder_layer` for `hidden` ``(..., D)``.

    Runs the layer's ``input_layernorm`` and ``self_attn.q_proj`` (and the
    attention's ``q_norm`` where it has one, as Qwen3 does: per head when its
    weight has ``head_dim`` entries, over the whole projection otherwise),
    in the model's dtype, exactly as the layer's own forward does before
    RoPE. Works for the HF Llama, Qwen2, Qwen2-VL, Qwen2.5-VL and Qwen3
    decoder layers.
    """
    attn = decoder_layer.self_attn
    return split_queries(attn, attn.q_proj(decoder_layer.input_layernorm(hidden)))


def split_queries(attn: nn.Module, q: torch.Tensor) -> torch.Tensor:
    """``q_proj`` output ``(..., heads * head_dim)`` -> pre-RoPE queries ``(..., heads, head_dim)`` (q_norm applied)."""
    head_dim = _head_dim(attn, q.shape[-1])
    q_norm = getattr(attn, "q_norm", None)
    per_head = q_norm is not None and getattr(q_norm, "weight", None) is not None and q_norm.weight.numel() == head_dim
    if q_norm is not None and not per_head:
        q = q_norm(q)
    q = q.view(*q.shape[:-1], q.shape[-1] // head_dim, head_dim)
    if per_head:
        q = q_norm(q)
    return q
