"""The attention probe's math: attention statistics from queries and keys, computed on the side, in chunks.

The model's own attention keeps running under SDPA or FlashAttention-2 and
never has to return weights. The adapter (``vtprune.patches``) knows where a
family keeps its norms and projections and produces queries and keys exactly
as the layer computes them (`vtprune.patches.attention`); the functions here
only see tensors, so no model-family module name lives in ``ops/``.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's half rotation, ``(x1, x2) -> (-x2, x1)`` over the last dimension, as the HF models do."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the HF decoders apply it; with partial RoPE (tables narrower than the head) the rest passes through."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    head, rest = x[..., :rot], x[..., rot:]
    return torch.cat([head * cos + rotate_half(head) * sin, rest], dim=-1)


def shift_rotary(cos: torch.Tensor, sin: torch.Tensor, origin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables ``(L, d)`` re-based so that row ``origin`` is position 0 (every position minus its own).

    Angle subtraction per dimension, ``cos(a - b)`` and ``sin(a - b)``, so it
    holds for 1-D RoPE, M-RoPE sections and partial RoPE alike; a constant
    attention scaling folded into the tables is kept. fp32.
    """
    cos, sin = cos.float(), sin.float()
    c0, s0 = cos[origin], sin[origin]
    scale = torch.sqrt(c0 * c0 + s0 * s0).clamp_min(1e-12)
    return (cos * c0 + sin * s0) / scale, (sin * c0 - cos * s0) / scale


@torch.no_grad()
def causal_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    query_index: torch.Tensor,
    key_valid: torch.Tensor | None,
    scale: float,
    chunk: int = 256,
) -> torch.Tensor:
    """Causal attention probabilities of chosen query rows, mean over heads, ``(n_queries, L)`` in fp32.

    ``q`` ``(n_queries, H, d)`` and ``k`` ``(L, H_kv, d)`` are pre-RoPE fp32;
    ``cos``/``sin`` ``(L, d)`` fp32 the layer's rotary tables (narrower than ``d``
    with partial RoPE: the first dims rotate, as in Qwen3.5). RoPE is applied,
    grouped KV heads repeated, keys after a query row or outside `key_valid`
    masked, softmax over keys; `chunk` query rows at a time.
    """
    q, k = _rope(q, cos[query_index, None], sin[query_index, None]), _rope(k, cos[:, None], sin[:, None])
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (L, H, d)
    keys = torch.arange(k.shape[0], device=k.device)
    out = []
    for start in range(0, q.shape[0], chunk):
        rows = query_index[start : start + chunk]
        scores = torch.einsum("qhd,khd->hqk", q[start : start + chunk], k) * scale
        allowed = keys[None, :] <= rows[:, None]
        if key_valid is not None:
            allowed = allowed & key_valid[None, :]
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        out.append(torch.softmax(scores, dim=-1).mean(dim=0))
    return torch.cat(out)


@torch.no_grad()
def received(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 256, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Attention each token receives under full attention, summed over queries, mean over heads.

    ``q``, ``k`` ``(n, T, H, d)`` fp32 -> ``(n, T)`` fp32, `chunk` query rows at a time.
    ``valid`` ``(n, T)`` bool: tokens that exist (False: padding, neither
    attended to nor counted as a query); None: all.
    """
    out = torch.zeros(q.shape[0], q.shape[1], device=q.device, dtype=torch.float32)
    for start in range(0, q.shape[1], chunk):
        scores = torch.einsum("bqhd,bkhd->bhqk", q[:, start : start + chunk], k) * scale
        if valid is None:
            out += torch.softmax(scores, dim=-1).sum(dim=2).mean(dim=1)
            continue
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        rows = valid[:, None, start : start + chunk, None]
        out += (torch.softmax(scores, dim=-1) * rows).sum(dim=2).mean(dim=1)
    return out


@torch.no_grad()
def row_summed_over_heads(q: torch.Tensor, k: torch.Tensor, scale: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query row ``q`` ``(n, 1, H, d)`` to every key ``(n, T, H, d)``, summed over heads, ``(n, T)``.

    ``valid`` ``(n, T)`` bool: keys that exist (False: padding); None: all.
    """
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)[:, :, 0].sum(dim=1)


@torch.no_grad()
def segment_received(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, chunk: int = 256) -> torch.Tensor:
    """Attention each token of a packed sequence receives inside its ``cu_seqlens`` segment, ``(L,)`` fp32.

    ``q``, ``k`` ``(L, H, d)`` fp32, already rotated. Segments of equal
    length are batched, ``chunk`` query rows at a time, so no ``L x L`` map
    is formed; summed over queries, mean over heads.
    """
    bounds = cu_seqlens.to(torch.long).cpu()
    starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
    out = torch.zeros(q.shape[0], device=q.device, dtype=torch.float32)
    for length in torch.unique(lengths).tolist():
        if length == 0:
            continue
        rows = (starts[lengths == length, None] + torch.arange(length)).to(q.device)  # (segments, length)
        per_step = max(1, chunk // length)
        for group in torch.split(rows, per_step):
            keys = k[group]  # (g, length, H, d)
            for start in range(0, length, chunk):
                queries = q[group[:, start : start + chunk]]
                scores = torch.einsum("gqhd,gkhd->ghqk", queries, keys) * scale
                got = torch.softmax(scores, dim=-1).sum(dim=2).mean(dim=1)  # (g, length)
                out.index_add_(0, group.flatten(), got.flatten())
    return out
