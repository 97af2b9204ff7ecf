"""Matrix entropy of each token's query vectors (EntropyPrune).

Source: "EntropyPrune: Matrix Entropy Guided Visual Token Pruning for
Multimodal Large Language Models" (code YahongWang1/EntropyPrune). A token's
queries form an ``H x d`` matrix (heads x head_dim). Its score is the
normalised von Neumann entropy of the covariance of that matrix: spread
over many directions means high entropy, a few dominant directions low.
"""

from __future__ import annotations

import math

import torch

from .greedy import finite_fp32

NORMALIZATIONS = (None, "trace")
#: eigenvalues are clamped here before the log (the reference's value)
EIGEN_FLOOR = 1e-10


def validate_normalize(normalize: object) -> str | None:
    """Return `normalize` if it is an accepted option, else raise naming the allowed values."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}; got {normalize!r}")
    return normalize


def matrix_entropy(queries: torch.Tensor, normalize: str | None = None, chunk: int = 4096) -> torch.Tensor:
    """Per-token matrix entropy of ``queries`` ``(n, H, d)``, in float64, shape ``(n,)``.

    As the reference computes it: centre each column across the H heads
    (``R = Q - mean over heads``); ``G = R R^T / H``, the ``H x H`` dual of
    the ``d x d`` covariance ``R^T R / H`` (same non-zero spectrum, far
    cheaper when ``H < d``); eigenvalues in float64 clamped at 1e-10;
    score ``-sum(l ln l) / ln H``. ``normalize="trace"`` first divides the
    eigenvalues by their sum (a proper spectral distribution; not in the
    reference). RoPE rotates every head of a token by the same orthogonal
    map, so pre- and post-RoPE queries give the same score. Tokens are
    processed `chunk` at a time to bound memory. Non-finite queries are set
    to 0 with a warning.
    """
    validate_normalize(normalize)
    if queries.dim() != 3:
        raise ValueError(f"queries must be (tokens, heads, head_dim); got shape {tuple(queries.shape)}")
    n, heads, _ = queries.shape
    if heads < 2:
        raise ValueError(f"matrix entropy needs at least 2 heads (it is normalised by ln H); got {heads}")
    queries = finite_fp32(queries, "query")
    scores = torch.empty(n, dtype=torch.float64, device=queries.device)
    for start in range(0, n, chunk):
        q = queries[start : start + chunk].double()
        r = q - q.mean(dim=1, keepdim=True)
        gram = (r @ r.transpose(1, 2)) / heads
        lam = torch.linalg.eigvalsh(gram).clamp_min(EIGEN_FLOOR)
        if normalize == "trace":
            lam = lam / lam.sum(dim=-1, keepdim=True)
        scores[start : start + chunk] = -(lam * lam.log()).sum(dim=-1) / math.log(heads)
    return scores
