"""PixelPrune's 2-D predictive coding of merge units (which units a decoder could not predict from its neighbours).

Source: PixelPrune (OPPO, 2026; code OPPO-Mente-Lab/PixelPrune,
``pixelprune/methods/pred_2d.py``): a LOCO-I style predictor on the grid of
merge units. The top-left unit is always kept; in the first row a unit is
predicted by its left neighbour A, in the first column by the unit above B;
elsewhere, with C above-left, the prediction is B when C matches A and not
B (a vertical edge), otherwise A. A unit is dropped when it matches its
prediction: max absolute difference <= ``tau``. At ``tau == 0`` matching is
exact equality, which is transitive, so predicting from the original
neighbours (one vectorised pass) equals predicting from the reconstruction.
At ``tau > 0`` the scan follows the reference's anchored mode: neighbours are
the reconstructed units (a dropped unit is reconstructed as its prediction),
so the reconstruction error never exceeds ``tau`` anywhere.
"""

from __future__ import annotations

import torch


def _match(x: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    if tau == 0:
        return (x == y).all(dim=-1)  # exact: no arithmetic, any dtype
    return (x - y).abs().amax(dim=-1) <= tau


def pred2d_keep(units: torch.Tensor, tau: float = 0.0) -> torch.Tensor:
    """Which merge units of one grid to keep: ``units`` ``(h, w, D)`` (pixel values in [0, 1]) -> bool ``(h, w)``.

    At ``tau == 0`` the values may be in any affine form of [0, 1] (the
    processor's normalised pixels): equality is the same.
    """
    if units.dim() != 3:
        raise ValueError(f"pred2d_keep needs a (h, w, D) grid of units; got shape {tuple(units.shape)}")
    if tau < 0:
        raise ValueError(f"tau must be >= 0; got {tau}")
    if tau == 0:
        return _keep_exact(units)
    return _keep_anchored(units.float(), float(tau))


def _keep_exact(g: torch.Tensor) -> torch.Tensor:
    """Exact matching from two neighbour comparisons: each unit against its left and its upper neighbour.

    With C above-left, A left and B above of X: C~A is the upper pair of A's
    column, C~B the left pair of B's row, X~A and X~B X's own pairs.
    """
    h, w, _ = g.shape
    left = (g[:, 1:] == g[:, :-1]).all(dim=-1)  # (h, w-1): unit (r, c+1) equals (r, c)
    up = (g[1:] == g[:-1]).all(dim=-1)  # (h-1, w): unit (r+1, c) equals (r, c)
    keep = torch.zeros(h, w, dtype=torch.bool, device=g.device)
    keep[0, 0] = True
    keep[0, 1:] = ~left[0]
    keep[1:, 0] = ~up[:, 0]
    if h > 1 and w > 1:
        use_b = up[:, :-1] & ~left[:-1]  # C equals A and not B: a vertical edge, B predicts
        keep[1:, 1:] = ~torch.where(use_b, up[:, 1:], left[1:])
    return keep


def _keep_anchored(g: torch.Tensor, tau: float) -> torch.Tensor:
    h, w, _ = g.shape
    keep = torch.zeros(h, w, dtype=torch.bool)
    recon = g.clone()

    def match(x: torch.Tensor, y: torch.Tensor) -> bool:
        return bool((x - y).abs().amax() <= tau)

    for r in range(h):
        for c in range(w):
            if r == 0 and c == 0:
                keep[0, 0] = True
                continue
            if r == 0:
                pred = recon[0, c - 1]
            elif c == 0:
                pred = recon[r - 1, 0]
            else:
                a, b, cc = recon[r, c - 1], recon[r - 1, c], recon[r - 1, c - 1]
                pred = b if (match(cc, a) and not match(cc, b)) else a
            if match(g[r, c], pred):
                recon[r, c] = pred
            else:
                keep[r, c] = True
    return keep.to(g.device)
