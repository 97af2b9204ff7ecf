"""HoloV's chunk selection and CDPruner's conditional DPP against brute-force reimplementations.

The oracles are written from the methods' descriptions (plain loops; the DPP
by its Schur-complement definition in float64, not the incremental
Cholesky), on LLaVA-1.5 geometry (576 tokens, width 4096 after the
projector) at keep 64/128/192 and on a Qwen2.5-VL-like image (1008 merged
tokens, width 3584). Inputs are continuous random fp32, so no tie decides.
"""

import math

import pytest
import torch

from vtprune.ops.dpp import (
    cdpruner_select,
    dpp_greedy_map,
    minmax_clip,
    minmax_llm,
    relevance_clip,
    relevance_llm,
    split_halves,
    view_budgets,
)
from vtprune.ops.holov import holov_allocate, holov_chunk_sizes, holov_num_chunks, holov_select

GEOMETRIES = [(576, 4096, 64), (576, 4096, 128), (576, 4096, 192), (1008, 3584, 252), (1008, 3584, 101)]


def structured_features(seed, n, dim, rank=24):
    """Low-rank rows plus noise: correlated tokens, as projector outputs are (random rows would be near-orthogonal)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g)
    w = torch.randn(rank, dim, generator=g)
    return z @ w / math.sqrt(rank) + 0.5 * torch.randn(n, dim, generator=g)


def peaked_attention(seed, n, peaked=True):
    """A softmax row; `peaked` puts a few strong spots in (chunk overflow happens)."""
    g = torch.Generator().manual_seed(seed + 100)
    logits = torch.randn(n, generator=g)
    if peaked:
        hot = torch.randint(0, n, (6,), generator=g)
        logits[hot] += 6.0
        logits[hot[0] : hot[0] + 30] += 4.0
    return torch.softmax(logits, dim=0)


# --- HoloV oracle -----------------------------------------------------------


def holov_oracle(features, attention, keep, overflow):
    """HoloV written from its description with plain loops (float64 where it sums), indices ascending."""
    n = features.shape[0]
    if keep >= n:
        return list(range(n)), n
    chunks = max(1, int(((1024 / 576) * n) / keep))
    base, extra = n // chunks, n % chunks
    bounds, start = [], 0
    for p in range(chunks):
        size = base + (1 if p < extra else 0)
        if size:
            bounds.append((start, start + size))
        start += size
    f = features.double()
    a = attention.double()
    scores = []
    for lo, hi in bounds:
        m = hi - lo
        if m == 1:
            scores.append(float(a[lo]))
            continue
        units = torch.stack([f[i] / (f[i].norm() + 1e-6) for i in range(lo, hi)])
        sims = [[0.0 if i == j else float(s) for j, s in enumerate(units @ units[i])] for i in range(m)]
        means = [sum(row) / (m - 1) for row in sims]
        vars_ = [sum((s - means[i]) ** 2 for s in sims[i]) / (m - 1) for i in range(m)]
        att = [1000.0 * float(a[lo + i]) for i in range(m)]
        scale = (sum(abs(x) for x in att) / m) / (sum(abs(v) for v in vars_) / m + 1e-6)
        scores.append(sum(att[i] + 0.09 * vars_[i] * scale for i in range(m)) / m)
    total = sum(scores) + 1e-6
    weights = [s / total for s in scores]
    alloc = [math.floor(w * keep) for w in weights]
    by_weight = sorted(range(len(weights)), key=lambda c: (-weights[c], c))
    for c in by_weight[: max(0, keep - sum(alloc))]:
        alloc[c] += 1
    sizes = [hi - lo for lo, hi in bounds]
    overflowed = sum(max(0, al - s) for al, s in zip(alloc, sizes))
    alloc = [min(al, s) for al, s in zip(alloc, sizes)]
    if overflow == "redistribute":
        left = keep - sum(alloc)
        for c in by_weight:
            take = min(left, sizes[c] - alloc[c])
            alloc[c] += take
            left -= take
    kept = []
    for (lo, hi), al in zip(bounds, alloc):
        ranked = sorted(range(lo, hi), key=lambda i: (-float(a[i]), i))
        kept.extend(ranked[:al])
    return sorted(kept), overflowed


@pytest.mark.parametrize("n,dim,keep", GEOMETRIES)
def test_holov_select_matches_oracle(n, dim, keep):
    seen_overflow = 0
    for seed in range(3):
        features = structured_features(seed, n, dim)
        attention = peaked_attention(seed, n, peaked=seed > 0)
        for overflow in ("redistribute", "drop"):
            got = holov_select(features, attention, keep, overflow).tolist()
            want, overflowed = holov_oracle(features, attention, keep, overflow)
            assert got == want
            assert len(got) == (keep if overflow == "redistribute" else keep - overflowed)
        seen_overflow += overflowed
    assert seen_overflow > 0  # the peaked inputs exercise the overflow rule


def test_holov_budget_arithmetic():
    assert [holov_num_chunks(576, k) for k in (64, 128, 192)] == [16, 8, 5]
    assert holov_chunk_sizes(576, 16) == [36] * 16
    assert holov_chunk_sizes(576, 8) == [72] * 8
    assert holov_chunk_sizes(576, 5) == [116, 115, 115, 115, 115]
    assert [holov_num_chunks(2880, k) for k in (64, 128, 192, 160, 320, 640)] == [80, 40, 26, 32, 16, 8]
    # more chunks than tokens: single-token chunks, the empty ones dropped
    assert holov_chunk_sizes(10, 28) == [1] * 10


def test_holov_allocation_rules():
    # floor, then one left-over token each to the largest weights (ties: lowest chunk), not largest remainders
    w = torch.tensor([0.26, 0.26, 0.24, 0.24])
    assert holov_allocate(w, [50] * 4, 10, "drop") == [3, 3, 2, 2]
    w = torch.tensor([0.30, 0.29, 0.21, 0.20])  # largest remainder would be chunk 1 (2.9); the largest weight is chunk 0
    assert holov_allocate(w, [50] * 4, 10, "drop") == [4, 2, 2, 2]
    # overflow: chunk 0 wants 8 of its 3 tokens
    w = torch.tensor([0.8, 0.1, 0.1])
    assert holov_allocate(w, [3, 10, 10], 10, "drop") == [3, 1, 1]
    assert holov_allocate(w, [3, 10, 10], 10, "redistribute") == [3, 6, 1]


# --- CDPruner oracle --------------------------------------------------------


def dpp_oracle(kernel, k):
    """Greedy MAP by definition: each step the candidate with the largest Schur complement
    ``L_jj - L_jS L_SS^-1 L_Sj`` (the gain in log det), float64, ties to the lowest index."""
    L = kernel.double()
    n = L.shape[0]
    picked = []
    for _ in range(k):
        if picked:
            idx = torch.tensor(picked)
            sol = torch.linalg.solve(L[idx][:, idx], L[idx])  # (|S|, n)
            gain = torch.diagonal(L) - (L[idx] * sol).sum(0)
        else:
            gain = torch.diagonal(L).clone()
        best, best_j = None, None
        for j in range(n):
            if j in picked:
                continue
            if best is None or float(gain[j]) > best:
                best, best_j = float(gain[j]), j
        picked.append(best_j)
    return sorted(picked)


def kernel_oracle(features, relevance, weight=1.0):
    f = features.double()
    unit = f / f.norm(dim=1, keepdim=True)
    sim = unit @ unit.T
    r = relevance.double()
    cond = r[:, None] * sim * r[None, :]
    return cond if weight == 1.0 else (1 - weight) * sim + weight * cond


def relevance_llm_oracle(features, text):
    t = text.double().mean(0)
    t = t / t.norm()
    raw = [float(features[i].double() @ t / features[i].double().norm()) for i in range(features.shape[0])]
    lo, hi = min(raw), max(raw)
    return torch.tensor([(x - lo) / (hi - lo + 1e-6) for x in raw], dtype=torch.float64)


@pytest.mark.parametrize("n,dim,keep", GEOMETRIES)
@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_cdpruner_select_matches_oracle(n, dim, keep, weight):
    for seed in range(2):
        features = structured_features(seed, n, dim)
        text = structured_features(seed + 50, 12, dim)
        rel = minmax_llm(relevance_llm(features, text))
        assert torch.allclose(rel.double(), relevance_llm_oracle(features, text), atol=1e-5)
        got = cdpruner_select(features, rel, keep, weight).tolist()
        assert got == dpp_oracle(kernel_oracle(features, rel, weight), keep)


def test_cdpruner_split_is_two_problems():
    n, dim, keep = 576, 4096, 64
    features = structured_features(7, n, dim)
    text = structured_features(8, 5, dim)
    (n1, k1), (n2, k2) = split_halves(n, keep)
    assert (n1, k1, n2, k2) == (288, 32, 288, 32)
    assert split_halves(577, 65) == ((288, 32), (289, 33))
    halves = []
    for lo, hi, k in ((0, n1, k1), (n1, n, k2)):
        rel = relevance_llm_oracle(features[lo:hi], text)
        halves += [lo + j for j in dpp_oracle(kernel_oracle(features[lo:hi], rel), k)]
    got = []
    for lo, hi, k in ((0, n1, k1), (n1, n, k2)):
        rel = minmax_llm(relevance_llm(features[lo:hi], text))
        got += (cdpruner_select(features[lo:hi], rel, k) + lo).tolist()
    assert got == sorted(halves)


def test_clip_relevance_sign_and_asymmetric_eps():
    g = torch.Generator().manual_seed(3)
    image, text = torch.randn(20, 16, generator=g), torch.randn(3, 16, generator=g)
    raw = relevance_clip(image, text)
    want = []
    for i in range(20):
        cs = [float(image[i] @ text[m] / (image[i].norm() * text[m].norm())) for m in range(3)]
        want.append(-sum(cs) / 3)
    assert torch.allclose(raw.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6)
    lo, hi = min(want), max(want)
    norm = minmax_clip(raw)
    want_norm = torch.tensor([(x - lo + 1e-6) / (hi - lo) for x in want], dtype=torch.float64)
    assert torch.allclose(norm.double(), want_norm, atol=1e-5)
    assert float(norm.min()) > 0  # the eps in the numerator: the least relevant token keeps a nonzero kernel row


def test_dpp_rank_deficient_falls_back_to_relevance():
    # rank-2 kernel, budget 4: two picks by the DPP, then the most relevant unpicked tokens
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.01], [0.7, 0.7], [0.01, 1.0]])
    rel = torch.tensor([1.0, 0.9, 0.8, 0.5, 0.6])
    with pytest.warns(RuntimeWarning, match="rank"):
        got = cdpruner_select(feats, rel, 4).tolist()
    first = dpp_greedy_map(kernel_oracle(feats, rel).float(), 1).tolist()
    assert first == [0]
    assert 0 in got and 1 in got and len(got) == 4
    assert got == [0, 1, 2, 4]  # after 0 and 1: relevance 0.8 (token 2), 0.6 (token 4)


def test_view_budgets():
    assert view_budgets([576] * 5, 160) == [32] * 5
    assert view_budgets([576] * 5, 64) == [16, 12, 12, 12, 12]
    assert view_budgets([576, 10, 576], 90) == [50, 10, 30]  # the small view passes 20 on, base view first
    assert view_budgets([5, 100], 40) == [5, 35]
    assert sum(view_budgets([3, 4], 100)) == 7
