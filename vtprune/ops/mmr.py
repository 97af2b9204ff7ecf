"""Maximal marginal relevance (IDPruner): importance against redundancy, as a matrix loop and an exact lazy loop."""

from __future__ import annotations

import numpy as np
import torch

from .greedy import (
    _check_k,
    _check_matrix,
    _empty,
    _lazy_argmax,
    _use_lazy,
    cosine_similarity,
    finite_fp32,
    minmax_normalize,
    normalize_rows,
    self_cosine,
)
from .select import sanitize_scores

#: the lazy MMR loop re-scores this many of the highest stale bounds at once (one small matmul)
LAZY_BATCH = 64


def mmr_select(
    features: torch.Tensor,
    importance: torch.Tensor,
    k: int,
    lam: float = 0.5,
    similarity: torch.Tensor | None = None,
    unit: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy maximal marginal relevance (IDPruner): `k` indices, ascending.

    Importance ``I`` is min-max normalised; the similarity ``S`` is cosine.
    The first pick is ``argmax I``; each next pick maximises
    ``lam * I - (1 - lam) * m`` where ``m`` is each token's running maximum
    similarity to the picked set. With ``lam = 1`` this is top-k by
    importance; with ``lam = 0`` and constant importance it is
    farthest-point sampling seeded at index 0.

    Given `similarity`, or near a full budget, the loop follows the
    AngelSlim reference (the matrix, one argmax per step). Otherwise it is
    the exact lazy form (`mmr_lazy`): a score only falls as the picked set
    grows, so only the candidates whose stale score still tops the others
    are re-scored, with no ``N x N`` matrix. ``unit``: the rows as
    ``normalize_rows(finite_fp32(features))`` gives them, when the caller
    has them already (the same values; not computed again).
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
    if similarity is None and _use_lazy(n, k, device):
        return mmr_lazy(normalize_rows(finite_fp32(features)) if unit is None else unit, imp, k, lam)
    if similarity is None and unit is not None:
        return mmr_matrix(self_cosine(unit), imp, k, lam)  # cosine_similarity's own steps from the unit rows
    sim = cosine_similarity(finite_fp32(features)) if similarity is None else finite_fp32(similarity, "similarity")
    return mmr_matrix(sim, imp, k, lam)


def mmr_matrix(sim: torch.Tensor, imp: torch.Tensor, k: int, lam: float) -> torch.Tensor:
    """MMR loop on a full similarity matrix (fp32 ``(n, n)``, normalised importance ``(n,)``): `k` indices, ascending."""
    n = sim.shape[0]
    device = sim.device
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


#: `mmr_lazy` brings every candidate up to date (one matmul over all rows) once this many picks are pending
#: (measured at 2880 -> 320: 32 pending 491 ms, 128 370 ms, 512 307 ms; most candidates never need it)
LAZY_PENDING = 512

#: `mmr_lazy` keeps up to this many candidates (the ones last found at the top) fresh at every pick from their
#: similarities to each other, so a pick among them needs no torch call
LAZY_HOT = 16


def mmr_lazy(unit: torch.Tensor, imp: torch.Tensor, k: int, lam: float, batch: int | None = None) -> torch.Tensor:
    """Exact lazy MMR on unit-norm rows `unit` ``(n, D)`` and normalised importance (CPU): `k` indices, ascending.

    The same scores as `mmr_matrix` (``lam * I - (1 - lam) * m``, the same
    fp32 operations) and the same picks, ties to the lowest index;
    similarities are computed only for the candidates that reach the top
    (``n x k x D`` work at most, no ``N x N``). ``m[i]`` is the running
    maximum similarity over the first ``seen[i]`` picks (re-counting a pick
    already seen changes no max):

    - a stale candidate at the top is refreshed against the picks it has
      not seen (their rows kept in ``pending``), with the other stale ones
      among the `batch` highest bounds, in one small matmul;
    - refreshed candidates join the hot set (at most `LAZY_HOT`, the
      highest bounds stay), whose similarities to each other are kept: at
      each pick from it every hot candidate is brought up to date from that
      small matrix, so the next top is often fresh already;
    - once `LAZY_PENDING` picks are pending every candidate is brought up
      to date in one matmul.
    """
    batch = batch or LAZY_BATCH
    unit = unit.detach()
    n, dim = unit.shape
    keep = np.float32(1.0 - lam)
    first = int(torch.argmax(imp))
    relevance_t = imp.detach() * lam
    relevance_t[first] = float("-inf")
    value_t = unit @ unit[first]
    bound_t = relevance_t - value_t * (1.0 - lam)
    rel, value, bound, unit_np = relevance_t.numpy(), value_t.numpy(), bound_t.numpy(), unit.numpy()
    seen = np.ones(n, dtype=np.int64)
    pending_t = torch.empty(min(LAZY_PENDING, k), dim, dtype=unit.dtype)
    pending = pending_t.numpy()
    picks = [first]
    base = 1  # picks[:base] are seen by every candidate; the rows of picks[base:] are in `pending`
    # The hot set in preallocated slots: ids, rows, similarities to each other, each id's slot (-1: not hot).
    # Hot candidates are always fresh, so a refresh (stale ones, at most batch + 1) never repeats one; picked
    # ones stay, at -inf, until the next eviction.
    room = min(LAZY_HOT + batch + 1, n)
    hot_ids = np.zeros(room, dtype=np.int64)
    hot_rows_t = torch.empty(room, dim, dtype=unit.dtype)
    hot_rows = hot_rows_t.numpy()
    hot_sim = np.zeros((room, room), dtype=np.float32)
    slot = np.full(n, -1, dtype=np.int64)
    h = 0

    def evict(r: int) -> None:
        """Make room for `r` more, keeping the highest bounds (at most `LAZY_HOT`)."""
        nonlocal h
        stay_n = min(h, LAZY_HOT, room - r)
        stay = np.sort(np.argpartition(bound[hot_ids[:h]], h - stay_n)[h - stay_n :]) if stay_n else slot[:0]
        slot[hot_ids[:h]] = -1
        hot_ids[:stay_n] = hot_ids[stay]
        hot_rows[:stay_n] = hot_rows[stay]
        hot_sim[:stay_n, :stay_n] = hot_sim[np.ix_(stay, stay)]
        slot[hot_ids[:stay_n]] = np.arange(stay_n)
        h = stay_n

    def refresh(idx: np.ndarray) -> None:
        nonlocal h
        t = len(picks)
        r = idx.shape[0]
        if h + r > room:
            evict(r)
        hot_rows[h : h + r] = unit_np[idx]
        rows = hot_rows_t[h : h + r]
        start = int(seen[idx].min())
        sims = rows @ pending_t[start - base : t - base].T
        fresh = np.maximum(value[idx], sims.numpy().max(axis=1))
        value[idx] = fresh
        bound[idx] = rel[idx] - fresh * keep
        seen[idx] = t
        # join the hot set: the new rows against the old hot rows and themselves
        cross = (rows @ hot_rows_t[: h + r].T).numpy()
        hot_sim[h : h + r, : h + r] = cross
        hot_sim[:h, h : h + r] = cross[:, :h].T
        hot_ids[h : h + r] = idx
        slot[idx] = np.arange(h, h + r)
        h += r

    for t in range(1, k):
        j = _lazy_argmax(bound, seen, t, refresh, batch)
        pending[t - base] = unit_np[j]
        picks.append(j)
        rel[j] = -np.inf
        if t + 1 - base < pending.shape[0]:
            bound[j] = -np.inf
            if h:
                # every hot candidate brought up to date with pick j
                ids = hot_ids[:h]
                col = hot_sim[:h, slot[j]] if slot[j] >= 0 else (hot_rows_t[:h] @ unit[j]).numpy()
                fresh = np.maximum(value[ids], col)
                value[ids] = fresh
                bound[ids] = rel[ids] - fresh * keep
                seen[ids] = t + 1
            continue
        # every candidate brought up to date at once
        torch.maximum(value_t, (unit @ pending_t.T).max(dim=1).values, out=value_t)
        torch.sub(relevance_t, value_t * (1.0 - lam), out=bound_t)
        base = t + 1
        seen.fill(base)
    return torch.sort(torch.tensor(picks, dtype=torch.long, device=unit.device)).values
