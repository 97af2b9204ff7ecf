"""SparseVLM (code v1.5) selection over tensors: text raters, per-stage counts, top-k and DPC-KNN recycling.

Pure fp32 functions (no model), driven by the llm-stage policy
`vtprune.policies.sparsevlm.SparseVLM` (the runtime inserts its merged rows).
"""

from __future__ import annotations

import torch

from .select import sanitize_scores, topk_indices

#: K_s at the three pruning layers for the reference's named budgets on 576 tokens
TABLES = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}
REFERENCE_TOKENS = 576
RECYCLE_FRACTION = 0.3
CLUSTER_DIVISOR = 10
NOISE = 1e-6


def stage_counts(keep: int | None, n: int, budgets: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """K_s for an image of ``n`` tokens: ``budgets`` as given, else the table of ``keep`` scaled by ``n / 576``."""
    if budgets is not None:
        return tuple(int(k) for k in budgets)
    if keep not in TABLES:
        raise ValueError(
            f"sparsevlm: keep must be one of {sorted(TABLES)} (the reference's tables) or give budgets; got {keep!r}"
        )
    table = TABLES[keep]
    return table if n == REFERENCE_TOKENS else tuple(int(k * n / REFERENCE_TOKENS) for k in table)


def raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Indices of the rater text tokens: m_j = mean over visual rows of softmax_j(V T^T); raters are m_j > mean(m).

    ``visual`` ``(n, D)`` and ``text`` ``(m, D)``: layer-0 input embeddings, fp32.
    """
    m = torch.softmax(visual.float() @ text.float().T, dim=1).mean(dim=0)
    return torch.nonzero(m > m.mean()).flatten()


def top_descending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest in descending order, ties to the lowest index."""
    return torch.sort(sanitize_scores(scores), descending=True, stable=True).indices[: min(k, scores.numel())]


def dpc_knn_merge(x: torch.Tensor, clusters: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN clustering of the rows of ``x`` ``(r, D)`` and their merge: ``(merged (c, D), centres (c,))``.

    Distances = pairwise L2 / sqrt(D); density = exp(-mean of the squared
    distances to the ``c`` nearest rows, self included) + ``noise`` ``(r,)``
    (the reference adds uniform noise times 1e-6); delta = distance to the
    nearest denser row (the densest row: the largest distance of all);
    centres = the top ``c`` of delta * density, in that order; every row joins
    its nearest centre (a centre joins itself); a merged row = sum of its
    members / (count + 1e-6).
    """
    x = x.float()
    r, d = x.shape
    c = min(clusters, r)
    dist = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / d**0.5
    nearest = torch.sort(dist, dim=-1, stable=True).values[:, :c]
    density = torch.exp(-(nearest**2).mean(dim=-1)) + noise.float()
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centres = top_descending(delta * density, c)
    assign = torch.argmin(dist[centres], dim=0)  # (r,) ties to the first centre
    assign[centres] = torch.arange(c, device=x.device)
    merged = torch.zeros(c, d, dtype=x.dtype, device=x.device).index_add_(0, assign, x)
    count = torch.zeros(c, dtype=x.dtype, device=x.device).index_add_(0, assign, torch.ones(r, device=x.device))
    return merged / (count[:, None] + 1e-6), centres


def prune_stage(
    score: torch.Tensor, hidden: torch.Tensor, k: int, recycle: bool, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One pruning layer on one image's ``n`` current visual tokens.

    ``score`` ``(n,)``: the raters' mean attention; ``hidden`` ``(n, D)``: the
    layer's output rows. Keeps the top ``min(k, n - 1)`` (ascending). With
    ``recycle``: the top ``int(0.3 * pruned) + 1`` pruned tokens by score (in
    descending score order) are clustered into ``int(that / 10) + 1`` merged
    tokens (`dpc_knn_merge`, ``noise`` one value per recycled token).
    Returns (kept, merged rows or None, the centres' indices among the ``n``
    tokens or None).
    """
    n = score.numel()
    kept = topk_indices(score, min(k, n - 1))
    if not recycle or kept.numel() == n:
        return kept, None, None
    pruned = torch.ones(n, dtype=torch.bool, device=score.device)
    pruned[kept] = False
    pruned = torch.nonzero(pruned).flatten()
    count = int(pruned.numel() * RECYCLE_FRACTION) + 1
    recycled = pruned[top_descending(score[pruned], count)]
    clusters = int(recycled.numel() / CLUSTER_DIVISOR) + 1
    if noise is None:
        noise = torch.zeros(recycled.numel())
    merged, centres = dpc_knn_merge(hidden[recycled], clusters, noise[: recycled.numel()])
    return kept, merged, recycled[centres]


def counts_after(n: int, ks: tuple[int, ...], recycle: bool = True) -> list[int]:
    """Visual tokens (merged ones included) after each pruning layer, starting from ``n``."""
    out = []
    for k in ks:
        kept = min(k, n - 1)
        merged = int((int((n - kept) * RECYCLE_FRACTION) + 1) / CLUSTER_DIVISOR) + 1 if recycle and kept < n else 0
        n = kept + merged
        out.append(n)
    return out
