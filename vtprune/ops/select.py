"""Deterministic top-k used by every score-based policy."""

from __future__ import annotations

import warnings

import torch


def sanitize_scores(scores: torch.Tensor, what: str = "scores") -> torch.Tensor:
    """fp32 copy of `scores` with NaN/inf replaced so that selection stays deterministic.

    NaN becomes -inf's finite stand-in (never preferred), +inf the largest
    finite value. A warning names how many entries were bad.
    """
    # Upcast low precisions; float64 scores (matrix entropy) are ranked as they are.
    scores = scores if scores.dtype == torch.float64 else scores.float()
    if bool(torch.isfinite(scores.sum())):  # fast path: a finite sum means every entry is finite
        return scores
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        warnings.warn(
            f"{int(bad.sum())} non-finite {what} replaced (NaN -> lowest, +inf -> highest) for a deterministic selection",
            RuntimeWarning,
            stacklevel=3,
        )
        finfo = torch.finfo(scores.dtype)
        scores = torch.nan_to_num(scores, nan=finfo.min, posinf=finfo.max, neginf=finfo.min)
    return scores


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` largest scores, ascending; ties go to the lowest index."""
    scores = sanitize_scores(scores)
    k = min(k, scores.numel())
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values
