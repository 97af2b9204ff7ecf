"""Greedy subset selection: the pieces the loops share.

Three loops, each written once in its own module and used by its policy
(and by any later method built on the same idea); this module holds what
they share (similarities, normalisation, input checks, the lazy argmax):

- `vtprune.ops.mmr.mmr_select`: maximal marginal relevance, importance against redundancy
  (IDPruner).
- `vtprune.ops.diversity.divprune_select`: max-min diversity, farthest-point sampling on cosine
  distance (DivPrune).
- `vtprune.ops.coverage.coverage_select`: greedy maximum coverage of a facility-location
  objective (MMTok).

Common rules: the math runs in fp32 on the input's device whatever the input
dtype; ties go to the lowest index (`torch.argmax` and `torch.max` along a
dim return the first maximum); the kept indices come back ascending.
Non-finite inputs are replaced (with a warning) so the result stays
deterministic.

Two forms of each greedy, the same algorithm and the same picks:

- the matrix loops (`mmr_matrix`, DivPrune's, `coverage_eager`): the
  pairwise or coverage matrix once, then running vectors updated in place
  with the picks in a device tensor, so a step never waits on the host (the
  GPU path);
- the exact lazy loops (`mmr_lazy`, `coverage_lazy`), on the CPU where
  they win: a greedy score that can only fall as the picked set grows is
  re-computed only for the candidates whose stale score still tops the
  rest (one host sync per round). Their similarities and gains come from
  products and sums of other shapes than the matrix loops', so a value can
  differ from the matrix's in the last fp32 bit; the picks differ only
  where two candidates tie to within that bit (tests: equal picks on random
  and exactly-representable tie-heavy inputs; `eval/selection_time.py`:
  equal keep sets against the reference loops at 576, 2880 and 8192).
"""

from __future__ import annotations

import numpy as np
import torch

from .select import replace_nonfinite

#: added to feature norms before dividing (the IDPruner reference's cosine)
COSINE_EPS = 1e-8
#: added to the importance range in min-max normalisation (IDPruner reference)
MINMAX_EPS = 1e-6


def finite_fp32(x: torch.Tensor, what: str = "features") -> torch.Tensor:
    """fp32 copy of `x` with NaN/inf entries set to 0, warning when there were any."""
    return replace_nonfinite(
        x.float(), what, "entries set to 0", lambda x, bad: torch.where(bad, torch.zeros((), dtype=x.dtype, device=x.device), x)
    )


def normalize_rows(x: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """Rows of `x` divided by their L2 norm plus `eps`, in fp32."""
    x = x.float()
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor | None = None, eps: float = COSINE_EPS) -> torch.Tensor:
    """Pairwise cosine similarity ``(n, m)`` of the rows of `a` and `b` (``b = a`` when omitted), fp32.

    Uses ``x / (|x| + eps)`` as the IDPruner reference does; the DivPrune and
    MMTok references divide by the bare or clamped norm, which differs only
    for all-zero rows. Without `b` the result is exactly symmetric and is
    built from one triangle of blocks (`self_cosine`).
    """
    an = normalize_rows(a, eps)
    if b is not None:
        return an @ normalize_rows(b, eps).T
    return self_cosine(an)


#: block edge of the triangle products (`self_cosine`, `nearest_other`)
TRIANGLE_BLOCK = 256


def self_cosine(unit: torch.Tensor, block: int = TRIANGLE_BLOCK) -> torch.Tensor:
    """``unit @ unit.T`` for unit-norm rows, computing each block pair once and mirroring it.

    About half the multiply-adds of the full product, no temporary beyond
    one block, and exactly symmetric: a symmetric pair must tie exactly (a
    mutual nearest-neighbour pair is a tie that the lowest index wins); a
    diagonal block, the one place a pair is computed twice, is averaged with
    its transpose (`symmetrize_`).
    """
    n = unit.shape[0]
    sim = torch.empty(n, n, dtype=unit.dtype, device=unit.device)
    for i in range(0, n, block):
        rows = unit[i : i + block]
        for j in range(i, n, block):
            part = rows @ unit[j : j + block].T
            if j == i:
                symmetrize_(part)
            sim[i : i + block, j : j + block] = part
            if j != i:
                sim[j : j + block, i : i + block] = part.T
    return sim


#: block edge of `symmetrize_` (its temporaries are one block, not a second matrix)
SYMMETRIZE_BLOCK = 1024


def symmetrize_(sim: torch.Tensor, block: int = SYMMETRIZE_BLOCK) -> torch.Tensor:
    """``S <- (S + S^T) / 2`` in place, one pair of blocks at a time; returns `sim`.

    The same values as ``(S + S.T.contiguous()) * 0.5`` (IEEE addition is
    commutative) without a second ``N x N`` matrix: the temporaries are one
    block.
    """
    n = sim.shape[0]
    for i in range(0, n, block):
        for j in range(i, n, block):
            upper, lower = sim[i : i + block, j : j + block], sim[j : j + block, i : i + block]
            mean = torch.add(upper, lower.T).mul_(0.5)
            upper.copy_(mean)
            if j != i:
                lower.copy_(mean.T)
    return sim


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


#: `mmr_select` / `coverage_select` run the lazy loop when ``k <= n * LAZY_MAX_FRACTION``; near a full
#: budget nearly every bound goes stale each step and the matrix loop is cheaper
LAZY_MAX_FRACTION = 0.5


def _use_lazy(n: int, k: int, device: torch.device) -> bool:
    # On a GPU the matrix is cheap and the matrix loop never waits on the host; the lazy loop does.
    return device.type == "cpu" and k <= n * LAZY_MAX_FRACTION


def _lazy_argmax(bound: np.ndarray, seen: np.ndarray, t: int, refresh, batch: int) -> int:
    """Index of the largest true value (first maximum) given upper bounds `bound` (updated in place).

    ``seen[i] == t`` marks candidate i's bound as its true value (it has
    seen all `t` picks); `refresh(idx)` (an index array) writes the true
    values of candidates `idx` into `bound` and marks them. The first
    maximum of the bounds is the answer once its bound is true: every other
    true value is at most its bound, and an equal bound at a lower index
    would have come first. Each round refreshes the stale ones among the
    `batch` highest bounds, the first maximum always among them; picked
    candidates sit at ``-inf`` and are never refreshed. The bookkeeping is
    numpy on views of the CPU tensors (a small numpy call costs a fraction
    of a torch call, and a round makes a dozen).
    """
    n = bound.shape[0]
    while True:
        j = int(bound.argmax())
        if seen[j] == t:
            return j
        top = np.argpartition(bound, n - batch)[n - batch :] if batch < n else np.arange(n)
        top = top[(top != j) & (seen[top] != t) & (bound[top] != -np.inf)]
        refresh(np.concatenate((np.array([j]), top)))
