"""Where each family's attention keeps its norms and projections: queries and keys exactly as the layer computes them.

The probe's math (`vtprune.ops.probe`) only sees tensors; these functions
read a layer's modules for it, one set per kind of attention:

- decoder layers of the HF Llama / Qwen2 / Qwen2-VL / Qwen2.5-VL / Qwen3
  language models (``input_layernorm``, ``self_attn.q_proj``/``k_proj`` and
  the ``q_norm``/``k_norm`` where present), and Qwen3.5's gated
  full-attention layers (queries and output gate interleaved in ``q_proj``);
- CLIP ViT layers (LLaVA: ``layer_norm1``, ``self_attn.q_proj``/``k_proj``);
- packed Qwen ViT blocks (``norm1``, the fused ``attn.qkv``, the 2-D vision RoPE).
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops import probe
from ..ops.probe import rotate_half

#: A transformers module or config read by attribute name (``attn.q_proj``, ``config.head_dim``): each family names
#: its parts differently and transformers types none of them (torch types every ``Module`` attribute as
#: ``Tensor | Module``), so these reads are duck-typed; the alias marks where.
HFModule = Any


def _head_dim(attn: HFModule, width: int) -> int:
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None:
        config = attn.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if width % head_dim:
        raise ValueError(f"q_proj gives {width} features, not a multiple of head_dim={head_dim}")
    return head_dim


# --- decoder layers ---------------------------------------------------------------------------------


@torch.no_grad()
def layer_queries(decoder_layer: HFModule, hidden: torch.Tensor) -> torch.Tensor:
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


def split_queries(attn: HFModule, q: torch.Tensor) -> torch.Tensor:
    """``q_proj`` output ``(..., heads * head_dim)`` -> pre-RoPE queries ``(..., heads, head_dim)`` (q_norm applied).

    Gated attention (Qwen3.5's full-attention layers: ``q_proj`` gives
    ``heads * 2 * head_dim``, each head's queries followed by its output
    gate) keeps the queries only, as the layer's forward splits them.
    """
    head_dim = _head_dim(attn, q.shape[-1])
    heads = getattr(getattr(attn, "config", None), "num_attention_heads", None)
    if heads is not None and q.shape[-1] == 2 * heads * head_dim:
        q = q.view(*q.shape[:-1], heads, 2 * head_dim)[..., :head_dim].reshape(*q.shape[:-1], heads * head_dim)
    return _split_heads(attn, q, getattr(attn, "q_norm", None))


def _split_heads(attn: HFModule, x: torch.Tensor, norm: HFModule | None) -> torch.Tensor:
    """Projection output -> ``(..., heads, head_dim)``, with the attention's q/k norm where it has one.

    The norm runs per head when its weight has ``head_dim`` entries (Qwen3),
    over the whole projection otherwise, as the model's own forward does.
    """
    head_dim = _head_dim(attn, x.shape[-1])
    per_head = norm is not None and getattr(norm, "weight", None) is not None and norm.weight.numel() == head_dim
    if norm is not None and not per_head:
        x = norm(x)
    x = x.view(*x.shape[:-1], x.shape[-1] // head_dim, head_dim)
    return norm(x) if per_head and norm is not None else x


@torch.no_grad()
def attention_rows(
    decoder_layer: HFModule,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Attention probabilities of chosen query rows of one sample, mean over heads, ``(n_queries, L)`` in fp32.

    Recomputes what ``decoder_layer``'s attention would weigh, without asking
    the model for weights: its input norm, q/k projections (and q/k norms),
    RoPE from the layer's own ``position_embeddings`` (cos, sin of shape
    ``(L, head_dim)``, M-RoPE already folded in as the model does), grouped
    KV heads repeated, the layer's scaling, the causal mask plus `key_valid`
    (padding), softmax over keys (`vtprune.ops.probe.causal_rows`). Only
    ``n_queries x L`` scores are formed, `chunk` query rows at a time.
    """
    attn = decoder_layer.self_attn
    x = decoder_layer.input_layernorm(hidden)
    cos, sin = (t.float() for t in position_embeddings)
    q = split_queries(attn, attn.q_proj(x[query_index])).float()
    k = _split_heads(attn, attn.k_proj(x), getattr(attn, "k_norm", None)).float()
    scale = getattr(attn, "scaling", q.shape[-1] ** -0.5)
    return probe.causal_rows(q, k, cos, sin, query_index, key_valid, scale, chunk)


@torch.no_grad()
def layer_keys(
    decoder_layer: HFModule, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Post-RoPE keys ``(L, kv_heads, head_dim)`` in fp32 of `decoder_layer` for one sample's `hidden` ``(L, D)``.

    The layer's input norm, ``k_proj`` (and ``k_norm`` where present), then
    RoPE from its ``position_embeddings`` (cos, sin ``(L, rot)``; partial
    RoPE rotates the first dims), grouped KV heads not repeated: the keys
    the layer's attention writes to its cache.
    """
    attn = decoder_layer.self_attn
    x = decoder_layer.input_layernorm(hidden)
    k = _split_heads(attn, attn.k_proj(x), getattr(attn, "k_norm", None)).float()
    cos, sin = (t.float()[:, None] for t in position_embeddings)
    return probe._rope(k, cos, sin)


# --- CLIP ViT layers ----------------------------------------------------------------------------------


def _clip_qk(encoder_layer: HFModule, hidden: torch.Tensor, query: slice | None = None):
    attn = encoder_layer.self_attn
    x = encoder_layer.layer_norm1(hidden)
    heads, head_dim = attn.num_heads, attn.head_dim
    rows = x if query is None else x[:, query]
    q = attn.q_proj(rows).float().view(*rows.shape[:2], heads, head_dim)
    k = attn.k_proj(x).float().view(*x.shape[:2], heads, head_dim)
    return q, k, attn.scale


@torch.no_grad()
def vit_attention_received(
    encoder_layer: HFModule, hidden: torch.Tensor, chunk: int = 256, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention each token of a CLIP-style ViT layer receives, summed over queries, mean over heads.

    ``hidden`` ``(n_images, T, D)`` is the layer's input; returns ``(n_images, T)``
    in fp32. Recomputes the layer's ``layer_norm1``, ``q_proj``/``k_proj`` and
    scaling (the CLIP ViT attends fully; ``valid`` ``(n_images, T)`` marks
    the tokens of images padded to a common length), `chunk` query rows at a
    time, so the ViT itself keeps SDPA/FlashAttention and no ``T x T`` map is
    ever held per head for more than one chunk.
    """
    q, k, scale = _clip_qk(encoder_layer, hidden)
    return probe.received(q, k, scale, chunk, valid)


@torch.no_grad()
def vit_attention_from(
    encoder_layer: HFModule, hidden: torch.Tensor, query: int = 0, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention one query token of a CLIP-style ViT layer pays every token, summed over heads, ``(n_images, T)`` fp32.

    ``query=0`` is the CLS token (VisionZip's dominant-token score, which
    sums over heads). Recomputed from the layer's input as `vit_attention_received`
    does; only that one row is formed.
    """
    q, k, scale = _clip_qk(encoder_layer, hidden, slice(query, query + 1))
    return probe.row_summed_over_heads(q, k, scale, valid)


@torch.no_grad()
def vit_keys(encoder_layer: HFModule, hidden: torch.Tensor) -> torch.Tensor:
    """Keys of a CLIP-style ViT layer (``k_proj`` of its ``layer_norm1``), mean over heads, ``(n_images, T, head_dim)`` fp32."""
    attn = encoder_layer.self_attn
    k = attn.k_proj(encoder_layer.layer_norm1(hidden)).float()
    return k.view(*k.shape[:2], attn.num_heads, attn.head_dim).mean(dim=2)


# --- packed Qwen ViT blocks -------------------------------------------------------------------------


def _packed_qk(block: HFModule, hidden: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated queries and keys ``(L, heads, head_dim)`` of a packed ViT block, in the model's dtype.

    As the block does: ``norm1``, the fused ``attn.qkv`` projection, then the
    2-D vision RoPE applied in fp32 and cast back to the model's dtype.
    """
    attn = block.attn
    x = block.norm1(hidden)
    q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).unbind(1)
    cos, sin = (t.float().unsqueeze(-2) for t in position_embeddings)
    rotated = []
    for t in (q, k):
        t32 = t.float()
        rotated.append((t32 * cos + rotate_half(t32) * sin).to(t.dtype))
    return rotated[0], rotated[1]


@torch.no_grad()
def packed_vit_attention_received(
    block: HFModule,
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    chunk: int = 256,
) -> torch.Tensor:
    """Attention each token of a packed ViT block receives, summed over queries, mean over heads, ``(L,)`` fp32.

    For the Qwen2-VL / Qwen2.5-VL vision blocks: ``hidden`` ``(L, D)`` is the
    block's input (every image and frame of one encoder call, packed, in the
    block's own token order: merge units, window-permuted on Qwen2.5-VL),
    ``cu_seqlens`` and ``position_embeddings`` are what the block was called
    with. Attention stays inside each ``cu_seqlens`` segment, as in the block
    (a window, or a whole image / video frame on full-attention blocks).
    Queries and keys are recomputed as the block computes them (`_packed_qk`);
    scores use the block's scaling and a softmax over the segment's keys
    (`vtprune.ops.probe.segment_received`).
    """
    q, k = (t.float() for t in _packed_qk(block, hidden, position_embeddings))
    return probe.segment_received(q, k, cu_seqlens, block.attn.scaling, chunk)


@torch.no_grad()
def packed_vit_keys(
    block: HFModule, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Rotated keys of a packed ViT block (as the block computes them), mean over heads, ``(L, head_dim)`` fp32."""
    _, k = _packed_qk(block, hidden, position_embeddings)
    return k.float().mean(dim=1)


@torch.no_grad()
def packed_vit_frame_query_attention(
    block: HFModule,
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    unit: int,
) -> torch.Tensor:
    """FastVID's Qwen frame saliency in one packed ViT block, ``(L,)`` fp32: each row holds its merge unit's value.

    Per ``cu_seqlens`` segment (a video frame on a full-attention block)
    and head: one query, the mean of the segment's rotated queries, against
    the rotated keys averaged over each merge unit (``unit`` consecutive
    rows); the block's scaling, a softmax over the segment's units; then
    the mean over heads.
    """
    q, k = (t.float() for t in _packed_qk(block, hidden, position_embeddings))
    out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        query = q[start:end].mean(dim=0)  # (heads, head_dim)
        keys = k[start:end].reshape((end - start) // unit, unit, *k.shape[1:]).mean(dim=1)  # (units, heads, head_dim)
        logits = torch.einsum("hd,uhd->hu", query, keys) * block.attn.scaling
        out[start:end] = logits.softmax(dim=-1).mean(dim=0).repeat_interleave(unit)
    return out
