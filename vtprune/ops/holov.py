"""HoloV's holistic selection: contiguous chunks, a budget per chunk by score, the most attended tokens inside.

Pure functions over tensors (fp32 math, ties to the lowest index), used by
`vtprune.policies.holov`. Source: "HoloV: Holistic Visual Token Pruning"
(NeurIPS 2025), official code obananas/HoloV (``llava/model/utils.py``,
``qwen-model-HoloV/utils.py``).
"""

from __future__ import annotations

import torch

from .greedy import finite_fp32
from .select import sanitize_scores

#: the reference's eps (feature norms, the variance scale, the weight normaliser)
HOLOV_EPS = 1e-6
#: weight of the similarity variance in a token's score
HOLOV_ALPHA = 0.09
#: attention scale of a chunk of two or more tokens
HOLOV_ATTENTION_SCALE = 1e3
OVERFLOW_MODES = ("redistribute", "drop")


def holov_num_chunks(n: int, keep: int) -> int:
    """Number of chunks P = max(1, int(1024 / 576 * n / keep)), as the reference's Qwen code derives it.

    576 tokens: 16 chunks at keep 64, 8 at 128, 5 at 192; 2880 tokens: 80 / 40 / 26.
    """
    return max(1, int(((1024 / 576) * n) / keep))


def holov_chunk_sizes(n: int, chunks: int) -> list[int]:
    """Sizes of the contiguous chunks: ``n // P`` each, the first ``n % P`` one longer; empty chunks dropped."""
    base, extra = divmod(n, chunks)
    sizes = [base + (1 if p < extra else 0) for p in range(chunks)]
    return [s for s in sizes if s > 0]


def holov_chunk_score(features: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Score of one chunk (a 0-d fp32 tensor) from its features ``(n, D)`` and attention ``(n,)``.

    n >= 2: F / (|F| + 1e-6), S = F F^T with a zero diagonal, per-row mean and
    variance of S over n - 1 (the variance sums over every column, the zeroed
    diagonal included), attention times 1000, and the mean over the chunk of
    ``a' + 0.09 * v * mean|a'| / (mean|v| + 1e-6)``. n == 1: the attention
    itself (no factor 1000), as the reference.
    """
    a = attention.float()
    n = a.numel()
    if n <= 1:
        return a.mean()
    f = finite_fp32(features)
    unit = f / (f.norm(dim=1, keepdim=True) + HOLOV_EPS)
    sim = unit @ unit.T
    sim.fill_diagonal_(0.0)
    mean = sim.sum(dim=1) / (n - 1)
    var = ((sim - mean[:, None]) ** 2).sum(dim=1) / (n - 1)
    scaled = a * HOLOV_ATTENTION_SCALE
    var_scaling = scaled.abs().mean() / (var.abs().mean() + HOLOV_EPS)
    return (scaled + HOLOV_ALPHA * (var * var_scaling)).mean()


def holov_allocate(weights: torch.Tensor, sizes: list[int], keep: int, overflow: str = "redistribute") -> list[int]:
    """Tokens each chunk keeps.

    ``floor(w * keep)`` each, then the ``keep - sum`` left-over tokens one
    each to the chunks with the largest weights (ties: lowest chunk; at most
    one per chunk, as the reference). An allocation above its chunk's size
    keeps the whole chunk; ``"drop"`` (the reference) loses the excess,
    ``"redistribute"`` hands the excess (and any left-over beyond one per
    chunk) to the other chunks in descending weight order, each filled up to
    its size, so that exactly ``min(keep, sum(sizes))`` are kept.
    """
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"holov: overflow must be one of {OVERFLOW_MODES}; got {overflow!r}")
    w = weights.float().cpu()
    alloc = torch.floor(w * keep).long().tolist()
    order = torch.sort(w, descending=True, stable=True).indices.tolist()
    remaining = keep - sum(alloc)
    for idx in order[: max(0, min(remaining, len(order)))]:
        alloc[idx] += 1
    alloc = [max(0, min(a, s)) for a, s in zip(alloc, sizes)]
    if overflow == "redistribute":
        excess = min(keep, sum(sizes)) - sum(alloc)
        for idx in order:
            if excess <= 0:
                break
            add = min(excess, sizes[idx] - alloc[idx])
            alloc[idx] += add
            excess -= add
    return alloc


def holov_select(features: torch.Tensor, attention: torch.Tensor, keep: int, overflow: str = "redistribute") -> torch.Tensor:
    """HoloV's keep set of one image: indices into its ``n`` tokens, ascending.

    ``features`` ``(n, D)`` (post-projector), ``attention`` ``(n,)`` (CLS
    attention, mean over heads, or the attention received on an encoder
    without CLS), in span order. Chunks (`holov_num_chunks`,
    `holov_chunk_sizes`), scores (`holov_chunk_score`), weights
    ``score / (sum + 1e-6)``, allocation (`holov_allocate`), then the top
    ``alloc`` tokens of each chunk by attention (ties: lowest index).
    """
    n = features.shape[0]
    device = features.device
    if keep >= n:
        return torch.arange(n, device=device)
    attention = sanitize_scores(attention.to(device), "attention scores")
    sizes = holov_chunk_sizes(n, holov_num_chunks(n, keep))
    starts = [0]
    for s in sizes[:-1]:
        starts.append(starts[-1] + s)
    scores = torch.stack([holov_chunk_score(features[st : st + s], attention[st : st + s]) for st, s in zip(starts, sizes)])
    scores = sanitize_scores(scores, "chunk scores")
    weights = scores / (scores.sum() + HOLOV_EPS)
    alloc = holov_allocate(weights, sizes, keep, overflow)
    kept = []
    for st, s, k in zip(starts, sizes, alloc):
        if k <= 0:
            continue
        if k >= s:
            kept.append(torch.arange(st, st + s, device=device))
        else:
            top = torch.sort(attention[st : st + s], descending=True, stable=True).indices[:k]
            kept.append(top + st)
    if not kept:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.sort(torch.cat(kept)).values
