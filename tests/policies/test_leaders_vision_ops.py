"""SCOPE, VisPruner and PruneSID selection math against brute-force oracles written from the methods' definitions.

Geometry: LLaVA-1.5 (576 patches, width 1024, 16 heads; budgets 64/128/192)
and Qwen2.5-VL-like images (merged tokens at the LLM width). Inputs are
continuous random fp32 (low-rank structure plus noise, so similarities are
spread and no tie decides); the oracles are plain loops in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vtprune.ops.leaders import (
    _group_budgets,
    pca_groups,
    prunesid_llava_settings,
    prunesid_qwen_budget,
    prunesid_qwen_select,
    prunesid_select,
    qwen_groups,
    scope_select,
    vispruner_select,
    vispruner_split,
)

BUDGETS = (64, 128, 192)


def clip_like(seed: int, n: int = 576, d: int = 1024, heads: int = 16):
    """(rows with CLS first ``(n+1, d)``, per-head CLS attention to the patches ``(heads, n)``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 1, 24, generator=g) @ torch.randn(24, d, generator=g) + 0.7 * torch.randn(n + 1, d, generator=g)
    x = x + 0.3
    attention = torch.softmax(2 * torch.randn(heads, n + 1, generator=g), dim=-1)[:, 1:]
    return x, attention


# --- oracles (float64, plain loops) -----------------------------------------------------------------------------
def cosine64(x: torch.Tensor) -> np.ndarray:
    v = x.double().numpy()
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    return v @ v.T


def scope_oracle(x, w, k, combine="multi"):
    """Greedy on the soft facility-location objective f(A) = sum_i max(0, max_{s in A} S_is)."""
    s = cosine64(x)
    w = w.double().numpy()
    n = s.shape[0]
    chosen: list[int] = []
    best_cover = np.full(n, -np.inf)  # max over the chosen of S_is, per row i

    def f(cover):
        return float(np.maximum(0, cover).sum())

    base = 0.0
    for _ in range(k):
        best, best_score = None, -math.inf
        for j in range(n):
            if j in chosen:
                continue
            gain = f(np.maximum(best_cover, s[:, j])) - base  # f(A + j) - f(A)
            score = gain * w[j] if combine == "multi" else gain + w[j]
            if score > best_score:  # strict: ties keep the lowest index
                best, best_score = j, score
        chosen.append(best)
        best_cover = np.maximum(best_cover, s[:, best])
        base = f(best_cover)
    return sorted(chosen)


def vispruner_oracle(x, attention, k, ratio):
    # The list order after every round depends on near-ties of max cosines (gaps of 1e-7 on 576 tokens, exact
    # fp32 ties too), so the oracle ranks the same fp32 values: each round's product of the even entries with
    # the odd ones, as the method defines it; the list bookkeeping below is plain Python.
    xn = x / x.norm(dim=-1, keepdim=True)
    a = attention.double().numpy()
    important = int(k * ratio)
    diverse = k - important
    order = sorted(range(len(a)), key=lambda j: (-a[j], j))
    keep, rest = order[:important], order[important:]
    if diverse == 0:
        return sorted(keep)
    while True:
        r = len(rest)
        drop = min(8, r - diverse)
        if drop <= 0:
            break
        evens, odds = rest[0::2], rest[1::2]
        product = (xn[evens] @ xn[odds].T).tolist()
        sim = {e: max(product[row]) for row, e in enumerate(evens)}
        ranked = sorted(evens, key=lambda e: (-sim[e], e))
        rest = ranked[min(drop, len(ranked)) :] + odds
    return sorted(keep + rest)


def round_half_even(v: float) -> int:
    return int(np.round(np.float32(v)))


def budgets_oracle(counts, picks, t, cap, spare):
    lower = [min(1, c) for c in counts]
    upper = [min(cap, c, n) for c, n in zip(counts, picks)]
    while sum(upper) < t:
        upper = [min(u + 1, c) for u, c in zip(upper, counts)]
    m = max(t - sum(lower) - spare, 0)
    share = np.cumsum(np.asarray(picks, dtype=np.float32) / np.float32(sum(picks)), dtype=np.float32)
    r = [round_half_even(np.float32(v) * np.float32(m)) for v in share]
    d = [min(r[g] - (r[g - 1] if g else 0) + lower[g], upper[g]) for g in range(len(counts))]
    for g in sorted(range(len(counts)), key=lambda g: (-picks[g], g)):
        deficit = m + sum(lower) - sum(d)
        if deficit <= 0:
            break
        d[g] += min(upper[g] - d[g], deficit)
    return d


def grouped_oracle(sim, score, group, t, cap, spare, theta, pick_value):
    n = len(score)
    groups = int(max(group)) + 1
    members = [[j for j in range(n) if group[j] == g] for g in range(groups)]
    picks = []
    for mem in members:
        left = {j: float(score[j]) for j in mem}
        order = []
        while any(v > 0 for v in left.values()):
            p = min((j for j in mem if left[j] > 0), key=lambda j: (-left[j], j))
            order.append(p)
            left[p] = 0.0
            for j in mem:
                if sim[p, j] > theta:
                    left[j] = 0.0
        picks.append(order)
    d = budgets_oracle([len(m) for m in members], [len(p) for p in picks], t, cap, spare)
    kept = []
    for g, mem in enumerate(members):
        key = {j: float(score[j]) for j in mem}
        for rank, p in enumerate(picks[g]):
            key[p] = pick_value(n, rank)
        kept += sorted(mem, key=lambda j: (-key[j], j))[: d[g]]
    return sorted(kept)


def prunesid_oracle(x, attention_sum, t, group):
    v = x.double().numpy()
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    sim = v @ v.T
    n = sim.shape[0]
    mean = sum(sim[i, j] for i in range(n) for j in range(i + 1, n)) / (n * (n - 1) / 2)
    theta = t / 32 * mean
    return grouped_oracle(
        sim, attention_sum.double().numpy(), group.tolist(), t, 5 * math.ceil(t / 64), 1, theta, lambda n, rank: 1000 - rank
    )


# --- SCOPE -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", BUDGETS)
def test_scope_matches_the_greedy_coverage_oracle(k):
    x, attention = clip_like(k)
    patches, saliency = x[1:], attention.sum(dim=0)  # CLS row summed over the 16 heads
    got = scope_select(patches, saliency, k)
    assert got.tolist() == scope_oracle(patches, saliency, k)
    assert got.numel() == k and len(set(got.tolist())) == k


def test_scope_add_and_alpha():
    x, attention = clip_like(7, n=144, d=64)
    patches, saliency = x[1:], attention.sum(dim=0)
    assert scope_select(patches, saliency, 20, combine="add").tolist() == scope_oracle(patches, saliency, 20, "add")
    assert scope_select(patches, saliency, 20, alpha=2.0).tolist() == scope_oracle(patches, saliency**2, 20)
    # alpha = 0: saliency ignored, pure coverage; differs from the weighted picks
    assert scope_select(patches, saliency, 20, alpha=0.0).tolist() == scope_oracle(patches, torch.ones(144), 20)


def test_scope_qwen_geometry():
    x, attention = clip_like(3, n=320, d=1280)  # a merged 16 x 20 image, merger-input width
    got = scope_select(x[1:], attention.mean(0), 40)
    assert got.tolist() == scope_oracle(x[1:], attention.mean(0), 40)


# --- VisPruner ---------------------------------------------------------------------------------------------------
def test_vispruner_split_table():
    table = {0.5: [(32, 32), (64, 64), (96, 96)], 0.75: [(48, 16), (96, 32), (144, 48)]}
    for ratio, want in table.items():
        assert [vispruner_split(k, ratio) for k in BUDGETS] == want
    assert vispruner_split(66, 0.5) == (33, 33) and vispruner_split(10, 0.33) == (3, 7)


@pytest.mark.parametrize("ratio", (0.5, 0.75))
@pytest.mark.parametrize("k", BUDGETS)
def test_vispruner_matches_the_pairing_oracle(k, ratio):
    x, attention = clip_like(100 + k)
    patches, mean_attention = x[1:], attention.mean(dim=0)  # CLS row averaged over the 16 heads
    got = vispruner_select(patches, mean_attention, k, ratio)
    assert got.tolist() == vispruner_oracle(patches, mean_attention, k, ratio)
    important = torch.sort(mean_attention, descending=True, stable=True).indices[: int(k * ratio)]
    assert set(important.tolist()) <= set(got.tolist()) and got.numel() == k


@pytest.mark.parametrize("k,ratio", [(66, 0.5), (70, 0.5), (64, 1.0), (64, 0.0), (5, 0.5)])
def test_vispruner_odd_lists_and_extreme_ratios(k, ratio):
    """Odd R (the reference's IndexError), only-important / only-diverse budgets, tiny budgets: exact counts."""
    x, attention = clip_like(11, n=200, d=96)
    got = vispruner_select(x[1:], attention.mean(0), k, ratio)
    assert got.tolist() == vispruner_oracle(x[1:], attention.mean(0), k, ratio)
    assert got.numel() == k


def test_vispruner_qwen_geometry():
    x, attention = clip_like(5, n=333, d=1280)  # odd token count
    got = vispruner_select(x[1:], attention.mean(0), 37, 0.5)
    assert got.tolist() == vispruner_oracle(x[1:], attention.mean(0), 37, 0.5)


def test_vispruner_removes_more_than_a_pairing_can():
    """Tiny lists where a round's 8 exceed the even entries: vtprune removes what there is and keeps the budget."""
    x, attention = clip_like(2, n=12, d=16)
    got = vispruner_select(x[1:], attention.mean(0), 2, 0.0)
    assert got.numel() == 2 and got.tolist() == vispruner_oracle(x[1:], attention.mean(0), 2, 0.0)


# --- PruneSID ----------------------------------------------------------------------------------------------------
def test_prunesid_settings_table():
    assert [prunesid_llava_settings(t) for t in BUDGETS] == [
        {"groups": 16, "ratio": 2.0, "cap": 5},
        {"groups": 32, "ratio": 4.0, "cap": 10},
        {"groups": 48, "ratio": 6.0, "cap": 15},
    ]


def test_prunesid_qwen_budget_table():
    # max(round(M keep / 576), 16), Python rounding (half to even); M <= 16: no pruning
    assert prunesid_qwen_budget(1296, 64) == 144 and prunesid_qwen_budget(1296, 192) == 432
    assert prunesid_qwen_budget(400, 64) == 44 and prunesid_qwen_budget(400, 128) == 89
    assert prunesid_qwen_budget(100, 64) == 16  # round(11.1) = 11 -> 16
    assert prunesid_qwen_budget(18, 16) == 16 and prunesid_qwen_budget(16, 192) == 16 and prunesid_qwen_budget(9, 64) == 9
    assert prunesid_qwen_budget(36, 8) == 16 and prunesid_qwen_budget(1152, 8) == 16  # round(16.0) = 16
    assert prunesid_qwen_budget(2880, 0.1) == 288 and prunesid_qwen_budget(90, 0.25) == 22  # round(22.5) = 22


def test_group_budgets_known_answers():
    # t = 64 (CLS slot: spare 1): 16 groups, cap 5
    counts = [40, 30, 50, 36, 20, 44, 31, 39, 33, 41, 35, 29, 38, 37, 34, 39]
    picks = [3, 6, 2, 7, 1, 5, 4, 8, 3, 2, 6, 4, 5, 3, 7, 2]
    got = _group_budgets(counts, picks, 64, 5, 1)
    assert got == budgets_oracle(counts, picks, 64, 5, 1) and sum(got) == 63
    # groups with few picks: the upper bounds are raised until they cover t
    counts, picks = [10, 1, 3, 0], [1, 1, 1, 0]
    got = _group_budgets(counts, picks, 8, 5, 1)
    assert got == budgets_oracle(counts, picks, 8, 5, 1) and sum(got) == 7 and got[3] == 0


def test_pca_groups_are_seeded_and_leave_the_rng_alone():
    x, _ = clip_like(4)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    a = pca_groups([x[1:]], 16, seed=0)[0]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, pca_groups([x[1:]], 16, seed=0)[0])
    assert not torch.equal(a, pca_groups([x[1:]], 16, seed=1)[0])
    # the definition: argmax |V| of the centred low-rank PCA of sigmoid(X)^T with the seeded global RNG
    with torch.random.fork_rng():
        torch.manual_seed(0)
        _, _, v = torch.pca_lowrank(torch.sigmoid(x[1:]).T, q=16, niter=2)
    assert torch.equal(a, v.abs().argmax(dim=1))


@pytest.mark.parametrize("t", BUDGETS)
def test_prunesid_matches_the_nms_oracle(t):
    x, attention = clip_like(200 + t)
    patches, saliency = x[1:], attention.sum(dim=0)
    group = pca_groups([patches], int(t / 4), seed=0)[0]
    got = prunesid_select(patches, saliency, t, group=group)
    assert got.numel() == t - 1  # keep counts the CLS slot: 63 patches + CLS at 64
    assert got.tolist() == prunesid_oracle(patches, saliency, t, group)
    assert got.tolist() == prunesid_select(patches, saliency, t, seed=0).tolist()  # the same groups when seeded alike


@pytest.mark.parametrize("keep", BUDGETS)
def test_prunesid_qwen_matches_the_oracle(keep):
    x, _ = clip_like(300 + keep, n=400, d=2048)
    x = x[1:]
    t = prunesid_qwen_budget(400, keep)
    group, score = qwen_groups(x, max(int(t / 4), 4), seed=0)
    got = prunesid_qwen_select(x, t, (group, score))
    assert got.numel() == t
    v = x.double().numpy()
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    sim = v @ v.T
    mean = np.triu(sim).sum() / sim.size  # the upper triangle with the diagonal, zeros below, over all M^2
    theta = max(18 * t / 400, 1) * mean
    want = grouped_oracle(
        sim, score.double().numpy(), group.tolist(), t, 5 * math.ceil(t / 64), 0, theta, lambda n, rank: n - rank
    )
    assert got.tolist() == want


def test_prunesid_all_zero_scores_warn_and_keep_the_budget():
    x, _ = clip_like(9, n=64, d=32)
    with pytest.warns(RuntimeWarning, match="every score is 0"):
        got = prunesid_select(x[1:], torch.zeros(64), 16, seed=0)
    assert got.tolist() == list(range(15))


def test_vispruner_exact_ties_go_to_the_lowest_token_index():
    """On these features one round has two candidates with exactly the same fp32 highest cosine; the rounds
    written out with a (-cosine, token index) sort key (the tie rule) give vtprune's keep set, and a stable
    sort by list position (the reference's order) another one: the tie changes every later round."""
    g = torch.Generator().manual_seed(0)
    x, attention = torch.randn(576, 1024, generator=g), torch.rand(576, generator=g)
    unit = x / x.norm(dim=-1, keepdim=True)
    order = torch.sort(attention, descending=True, stable=True).indices
    important, by_index, by_position = order[:32], order[32:], order[32:]
    ties = 0
    while (s := min(8, by_index.numel() - 32)) > 0:
        evens, odds = by_index[0::2], by_index[1::2]
        best = (unit[evens] @ unit[odds].T).max(dim=-1).values.tolist()
        ties += len(best) - len(set(best))
        ranked = sorted(range(len(best)), key=lambda i: (-best[i], int(evens[i])))
        by_index = torch.cat([evens[torch.tensor(ranked[s:], dtype=torch.long)], odds])
        evens, odds = by_position[0::2], by_position[1::2]
        best_p = (unit[evens] @ unit[odds].T).max(dim=-1).values
        by_position = torch.cat([evens[torch.sort(best_p, descending=True, stable=True).indices[s:]], odds])
    assert ties >= 1  # the case this test is about
    got = vispruner_select(x, attention, 64)
    assert torch.equal(got, torch.sort(torch.cat([important, by_index])).values)
    assert not torch.equal(got, torch.sort(torch.cat([important, by_position])).values)
