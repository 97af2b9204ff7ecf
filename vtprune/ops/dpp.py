"""CDPruner's conditional DPP: relevance, the conditional kernel and the fast greedy MAP.

Pure functions over tensors (fp32 math, ties to the lowest index), used by
`vtprune.policies.cdpruner`. Sources: "Beyond Attention or Similarity:
Maximizing Conditional Diversity for Token Pruning in MLLMs" (CDPruner,
NeurIPS 2025; official code Theia-4869/CDPruner,
``llava/model/llava_arch.py``), its OpenVINO GenAI port
(``src/cpp/src/visual_language/cdpruner/``) for the text relevance from the
LLM's embeddings, the relevance weight and the split, and the fast greedy
MAP inference of Chen et al. (NeurIPS 2018).
"""

from __future__ import annotations

import warnings

import torch

from .greedy import finite_fp32
from .select import sanitize_scores, topk_indices

#: eps of the min-max normalisations of relevance
RELEVANCE_EPS = 1e-6


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm in fp32 (no eps, as the reference; an all-zero row stays zero)."""
    x = finite_fp32(x)
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def relevance_llm(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Raw relevance ``cos(F_i, mean(text))`` of each visual row ``(n,)`` fp32 (OpenVINO's, no sign flip).

    ``features`` ``(n, D)`` post-projector rows, ``text`` ``(m, D)`` the
    question's LLM input embeddings (m >= 1).
    """
    t = finite_fp32(text).mean(dim=0, keepdim=True)
    return (unit_rows(features) @ unit_rows(t).T)[:, 0]


def relevance_clip(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Raw relevance of the CLIP reference ``(n,)``: the mean over text segments of ``-cos(E_i, T_m)``.

    ``image_embeds`` ``(n, C)`` CLIP-projected visual rows, ``text_embeds``
    ``(M, C)`` one projected text embedding per 77-token segment. The minus
    is the authors' CLIP-specific sign.
    """
    return (-(unit_rows(image_embeds) @ unit_rows(text_embeds).T)).mean(dim=-1)


def minmax_llm(raw: torch.Tensor) -> torch.Tensor:
    """``(r - min) / (max - min + 1e-6)`` (OpenVINO's normalisation)."""
    r = sanitize_scores(raw, "relevance")
    return (r - r.min()) / (r.max() - r.min() + RELEVANCE_EPS)


def minmax_clip(raw: torch.Tensor) -> torch.Tensor:
    """``(r - min + 1e-6) / (max - min)`` (the CLIP reference, eps in the numerator); constant r gives ones."""
    r = sanitize_scores(raw, "relevance")
    span = r.max() - r.min()
    if not bool(span > 0):
        return torch.ones_like(r)
    return (r - r.min() + RELEVANCE_EPS) / span


def conditional_kernel(features: torch.Tensor, relevance: torch.Tensor, relevance_weight: float = 1.0) -> torch.Tensor:
    """The kernel ``L = r_i S_ij r_j`` ``(n, n)`` fp32, S the cosine of the rows of `features`.

    ``relevance_weight`` w < 1 blends as OpenVINO: ``(1 - w) S + w (r_i S_ij r_j)``.
    """
    unit = unit_rows(features)
    sim = unit @ unit.T
    r = relevance.float().to(sim.device)
    if relevance_weight == 1.0:
        return sim.mul_(r[:, None]).mul_(r[None, :])  # in place: one n x n matrix, the same products
    conditional = (r[:, None] * sim).mul_(r[None, :])
    return sim.mul_(1.0 - relevance_weight).add_(conditional.mul_(relevance_weight))


def dpp_greedy_map(kernel: torch.Tensor, k: int, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Fast greedy MAP of a DPP (incremental Cholesky), exactly `k` picks, ascending indices.

    ``d2 = diag(L)``; each step picks ``j = argmax d2`` (first maximum),
    ``e = (L[j] - sum_t c_t[j] c_t) / sqrt(d2[j])``, ``d2 -= e^2``,
    ``d2[j] = -inf``. No eps, no early stop; the loop never waits on the
    host. If a step found no candidate with ``d2 > 0`` (the budget exceeds
    the kernel's rank), that pick and the later ones go to the unpicked
    tokens by `fallback` scores (default: the kernel's diagonal), highest
    first, ties to the lowest index, with a warning.
    """
    n = kernel.shape[0]
    k = min(k, n)
    device = kernel.device
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    kernel = finite_fp32(kernel, "kernel entries")
    cis = torch.zeros(k, n, dtype=torch.float32, device=device)
    d2 = torch.diagonal(kernel).clone()
    picks = torch.empty(k, dtype=torch.long, device=device)
    at_pick = torch.empty(k, dtype=torch.float32, device=device)
    for i in range(k):
        j = torch.argmax(d2)
        picks[i] = j
        dj = d2[j]
        at_pick[i] = dj
        e = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(dj)
        cis[i] = e
        d2 -= e * e
        d2[j] = float("-inf")
    good = (at_pick > 0) & torch.isfinite(at_pick)
    if bool(good.all()):
        return torch.sort(picks).values
    first_bad = int((~good).nonzero()[0, 0])
    warnings.warn(
        f"cdpruner: the kernel has rank below the budget ({first_bad} of {k} picks had positive gain); "
        "the remaining picks are the unpicked tokens with the highest relevance",
        RuntimeWarning,
        stacklevel=2,
    )
    chosen = picks[:first_bad]
    score = sanitize_scores(torch.diagonal(kernel) if fallback is None else fallback.float().to(device)).clone()
    score[chosen] = torch.finfo(torch.float32).min
    rest = topk_indices(score, k - first_bad)
    return torch.sort(torch.cat([chosen, rest])).values


def cdpruner_select(
    features: torch.Tensor,
    relevance: torch.Tensor,
    k: int,
    relevance_weight: float = 1.0,
) -> torch.Tensor:
    """CDPruner's keep set of one selection problem: ``k`` of the ``n`` rows, ascending.

    ``relevance`` ``(n,)`` is already normalised (`minmax_llm` or
    `minmax_clip`); the kernel is `conditional_kernel`, the selection
    `dpp_greedy_map` (falling back on relevance).
    """
    n = features.shape[0]
    if k >= n:
        return torch.arange(n, device=features.device)
    kernel = conditional_kernel(features, relevance, relevance_weight)
    return dpp_greedy_map(kernel, k, fallback=relevance)


def split_halves(n: int, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """OpenVINO's split: ((first half size, its picks), (second half size, its picks)) = ((n//2, k//2), (n - n//2, k - k//2))."""
    return (n // 2, k // 2), (n - n // 2, k - k // 2)


def view_budgets(sizes: list[int], k: int) -> list[int]:
    """Per-view budgets: ``k // V`` each, the remainder to the first (base) view; a view smaller than its
    share keeps all, and what it could not take goes to the other views in order, base view first."""
    if not sizes:
        return []
    v = len(sizes)
    k = min(k, sum(sizes))
    shares = [k // v] * v
    shares[0] += k - (k // v) * v
    got = [min(s, n) for s, n in zip(shares, sizes)]
    left = k - sum(got)
    for idx, n in enumerate(sizes):
        if left <= 0:
            break
        add = min(left, n - got[idx])
        got[idx] += add
        left -= add
    return got
