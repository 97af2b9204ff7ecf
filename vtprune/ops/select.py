"""Deterministic top-k used by every score-based policy."""

from __future__ import annotations

import warnings

import torch


def replace_nonfinite(x: torch.Tensor, what: str, done: str, fix) -> torch.Tensor:
    """`x`, or ``fix(x, bad)`` where some entries are NaN/inf, warning ``"N non-finite <what> <done> ..."``.

    A finite sum means every entry is finite (one reduction instead of a mask
    of the whole tensor); a non-finite sum (a bad entry, or an overflow of
    large finite ones) falls back to the full check. The warning points at
    the caller of the function that called this one.
    """
    if bool(torch.isfinite(x.sum())):
        return x
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        warnings.warn(f"{int(bad.sum())} non-finite {what} {done} for a deterministic selection", RuntimeWarning, stacklevel=4)
        x = fix(x, bad)
    return x


def sanitize_scores(scores: torch.Tensor, what: str = "scores") -> torch.Tensor:
    """fp32 copy of `scores` with NaN/inf replaced so that selection stays deterministic.

    NaN becomes -inf's finite stand-in (never preferred), +inf the largest
    finite value. A warning names how many entries were bad.
    """
    # Upcast low precisions; float64 scores (matrix entropy) are ranked as they are.
    scores = scores if scores.dtype == torch.float64 else scores.float()
    finfo = torch.finfo(scores.dtype)
    return replace_nonfinite(
        scores,
        what,
        "replaced (NaN -> lowest, +inf -> highest)",
        lambda x, _bad: torch.nan_to_num(x, nan=finfo.min, posinf=finfo.max, neginf=finfo.min),
    )


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` largest scores, ascending; ties go to the lowest index."""
    scores = sanitize_scores(scores)
    k = min(k, scores.numel())
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values
