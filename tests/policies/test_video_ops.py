"""The video methods' selection math against brute-force loops written from the methods' descriptions.

Real video geometry (Qwen: 8 slots of 16 x 16 merged tokens; LLaVA-OneVision:
16 frames of 14 x 14 pooled tokens), random fp32 features. The oracles
compute every score in float64 one cell at a time and rank with Python's
sort on (score, index): ties to the lowest flat index.
"""

from __future__ import annotations

import math

import pytest
import torch

from vtprune.ops.video import (
    dycoke_count,
    dycoke_select,
    evs_count,
    evs_select,
    vidcom2_frame_budgets,
    vidcom2_scores,
    vidcom2_select,
    vidcom2_target,
)

QWEN = (8, 256)
OV = (16, 196)
D = 48


def video(t, p, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    # a moving scene: each frame is the previous one plus noise of random size per cell
    x = torch.randn(1, p, d, generator=g).repeat(t, 1, 1)
    drift = torch.randn(t, p, d, generator=g) * torch.rand(t, p, 1, generator=g)
    return (x + drift.cumsum(0)).float()


def cos64(a, b, eps=1e-8):
    a, b = a.double(), b.double()
    return float(a @ b) / (max(float(a.norm()), eps) * max(float(b.norm()), eps))


def best(scores, n, largest=True):
    """Indices of the first n by score (descending if largest), ties to the lowest index."""
    sign = -1 if largest else 1
    return sorted(sorted(range(len(scores)), key=lambda j: (sign * scores[j], j))[:n])


# --- EVS ---------------------------------------------------------------------------------------------
def evs_oracle(x, keep):
    t, p, _ = x.shape
    n = t * p
    count = max(p, min(keep, n)) if isinstance(keep, int) else max(p, int(n * keep))
    scores = []
    for f in range(t):
        for c in range(p):
            scores.append(math.inf if f == 0 else 1 - cos64(x[f, c], x[f - 1, c]))
    return best(scores, count)


@pytest.mark.parametrize("geometry", [QWEN, OV])
@pytest.mark.parametrize("keep", [0.5, 0.25, 0.1, 300])
def test_evs_matches_its_oracle(geometry, keep):
    x = video(*geometry, seed=1)
    got = evs_select(x, keep).tolist()
    assert got == evs_oracle(x, keep)
    assert got[: geometry[1]] == list(range(geometry[1]))  # frame 0 whole


def test_evs_static_video_breaks_ties_by_lowest_index():
    # one-hot cells (cosine exactly 1): every later score is exactly 0, so only the tie rule decides
    x = torch.nn.functional.one_hot(torch.arange(196) % 8, 8).float().repeat(16, 1, 1)
    kept = evs_select(x, 0.25).tolist()
    assert kept == list(range(784))  # earlier frames, upper-left cells first
    assert kept == evs_oracle(x, 0.25)


@pytest.mark.parametrize(
    "t,p,table",
    [
        (8, 256, {0.5: 1024, 0.25: 512, 0.1: 256, 0.05: 256}),
        (16, 196, {0.5: 1568, 0.25: 784, 0.1: 313, 0.05: 196}),
        (32, 196, {0.5: 3136, 0.25: 1568, 0.1: 627, 0.05: 313}),
    ],
)
def test_evs_budget_table(t, p, table):
    for keep, count in table.items():
        assert evs_count(t, p, keep) == count
    assert evs_count(t, p, 5) == p and evs_count(t, p, 10**6) == t * p


# --- VidCom2 -----------------------------------------------------------------------------------------
def vidcom2_oracle(x, keep, budget):
    t, p, d = x.shape
    n = t * p
    r = keep / n if isinstance(keep, int) else keep
    rows = [x[f, c].double() for f in range(t) for c in range(p)]
    var = []
    for ch in range(d):
        col = [float(row[ch]) for row in rows]
        mean = sum(col) / n
        var.append(sum((v - mean) ** 2 for v in col) / n)
    chans = best(var, d // 2, largest=False)
    normed = []
    for row in rows:
        sel = row[chans]
        normed.append(sel / max(float(sel.norm()), 1e-12))
    centre = sum(normed) / n
    frame_centre = [sum(normed[f * p : (f + 1) * p]) / p for f in range(t)]

    def g(a, c):
        dist = float(((a - c) ** 2).sum())
        return sum(math.exp(-dist / (2 * al)) for al in (1 / 8, 1 / 4, 1 / 2, 1, 2))

    v = [g(normed[j], centre) for j in range(n)]
    u = [v[j] + g(normed[j], frame_centre[j // p]) for j in range(n)]
    s = [-sum(v[f * p : (f + 1) * p]) / p for f in range(t)]
    e = [math.exp((si - max(s)) / 0.01) for si in s]
    prob = [ei / sum(e) for ei in e]
    ks = [max(1, round(min(1.0, r * (1 + pt - 1 / t)) * p)) for pt in prob]
    kept = []
    for f in range(t):
        kept += [f * p + c for c in best(u[f * p : (f + 1) * p], ks[f], largest=False)]
    if budget == "exact":
        target = max(t, min(keep if isinstance(keep, int) else int(n * keep), n))
        order = sorted(range(n), key=lambda j: (u[j], j))
        keptset = set(kept)
        if len(kept) > target:
            ranked = [j for j in order if j in keptset]
            kept = ranked[:target]
        elif len(kept) < target:
            kept = kept + [j for j in order if j not in keptset][: target - len(kept)]
    return sorted(kept), ks


@pytest.mark.parametrize("geometry", [QWEN, OV])
@pytest.mark.parametrize("keep", [0.25, 0.1, 0.6, 333])
@pytest.mark.parametrize("budget", ["reference", "exact"])
def test_vidcom2_matches_its_oracle(geometry, keep, budget):
    x = video(*geometry, seed=2)
    want, ks = vidcom2_oracle(x, keep, budget)
    v, _ = vidcom2_scores(x)
    assert vidcom2_frame_budgets(v, keep / x[..., 0].numel() if isinstance(keep, int) else keep) == ks
    got = vidcom2_select(x, keep, budget).tolist()
    assert got == want
    if budget == "exact":
        assert len(got) == vidcom2_target(*geometry, keep)
    else:
        assert len(got) == sum(ks)


def _frame_scores(t, s):
    """A (T, P) v whose per-frame means are s (each row constant)."""
    return torch.tensor(s, dtype=torch.float32)[:, None].expand(t, 64).contiguous()


@pytest.mark.parametrize(
    "t,p,keep,equal,dominant,exact",
    [
        (16, 196, 0.25, 784, 785, 784),
        (16, 196, 0.15, 464, 477, 470),
        (8, 256, 0.25, 512, 512, 512),
        (8, 256, 0.10, 208, 202, 204),
        (8, 256, 0.60, 1232, 1194, 1228),
    ],
)
def test_vidcom2_budget_table(t, p, keep, equal, dominant, exact):
    v = torch.zeros(t, p)
    assert sum(vidcom2_frame_budgets(v, keep)) == equal
    v[3] = -5.0  # frame 3's score -mean(v) dominates: softmax at temperature 0.01 is one-hot
    ks = vidcom2_frame_budgets(v, keep)
    assert sum(ks) == dominant and ks[3] == max(ks)
    assert vidcom2_target(t, p, keep) == exact


def test_vidcom2_keeps_one_token_per_frame_at_least():
    x = video(8, 256, seed=3)
    kept = vidcom2_select(x, 1)
    assert torch.bincount(kept // 256, minlength=8).tolist() == [1] * 8


# --- DyCoke ------------------------------------------------------------------------------------------
def dycoke_oracle(x, keep):
    t, p, _ = x.shape
    n = keep // t if isinstance(keep, int) else int(keep * p)
    kept = {f: list(range(p)) for f in range(t)}
    for i in range(0, t - 1, 2):
        kept[i + 1] = best([cos64(x[i, c], x[i + 1, c]) for c in range(p)], n, largest=False)
    i = 0
    while i < t - 4:
        kept[i + 2] = best([cos64(x[i, c], x[i + 2, c]) for c in range(p)], n, largest=False)
        i += 4
    return sorted(f * p + c for f in range(t) for c in kept[f])


@pytest.mark.parametrize("geometry", [QWEN, OV, (15, 196), (4, 196), (1, 196), (3, 64)])
@pytest.mark.parametrize("keep", [0.3, 100])
def test_dycoke_matches_its_oracle(geometry, keep):
    x = video(*geometry, seed=4)
    assert dycoke_select(x, keep).tolist() == dycoke_oracle(x, keep)


@pytest.mark.parametrize(
    "t,p,count,whole",
    [
        (15, 196, 1560, [0, 4, 8, 12, 14]),
        (16, 196, 1618, [0, 4, 8, 12, 14]),
        (32, 196, 3098, [0, 4, 8, 12, 16, 20, 24, 28, 30]),
        (8, 256, 1148, [0, 4, 6]),
    ],
)
def test_dycoke_budget_table(t, p, count, whole):
    assert dycoke_count(t, p, 0.3) == int(0.3 * p) == int((1 - 0.7) * p)
    kept = dycoke_select(video(t, p, seed=5, d=8), 0.3)
    assert kept.numel() == count
    per_frame = torch.bincount(kept // p, minlength=t).tolist()
    assert [f for f in range(t) if per_frame[f] == p] == whole
    assert all(c == int(0.3 * p) for f, c in enumerate(per_frame) if f not in whole)


def test_full_budget_keeps_every_token():
    x = video(8, 256, seed=6, d=8)
    for fn in (evs_select, dycoke_select, lambda a, k: vidcom2_select(a, k, "exact"), vidcom2_select):
        assert fn(x, 1.0).tolist() == list(range(2048))
        assert fn(x, 2048).tolist() == list(range(2048))


# --- FastVID (LLaVA-OneVision path) ------------------------------------------------------------------
def fastvid_oracle(x, g, a, keep, noise, c=8, tau=0.9, d=0.4, stride=4, beta=0.6):
    t, p, dim = x.shape
    x = x.double()
    gn = [g[f].double() / float(g[f].double().norm()) for f in range(t)]
    sim = [float(gn[f] @ gn[f + 1]) for f in range(t - 1)]
    cuts = set(best(sim, c - 1, largest=False)) | {f for f in range(t - 1) if sim[f] < tau}
    if t - 1 < c - 1:
        cuts = set(range(t - 1))
    segments, run = [], 0
    for f in range(t):
        run += 1
        if f in cuts or f == t - 1:
            segments.append(run)
            run = 0
    r = int(p * keep)
    s = r - int(r * d)
    ctx = r - s
    slots, raw = [], []
    for length in segments:
        for j in range(length):
            n = (ctx * length) // math.ceil(length / stride) if (length - 1 - j) % stride == 0 else 0
            raw.append(n)
            slots.append(min(n, p - s))
    kept = {}
    rest, score = [], []
    for f in range(t):
        top = best(a[f].tolist(), s)
        for i in top:
            kept[f * p + i] = x[f, i]
        others = [i for i in range(p) if i not in top]
        rows = x[f, others]
        dist = [(((rows - rows[k]) ** 2).sum(1).sqrt() / math.sqrt(dim)).tolist() for k in range(len(others))]
        rho = [math.exp(-sum(v * v for v in sorted(row)[:4]) / 4) + 1e-6 * float(noise[f, k]) for k, row in enumerate(dist)]
        big = max(max(row) for row in dist)
        delta = [min([dist[k][m] for m in range(len(others)) if rho[m] > rho[k]], default=big) for k in range(len(others))]
        rest.append(others)
        score.append([delta[k] * rho[k] for k in range(len(others))])
    start = 0
    for length in segments:
        frames = list(range(start, start + length))
        for f in frames:
            if not slots[f]:
                continue
            targets = best(score[f], slots[f])
            tvec = [x[f, rest[f][k]] for k in targets]
            pool = [x[f, i] for i in rest[f]] if raw[f] == ctx else [x[h, i] for h in frames for i in rest[h]]
            members = {k: [] for k in range(len(targets))}
            tmat = torch.stack(tvec)
            for v in pool:
                cos = ((tmat @ v) / (tmat.norm(dim=1) * v.norm())).tolist()
                members[best(cos, 1)[0]].append(v)
            for k, tk in enumerate(targets):
                n = len(members[k])
                w = max(beta, 1 / (n + 1))
                mean = sum(members[k]) / n if n else 0 * tvec[k]
                kept[f * p + rest[f][tk]] = w * tvec[k] + (1 - w) * mean
        start += length
    order = sorted(kept)
    return order, torch.stack([kept[i] for i in order]).float(), segments


@pytest.mark.parametrize("t,keep,tau", [(16, 0.10, 0.9), (16, 0.25, 0.999), (6, 0.10, 0.9)])
def test_fastvid_ov_matches_its_oracle(t, keep, tau):
    from vtprune.ops.video import fastvid_counts, fastvid_noise, fastvid_ov_select

    x = video(t, 196, seed=7, d=16)
    gen = torch.Generator().manual_seed(8)
    g = x.mean(1) + 0.05 * torch.randn(t, 16, generator=gen)
    a = torch.rand(t, 196, generator=gen)
    s, _ = fastvid_counts(196, keep, 0.4)
    noise = fastvid_noise(t, 196 - s, seed=0)
    idx, values, merged, _ = fastvid_ov_select(x, g, a, keep, noise, tau=tau)
    want, want_values, segments = fastvid_oracle(x, g, a, keep, noise, tau=tau)
    assert idx.tolist() == want
    torch.testing.assert_close(values, want_values, rtol=1e-5, atol=1e-5)
    assert int(merged.sum()) == idx.numel() - t * s
    if t == 16 and tau == 0.999:
        assert len(segments) > 8  # the similarity threshold cut more than the c - 1 gaps


def test_fastvid_budget_tables():
    from vtprune.ops.video import fastvid_anchor_slots, fastvid_counts

    assert fastvid_counts(196, 0.10, 0.4) == (12, 7)
    for length, anchors, a in ((1, 1, 7), (4, 1, 28), (5, 2, 17), (8, 2, 28), (25, 7, 25)):
        slots = fastvid_anchor_slots([length], 7, 4)
        assert [x for x in slots if x] == [a] * anchors and slots[-1] == a
    assert sum(fastvid_anchor_slots([4] * 8, 7, 4)) + 32 * 12 == 608 == 32 * 19
    assert fastvid_counts(196, 0.5, 0.4) == (59, 39)
    assert fastvid_anchor_slots([4], 39, 4) == [0, 0, 0, 156]  # above P - S = 137: capped by the selection


def test_fastvid_retained_per_frame():
    from vtprune.ops.video import fastvid_retained

    assert fastvid_retained(16, 196, 0.10) == 19 and fastvid_retained(16, 196, 320) == 20
    assert fastvid_retained(8, 256, 0.27) == 69 and fastvid_retained(8, 256, 4000) == 256


# --- FastVID (Qwen2.5-VL path) -----------------------------------------------------------------------
def fastvid_qwen_oracle(x, g, a, keep, seed=0, c=8, tau=0.84, ignore=0.95, d=0.4, stride=4, beta=0.6):
    """The Qwen path from its description, one token at a time in float64: (kept, rows, salient, context)."""
    t, p, dim = x.shape
    x = x.double()
    gn = [g[f].double() / float(g[f].double().norm()) for f in range(t)]
    sim = [float(gn[f] @ gn[f + 1]) for f in range(t - 1)]
    cuts = set(best(sim, c - 1, largest=False)) | {f for f in range(t - 1) if sim[f] < tau}
    if t - 1 < c - 1:
        cuts = set(range(t - 1))
    segments, run = [], []
    for f in range(t):
        run.append(f)
        if f in cuts or f == t - 1:
            segments.append(run)
            run = []
    r = keep // t if isinstance(keep, int) else int(p * keep)
    sal, ctx = [0] * t, [0] * t
    for seg in segments:
        held = r * len(seg)
        c_seg = max(int(held * d), 1)
        s_seg = held - c_seg
        if len(seg) == 1:
            sal[seg[0]], ctx[seg[0]] = s_seg, c_seg
            continue
        runs, cur = [], []
        for k, f in enumerate(seg):
            cur.append(f)
            if k == len(seg) - 1 or sim[f] < ignore:
                runs.append(cur)
                cur = []
        v = len(runs)
        s_run = [s_seg // v + (1 if j < s_seg % v else 0) for j in range(v)]
        anchors = [j for j in range(v) if (v - 1 - j) % stride == 0]  # counted from the last run
        n_a = len(anchors)
        # remainder one each to the anchors nearest the end
        share = {j: c_seg // n_a + (1 if (n_a - 1 - k) < c_seg % n_a else 0) for k, j in enumerate(anchors)}
        for j, frames in enumerate(runs):
            last = frames[-1]
            if j in share:
                ctx[last] = min(share[j], p // 2)
                sal[last] = min(s_run[j], p - ctx[last])
            else:
                sal[last] = min(s_run[j], p)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        noise = {f: torch.rand(1, p - sal[f])[0] for f in range(t) if ctx[f] > 0}
    kept = {}
    for seg in segments:
        salient, targets = set(), {}
        for f in seg:
            top = best(a[f].tolist(), sal[f])
            salient |= {f * p + i for i in top}
            for i in top:
                kept[f * p + i] = x[f, i]
            if ctx[f]:
                others = [i for i in range(p) if i not in top]
                rows = x[f, others]
                dist = [(((rows - rows[k]) ** 2).sum(1).sqrt() / math.sqrt(dim)).tolist() for k in range(len(others))]
                rho = [
                    math.exp(-sum(v * v for v in sorted(row)[:4]) / 4) + 1e-6 * float(noise[f][k]) for k, row in enumerate(dist)
                ]
                big = max(max(row) for row in dist)
                delta = [
                    min([dist[k][m] for m in range(len(others)) if rho[m] > rho[k]], default=big) for k in range(len(others))
                ]
                targets[f] = sorted(f * p + others[k] for k in best([delta[k] * rho[k] for k in range(len(others))], ctx[f]))
        flat = x.reshape(t * p, dim)
        seg_tokens = [f * p + i for f in seg for i in range(p)]
        for chosen in targets.values():
            pool = [j for j in seg_tokens if j not in salient and j not in chosen]
            tmat = flat[chosen]
            members = {k: [] for k in range(len(chosen))}
            for j in pool:
                v = flat[j]
                cos = ((tmat @ v) / (tmat.norm(dim=1) * v.norm())).tolist()
                members[best(cos, 1)[0]].append(v)
            for k, target in enumerate(chosen):
                n = len(members[k])
                w = max(beta, 1 / (n + 1))
                kept[target] = w * flat[target] + (1 - w) * (sum(members[k]) / n if n else 0 * flat[target])
    order = sorted(kept)
    return order, torch.stack([kept[i] for i in order]).float(), sal, ctx


def runs_video(t, p, d, runs, seed):
    """Frames in runs of near-duplicates (each run one scene plus small per-frame noise): FastVID's sub-runs."""
    gen = torch.Generator().manual_seed(seed)
    frames = []
    for length in runs:
        base = torch.randn(p, d, generator=gen)
        frames += [base + 0.01 * torch.randn(p, d, generator=gen) for _ in range(length)]
    assert len(frames) == t
    return torch.stack(frames)


@pytest.mark.parametrize("case", ["qwen8", "qwen16_runs", "qwen16_static", "qwen3", "int_keep"])
def test_fastvid_qwen_matches_its_oracle(case):
    from vtprune.ops.video import fastvid_qwen_select

    options = {}
    if case == "qwen8":  # the default: c = 8 cuts every gap of 8 slots
        x, keep = video(8, 256, seed=11, d=16), 0.27
    elif case == "qwen16_runs":  # 16 slots in runs of near-duplicates; few cuts, so segments hold several runs
        x, keep = runs_video(16, 256, 16, (3, 1, 5, 2, 4, 1), seed=12), 0.27
        options = dict(c=2, tau=0.0)
    elif case == "qwen16_static":  # one static segment: every cap binds
        x, keep = runs_video(16, 256, 16, (16,), seed=13), 0.27
        options = dict(c=1, tau=0.0)
    elif case == "qwen3":  # fewer slots than segments
        x, keep = video(3, 256, seed=14, d=16), 0.1
    else:
        x, keep = runs_video(8, 256, 16, (2, 2, 4), seed=15), 600
        options = dict(c=2, tau=0.0, stride=1)
    t, p, _ = x.shape
    gen = torch.Generator().manual_seed(16)
    g = x.mean(1)
    a = torch.rand(t, p, generator=gen)
    pick = fastvid_qwen_select(x, g, a, keep, seed=3, **options)
    want, values, sal, ctx = fastvid_qwen_oracle(x, g, a, keep, seed=3, **options)
    assert pick.indices.tolist() == want
    torch.testing.assert_close(pick.values, values, rtol=1e-5, atol=1e-5)
    assert int(pick.merged.sum()) == sum(ctx) and pick.indices.numel() == sum(sal) + sum(ctx)
    if case == "qwen16_static":
        assert sal == [0] * 15 + [128] and ctx == [0] * 15 + [128]  # 256, not 16 x 69
    if case == "qwen16_runs":
        assert sum(1 for n in sal if n) > 2 and sum(1 for n in ctx if n) >= 2


def test_fastvid_qwen_budget_tables():
    from vtprune.ops.video import fastvid_qwen_budgets

    def g_of(*sims):  # frame-global features whose adjacent cosines are `sims`
        angles = torch.tensor([0.0, *torch.tensor(sims).acos().cumsum(0).tolist()], dtype=torch.float64)
        return torch.stack([angles.cos(), angles.sin()], dim=1).float()

    eight = g_of(*[0.5] * 7)
    assert fastvid_qwen_budgets(eight, 256, 0.27) == ([1] * 8, [42] * 8, [27] * 8)  # 552 of 2048
    assert fastvid_qwen_budgets(g_of(0.9), 256, 0.27, c=1, tau=0.0) == ([2], [42, 41], [0, 55])  # two distinct slots
    assert fastvid_qwen_budgets(g_of(0.99), 256, 0.27, c=1, tau=0.0) == ([2], [0, 83], [0, 55])  # near-duplicates
    static = fastvid_qwen_budgets(g_of(*[1.0] * 15), 256, 0.27, c=1, tau=0.0)
    assert static == ([16], [0] * 15 + [128], [0] * 15 + [128])  # 256, not 16 x 69 = 1104
    # five distinct slots, stride 4: anchors are runs 0 and 4 (from the last), C_seg = 138 split 69 + 69
    five = fastvid_qwen_budgets(g_of(*[0.9] * 4), 256, 0.27, c=1, tau=0.0)
    assert five == ([5], [42, 42, 41, 41, 41], [69, 0, 0, 0, 69])
    assert sum(five[1]) + sum(five[2]) == 5 * 69


def test_fastvid_noise_leaves_the_callers_rng_alone():
    from vtprune.ops.video import fastvid_noise_rows

    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    rows = fastvid_noise_rows([4, 2], seed=0)
    assert torch.equal(torch.rand(3), want)
    torch.manual_seed(0)
    assert torch.equal(rows[0], torch.rand(1, 4)[0]) and torch.equal(rows[1], torch.rand(1, 2)[0])
