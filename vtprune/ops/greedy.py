"""Greedy subset selection shared by the diversity and coverage policies.

Three loops, each written once and used by its policy (and by any later
method built on the same idea):

- `mmr_select`: maximal marginal relevance, importance against redundancy
  (IDPruner).
- `divprune_select`: max-min diversity, farthest-point sampling on cosine
  distance (DivPrune).
- `coverage_select`: greedy maximum coverage of a facility-location
  objective (MMTok).

Common rules: the math runs in fp32 on the input's device whatever the input
dtype; the pairwise matrix is built once and each step updates running
vectors in place; picked indices stay in a device tensor, so a step never
waits on the host; ties go to the lowest index (`torch.argmax` and
`torch.max` along a dim return the first maximum); the kept indices come
back ascending. Non-finite inputs are replaced (with a warning) so the
result stays deterministic.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from .select import sanitize_scores

#: added to feature norms before dividing (the IDPruner reference's cosine)
COSINE_EPS = 1e-8
#: added to the importance range in min-max normalisation (IDPruner reference)
MINMAX_EPS = 1e-6


def finite_fp32(x: torch.Tensor, what: str = "features") -> torch.Tensor:
    """fp32 copy of `x` with NaN/inf entries set to 0, warning when there were any."""
    x = x.float()
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        warnings.warn(
            f"{int(bad.sum())} non-finite {what} entries set to 0 for a deterministic selection",
            RuntimeWarning,
            stacklevel=3,
        )
        x = torch.where(bad, torch.zeros((), dtype=x.dtype, device=x.device), x)
    return x


def normalize_rows(x: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """Rows of `x` divided by their L2 norm plus `eps`, in fp32."""
    x = x.float()
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor | None = None, eps: float = COSINE_EPS) -> torch.Tensor:
    """Pairwise cosine similarity ``(n, m)`` of the rows of `a` and `b` (``b = a`` when omitted), fp32.

    Uses ``x / (|x| + eps)`` as the IDPruner reference does; the DivPrune and
    MMTok references divide by the bare or clamped norm, which differs only
    for all-zero rows. Without `b` the result is exactly symmetric.
    """
    an = normalize_rows(a, eps)
    if b is not None:
        return an @ normalize_rows(b, eps).T
    sim = an @ an.T
    # A matmul need not give S[i, j] == S[j, i] to the last bit; symmetric pairs must tie exactly
    # (a mutual nearest-neighbour pair is a tie that the lowest index wins).
    return sim.add_(sim.T.contiguous()).mul_(0.5)


def minmax_normalize(scores: torch.Tensor) -> torch.Tensor:
    """``(s - min) / (max - min + 1e-6)`` in fp32: importance in [0, 1] (IDPruner reference)."""
    s = scores.float()
    lo, hi = s.min(), s.max()
    return (s - lo) / (hi - lo + MINMAX_EPS)


def _empty(device: torch.device) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long, device=device)


def _check_k(k: int, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0 (tokens to keep); got {k!r}")
    return min(k, n)


def _check_matrix(features: torch.Tensor, what: str = "features") -> None:
    if features.dim() != 2:
        raise ValueError(f"{what} must be 2-D (tokens, dim); got shape {tuple(features.shape)}")


def mmr_select(
    features: torch.Tensor,
    importance: torch.Tensor,
    k: int,
    lam: float = 0.5,
    similarity: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy maximal marginal relevance (IDPruner): `k` indices, ascending.

    Importance ``I`` is min-max normalised; the similarity ``S`` is cosine
    (computed once from `features` unless given). The first pick is
    ``argmax I``; each next pick maximises ``lam * I - (1 - lam) * m`` where
    ``m`` is each token's running maximum similarity to the picked set. With
    ``lam = 1`` this is top-k by importance; with ``lam = 0`` and constant
    importance it is farthest-point sampling seeded at index 0.
    """
    _check_matrix(features)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1]; got {lam}")
    n = features.shape[0]
    device = features.device
    k = _check_k(k, n)
    if importance.shape != (n,):
        raise ValueError(f"importance must have shape ({n},) to match the features; got {tuple(importance.shape)}")
    if k == 0:
        return _empty(device)
    imp = minmax_normalize(sanitize_scores(importance.to(device), "importance scores"))
    sim = cosine_similarity(finite_fp32(features)) if similarity is None else finite_fp32(similarity, "similarity")

    picks = torch.empty(k, dtype=torch.long, device=device)
    top = torch.empty(1, dtype=torch.float32, device=device)
    torch.max(imp, dim=0, keepdim=True, out=(top, picks[0:1]))
    first = picks[0:1]
    # lam * I, with picked tokens at -inf so they are never picked again
    relevance = (imp * lam).index_fill_(0, first, float("-inf"))
    max_sim = sim.index_select(0, first).squeeze(0).clone()
    score = torch.empty(n, dtype=torch.float32, device=device)
    for t in range(1, k):
        torch.mul(max_sim, 1.0 - lam, out=score)
        torch.sub(relevance, score, out=score)
        torch.max(score, dim=0, keepdim=True, out=(top, picks[t : t + 1]))
        p = picks[t : t + 1]
        relevance.index_fill_(0, p, float("-inf"))
        torch.maximum(max_sim, sim.index_select(0, p).squeeze(0), out=max_sim)
    return torch.sort(picks).values


def divprune_select(features: torch.Tensor, k: int, similarity: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy max-min diversity (DivPrune, official code): `k` indices, ascending.

    Distance is ``1 - cosine`` (the cosine computed once from `features`
    unless given; a given matrix is not modified). The first pick is the
    token whose nearest other token is farthest; each next pick is the token
    whose distance to the picked set (its nearest picked token) is largest.
    """
    _check_matrix(features)
    n = features.shape[0]
    device = features.device
    k = _check_k(k, n)
    if k == 0:
        return _empty(device)
    if similarity is None:
        dist = cosine_similarity(finite_fp32(features)).neg_().add_(1.0)
    else:
        dist = 1.0 - finite_fp32(similarity, "similarity")
    dist.fill_diagonal_(float("inf"))
    first = torch.argmax(dist.min(dim=1).values).view(1)

    picks = torch.empty(k, dtype=torch.long, device=device)
    picks[0:1] = first
    top = torch.empty(1, dtype=torch.float32, device=device)
    # Picked tokens sit at -inf in the running minimum, so they are never picked again.
    min_dist = dist.index_select(0, first).squeeze(0).clone()
    min_dist.index_fill_(0, first, float("-inf"))
    for t in range(1, k):
        torch.max(min_dist, dim=0, keepdim=True, out=(top, picks[t : t + 1]))
        p = picks[t : t + 1]
        torch.minimum(min_dist, dist.index_select(0, p).squeeze(0), out=min_dist)
        min_dist.index_fill_(0, p, float("-inf"))
    return torch.sort(picks).values


class CoverageResult(NamedTuple):
    """Outcome of `coverage_select`.

    ``indices``: kept columns, ascending. ``order``: the same columns in the
    order they were picked. ``gains[t]``: the objective's increase from pick
    t (non-increasing). ``totals[t]``: ``f`` of the first ``t + 1`` picks.
    """

    indices: torch.Tensor
    order: torch.Tensor
    gains: torch.Tensor
    totals: torch.Tensor


#: `coverage_select` compacts its alive entries at steps 8, 16, 32, ... when the
#: coverage matrix has at least this many entries (below it, compaction costs
#: more than it saves)
COMPACT_MIN_ENTRIES = 1 << 20
_FIRST_COMPACTION = 8


def _compact(cover: torch.Tensor, rows: torch.Tensor | None, best: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
    """Row indices of the coverage entries that can still add something; one host sync for the new height.

    Column j of `rows` lists the coverage rows of candidate j's entries
    (None: all rows, in order). An entry stays alive while it exceeds its
    row's best so far; ``best`` only grows, so a dead entry stays dead, and
    picked candidates need no entries. Alive entries move to the top of
    their column, in order; the padding points at the all-zero last row of
    `cover`, which adds nothing.
    """
    pad = cover.shape[0] - 1
    if rows is None:
        alive = cover > best.unsqueeze(1)
        rows = torch.arange(pad + 1, device=cover.device).unsqueeze(1).expand_as(cover)
    else:
        alive = cover.gather(0, rows) > best.index_select(0, rows.view(-1)).view_as(rows)
    height, n = rows.shape
    alive &= (taken == 0).unsqueeze(0)
    slot = alive.cumsum(dim=0, dtype=torch.int32)
    new_height = int(slot[-1].max()) if height and n else 0  # the host sync
    slot = torch.where(alive, slot - 1, new_height).long()  # dead entries go to a spare row
    new_rows = torch.full((new_height + 1, n), pad, dtype=torch.long, device=rows.device)
    new_rows.scatter_(0, slot, rows)
    return new_rows[:new_height]


def coverage_select(cover: torch.Tensor, k: int) -> CoverageResult:
    """Greedy maximum coverage (MMTok): pick `k` columns of `cover` ``(rows, N)``.

    Objective: ``f(S) = sum over rows of max over picked columns`` (0 for
    the empty set; entries are expected non-negative, as softmax rows are).
    The first pick is the column with the largest sum; each next pick adds
    the largest gain ``sum_r max(C[r, j] - best_r, 0)``; ties go to the
    lowest index. This is the plain greedy of the MMTok reference, with the
    same gains at every step.

    Faster than ``rows x N`` work per step, without approximation: an entry
    ``C[r, j] <= best_r`` adds nothing now or later (``best`` only grows),
    and after t picks typically about 1/(t+1) of the entries are still
    alive. The alive entries of a large matrix (`COMPACT_MIN_ENTRIES`) are
    compacted at steps 8, 16, 32, ... (one host sync each, never one per
    step), so a later step costs only the alive entries.
    """
    _check_matrix(cover, "coverage matrix")
    n_rows, n = cover.shape
    device = cover.device
    k = _check_k(k, n)
    if k == 0:
        none = torch.zeros(0, dtype=torch.float32, device=device)
        return CoverageResult(_empty(device), _empty(device), none, none)
    # An all-zero last row: the target of padding entries after compaction.
    padded = torch.zeros(n_rows + 1, n, dtype=torch.float32, device=device)
    padded[:n_rows] = finite_fp32(cover, "coverage matrix")
    cover = padded.clamp_min_(0)
    order = torch.empty(k, dtype=torch.long, device=device)
    gains = torch.empty(k, dtype=torch.float32, device=device)
    best = torch.zeros(n_rows + 1, dtype=torch.float32, device=device)
    taken = torch.zeros(n, dtype=torch.float32, device=device)
    gain = torch.empty(n, dtype=torch.float32, device=device)
    vals, rows = cover, None
    work = torch.empty_like(vals)
    compact = cover.numel() >= COMPACT_MIN_ENTRIES
    next_compaction = _FIRST_COMPACTION
    for t in range(k):
        if compact and t == next_compaction:
            rows = _compact(cover, rows, best, taken)
            vals = cover.gather(0, rows)
            work = torch.empty_like(vals)
            next_compaction *= 2
        if rows is None:
            torch.sub(vals, best.unsqueeze(1), out=work)
        else:
            torch.index_select(best, 0, rows.view(-1), out=work.view(-1))
            torch.sub(vals, work, out=work)
        torch.sum(work.clamp_min_(0), dim=0, out=gain)
        # max along a dim returns the first maximum: ties go to the lowest index
        torch.max(gain.add_(taken), dim=0, keepdim=True, out=(gains[t : t + 1], order[t : t + 1]))
        p = order[t : t + 1]
        torch.maximum(best, cover.index_select(1, p).squeeze(1), out=best)
        taken.index_fill_(0, p, float("-inf"))
    return CoverageResult(torch.sort(order).values, order, gains, torch.cumsum(gains, dim=0))


def coverage_value(cover: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """``f(S)``: sum over rows of the max over the picked columns (0 for an empty set), fp32."""
    if picked.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=cover.device)
    return cover.float().index_select(1, picked).max(dim=1).values.clamp_min(0).sum()
