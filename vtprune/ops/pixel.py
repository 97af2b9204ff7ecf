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
    return (x - y).abs().amax(dim=-1) <= tau


def pred2d_keep(units: torch.Tensor, tau: float = 0.0) -> torch.Tensor:
    """Which merge units of one grid to keep: ``units`` ``(h, w, D)`` (pixel values in [0, 1]) -> bool ``(h, w)``."""
    if units.dim() != 3:
        raise ValueError(f"pred2d_keep needs a (h, w, D) grid of units; got shape {tuple(units.shape)}")
    if tau < 0:
        raise ValueError(f"tau must be >= 0; got {tau}")
    units = units.float()
    if tau == 0:
        return _keep_exact(units)
    return _keep_anchored(units, float(tau))


def _keep_exact(g: torch.Tensor) -> torch.Tensor:
    h, w, _ = g.shape
    keep = torch.zeros(h, w, dtype=torch.bool, device=g.device)
    keep[0, 0] = True
    if w > 1:
        keep[0, 1:] = ~_match(g[0, 1:], g[0, :-1], 0.0)
    if h > 1:
        keep[1:, 0] = ~_match(g[1:, 0], g[:-1, 0], 0.0)
    if h > 1 and w > 1:
        a, b, c = g[1:, :-1], g[:-1, 1:], g[:-1, :-1]
        use_b = _match(c, a, 0.0) & ~_match(c, b, 0.0)
        pred = torch.where(use_b[..., None], b, a)
        keep[1:, 1:] = ~_match(g[1:, 1:], pred, 0.0)
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
