"""SparseVLM (code v1.5) selection building blocks against brute-force loops written from the method's description.

The policy itself is not registered yet (its merged tokens need rows inserted
into the sequence inside the LLM); these cover raters, the tables, top-k and
DPC-KNN recycling on LLaVA-1.5 geometry (576 tokens) and a Qwen-like 1024.
"""

from __future__ import annotations

import math

import pytest
import torch

from vtprune.ops.sparsevlm import counts_after, dpc_knn_merge, prune_stage, raters, stage_counts


def test_tables_and_counts():
    assert [stage_counts(k, 576) for k in (64, 128, 192)] == [(66, 30, 17), (303, 110, 36), (300, 200, 110)]
    assert stage_counts(64, 1152) == (132, 60, 34)
    assert stage_counts(None, 576, budgets=(238, 48, 26)) == (238, 48, 26)
    assert [counts_after(576, stage_counts(k, 576)) for k in (64, 128, 192)] == [[82, 32, 18], [312, 117, 39], [309, 204, 113]]
    assert counts_after(576, (66, 30, 17), recycle=False) == [66, 30, 17]
    # the averages the tables are named by: equal tokens (2, 4, 9, 17 layers) and the 32-layer mean (3, 4, 9, 16)
    for keep, equal, mean in [(64, 64.8, 82.2), (128, 128.6, 145.4), (192, 192.0, 206.5)]:
        n1, n2, n3 = counts_after(576, stage_counts(keep, 576))
        assert round((2 * 576 + 4 * n1 + 9 * n2 + 17 * n3) / 32, 1) == equal
        assert round((3 * 576 + 4 * n1 + 9 * n2 + 16 * n3) / 32, 1) == pytest.approx(mean, abs=0.06)
    with pytest.raises(ValueError, match="tables"):
        stage_counts(100, 576)


def _raters_oracle(v, t):
    m = [0.0] * len(t)
    for row in v:
        logits = [sum(a * b for a, b in zip(row, col)) for col in t]
        mx = max(logits)
        ex = [math.exp(x - mx) for x in logits]
        s = sum(ex)
        for j in range(len(t)):
            m[j] += ex[j] / s / len(v)
    mean = sum(m) / len(m)
    return [j for j in range(len(t)) if m[j] > mean]


@pytest.mark.parametrize("n", [576, 1024])
def test_raters_equal_the_oracle(n):
    g = torch.Generator().manual_seed(n)
    v, t = torch.randn(n, 16, generator=g) * 0.5, torch.randn(30, 16, generator=g) * 0.5
    assert raters(v, t).tolist() == _raters_oracle(v.tolist(), t.tolist())


def _dpc_oracle(x, c, noise):
    r, d = len(x), len(x[0])
    dist = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(x[i], x[j]))) / math.sqrt(d) for j in range(r)] for i in range(r)]
    density = [math.exp(-sum(v * v for v in sorted(dist[i])[:c]) / c) + noise[i] for i in range(r)]
    top = max(max(row) for row in dist)
    delta = [min([dist[i][j] for j in range(r) if density[j] > density[i]], default=top) for i in range(r)]
    score = [delta[i] * density[i] for i in range(r)]
    centres = sorted(range(r), key=lambda i: (-score[i], i))[:c]
    assign = []
    for i in range(r):
        if i in centres:
            assign.append(centres.index(i))
        else:
            assign.append(min(range(c), key=lambda a: (dist[centres[a]][i], a)))
    merged = []
    for a in range(c):
        members = [x[i] for i in range(r) if assign[i] == a]
        merged.append([sum(col) / (len(members) + 1e-6) for col in zip(*members)])
    return merged, centres


def _stage_oracle(score, hidden, k, noise):
    n = len(score)
    order = sorted(range(n), key=lambda j: (-score[j], j))
    kept = sorted(order[: min(k, n - 1)])
    pruned = [j for j in range(n) if j not in kept]
    count = int(len(pruned) * 0.3) + 1
    recycled = sorted(pruned, key=lambda j: (-score[j], j))[:count]
    c = int(count / 10) + 1
    merged, centres = _dpc_oracle([hidden[j] for j in recycled], c, noise)
    return kept, merged, [recycled[i] for i in centres]


@pytest.mark.parametrize("n,keep", [(576, 64), (576, 128), (576, 192), (1024, 64)])
def test_first_stage_and_recycling_equal_the_oracle(n, keep):
    g = torch.Generator().manual_seed(keep + n)
    k = stage_counts(keep, n)[0]
    score, hidden = torch.rand(n, generator=g), torch.randn(n, 12, generator=g)
    noise = torch.rand(n, generator=g) * 1e-6
    kept, merged, centres = prune_stage(score, hidden, k, True, noise)
    want_kept, want_merged, want_centres = _stage_oracle(score.tolist(), hidden.tolist(), k, noise.tolist())
    assert kept.tolist() == want_kept and centres.tolist() == want_centres
    torch.testing.assert_close(merged, torch.tensor(want_merged), rtol=1e-5, atol=1e-6)
    assert kept.numel() + merged.shape[0] == counts_after(n, (k,))[0]


def test_every_stage_with_recycling_equals_the_oracle():
    """Three stages on 576: merged tokens join the next stage's candidates (scored like the kept ones)."""
    g = torch.Generator().manual_seed(5)
    n, hidden = 576, torch.randn(576, 12, generator=g)
    for k in stage_counts(128, 576):
        score = torch.rand(n, generator=g)
        noise = torch.rand(n, generator=g) * 1e-6
        kept, merged, _ = prune_stage(score, hidden, k, True, noise)
        want_kept, want_merged, _ = _stage_oracle(score.tolist(), hidden.tolist(), k, noise.tolist())
        assert kept.tolist() == want_kept
        hidden = torch.cat([hidden[kept], merged])
        n = hidden.shape[0]
    assert n == 39


def test_without_recycling_and_a_single_token():
    score, hidden = torch.tensor([0.3, 0.1, 0.3, 0.2]), torch.randn(4, 3)
    kept, merged, centres = prune_stage(score, hidden, 2, False)
    assert kept.tolist() == [0, 2] and merged is None and centres is None
    kept, merged, _ = prune_stage(score, hidden, 10, True, torch.zeros(4))
    assert kept.tolist() == [0, 2, 3] and merged.shape == (1, 3)  # min(K, n - 1): one token always pruned
    torch.testing.assert_close(merged[0], hidden[1] / (1 + 1e-6))
    merged, centres = dpc_knn_merge(hidden[:1], 1, torch.zeros(1))
    assert centres.tolist() == [0]
