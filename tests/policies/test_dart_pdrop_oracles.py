"""DART and PyramidDrop selection against brute-force loops written from the methods' descriptions, fp32.

Geometry: LLaVA-1.5 (576 image tokens after a 35-token system prompt, a
question after it) and a Qwen2.5-VL-like image (1024 tokens). The oracles
are plain Python loops: ties to the lowest index, cosine as
``x.y / max(|x| |y|, 1e-8)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from vtprune.budget import resolve_budget
from vtprune.ops.dart import dart_pivot_order, dart_quotas, dart_select
from vtprune.policies.pdrop import pdrop_counts

# ---------------------------------------------------------------- DART


def _argmax_loop(values, excluded=()):
    best = None
    for j, v in enumerate(values):
        if j in excluded:
            continue
        if best is None or v > values[best]:
            best = j
    return best


def _cos(x, y):
    dot = sum(a * b for a, b in zip(x, y))
    nx = math.sqrt(sum(a * a for a in x))
    ny = math.sqrt(sum(b * b for b in y))
    return dot / max(nx * ny, 1e-8)


def _dart_oracle(key_l1, feats, text_l1, text_feats, keep, image_offset, text_offsets, budget, image_positions=None):
    """DART from its description: 4 + 4 pivots, a Python set of their positions, keep // 8 lowest cosines each."""
    n = len(key_l1)
    if image_positions is None:
        image_positions = [image_offset + i for i in range(n)]
    img_piv = []
    for _ in range(min(4, n)):
        img_piv.append(_argmax_loop(key_l1, set(img_piv)))
    txt_piv = []
    for _ in range(min(4, len(text_l1))):
        txt_piv.append(_argmax_loop(text_l1, set(txt_piv)))
    pivots = {}
    for i in img_piv:
        pivots[image_positions[i]] = feats[i]
    for j in txt_piv:
        pivots[text_offsets[j]] = text_feats[j]
    order = list(set([image_positions[i] for i in img_piv] + [text_offsets[j] for j in txt_piv]))
    topk = keep // 8
    remaining = keep - len(img_piv)
    pool = [j for j in range(n) if j not in img_piv]
    kept = list(img_piv)
    for p in order:
        quota = topk if budget == "reference" else min(topk, remaining)
        sims = [(_cos(feats[j], pivots[p]), j) for j in pool]
        sims.sort()  # lowest cosine first, lowest index on equal cosine
        picks = [j for _, j in sims[:quota]]
        remaining -= len(picks)
        pool = [j for j in pool if j not in picks]
        kept += picks
    return sorted(kept)


def _dart_tensors(n, m, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(n, generator=g) * 100,
        torch.randn(n, dim, generator=g),
        torch.rand(m, generator=g) * 100,
        torch.randn(m, dim, generator=g),
    )


@pytest.mark.parametrize("keep,expected", [(64, 68), (128, 132), (192, 196)])
@pytest.mark.parametrize("seed", [0, 1])
def test_dart_reference_budget_equals_the_oracle_on_llava_geometry(keep, expected, seed):
    n, m, offset = 576, 40, 35
    key, feats, tkey, tfeats = _dart_tensors(n, m, 64, seed)
    text_offsets = torch.arange(offset + n, offset + n + m)
    got = dart_select(key, feats, tkey, tfeats, keep, image_positions=offset + torch.arange(n), text_positions=text_offsets)
    want = _dart_oracle(
        key.tolist(), feats.tolist(), tkey.tolist(), tfeats.tolist(), keep, offset, text_offsets.tolist(), "reference"
    )
    assert got.tolist() == want
    assert len(want) == expected


@pytest.mark.parametrize("keep", [64, 128, 192, 70])
def test_dart_exact_budget_equals_the_oracle_and_keeps_keep(keep):
    n, m, offset = 576, 40, 35
    key, feats, tkey, tfeats = _dart_tensors(n, m, 64, keep)
    text_offsets = torch.arange(offset + n, offset + n + m)
    got = dart_select(
        key, feats, tkey, tfeats, keep, image_positions=offset + torch.arange(n), text_positions=text_offsets, budget="exact"
    )
    assert got.numel() == keep
    if keep % 8 <= 4:  # the oracle only trims (the exact budget raises the first quotas when keep % 8 > 4)
        want = _dart_oracle(
            key.tolist(), feats.tolist(), tkey.tolist(), tfeats.tolist(), keep, offset, text_offsets.tolist(), "exact"
        )
        assert got.tolist() == want


@pytest.mark.parametrize("ratio,expected", [(0.889, 116), (0.778, 228), (0.667, 340)])
def test_dart_on_qwen_geometry_keeps_the_reference_counts(ratio, expected):
    n, m, offset = 1024, 30, 15
    key, feats, tkey, tfeats = _dart_tensors(n, m, 48, 7)
    keep = resolve_budget(round(1 - ratio, 3), n, n, "floor")
    text_offsets = torch.arange(offset + n + 1, offset + n + 1 + m)  # <|vision_end|> sits between
    got = dart_select(key, feats, tkey, tfeats, keep, image_positions=offset + torch.arange(n), text_positions=text_offsets)
    want = _dart_oracle(
        key.tolist(), feats.tolist(), tkey.tolist(), tfeats.tolist(), keep, offset, text_offsets.tolist(), "reference"
    )
    assert got.tolist() == want and len(want) == expected


def test_dart_budget_tables():
    assert [4 + sum(dart_quotas(k, 8, 4, "reference")) for k in (64, 128, 192)] == [68, 132, 196]
    assert [4 + sum(dart_quotas(k, 8, 4, "exact")) for k in (64, 128, 192)] == [64, 128, 192]
    assert dart_quotas(64, 8, 4, "exact") == [8] * 7 + [4]
    assert 4 + sum(dart_quotas(320, 8, 4, "reference")) == 324  # the LLaVA-NeXT default
    assert dart_quotas(70, 8, 4, "exact") == [9, 9] + [8] * 6  # 66 picks


def test_dart_pivot_order_is_a_python_set_and_sorted_is_ascending():
    image, text = [35 + 400, 35 + 3, 35 + 100, 35 + 250], [650, 620, 640, 611]
    assert dart_pivot_order(image, text, "reference") == list(set(image + text))
    assert dart_pivot_order(image, text, "sorted") == sorted(image + text)
    assert dart_pivot_order(image, text, "reference") != sorted(image + text)  # the order differs here


def test_dart_small_pool_and_few_text_tokens():
    key, feats, tkey, tfeats = _dart_tensors(20, 2, 8, 3)
    got = dart_select(key, feats, tkey, tfeats, 16, image_positions=torch.arange(20), text_positions=torch.tensor([21, 22]))
    want = _dart_oracle(key.tolist(), feats.tolist(), tkey.tolist(), tfeats.tolist(), 16, 0, [21, 22], "reference")
    assert got.tolist() == want and len(want) == 4 + 6 * 2
    got = dart_select(key, feats, tkey, tfeats, 20, image_positions=torch.arange(20), text_positions=torch.tensor([21, 22]))
    assert got.numel() == 20
    # 6 pivots taking 16 // 8 = 2 each leave 12 of the 16 pooled tokens: 16 kept
    got = dart_select(key, feats, tkey, tfeats, 19, image_positions=torch.arange(20), text_positions=torch.tensor([21, 22]))
    assert got.numel() == 16
    # quotas as large as the pool (10 tokens, 6 in the pool, 6 pivots x 9 // 8 at keep 9): all 10 kept, never more
    got = dart_select(
        key[:10], feats[:10], tkey, tfeats, 9, image_positions=torch.arange(10), text_positions=torch.tensor([21, 22])
    )
    assert got.tolist() == list(range(10))


# ---------------------------------------------------------------- PyramidDrop


def test_pdrop_counts_table():
    # the reference: int(N * r) per stage; keep replaces the last stage and every stage is at least keep
    assert pdrop_counts(576, (0.5, 0.25, 0.125), None) == [288, 144, 72]
    assert pdrop_counts(576, (0.5, 0.25, 0.125), 64) == [288, 144, 64]
    assert pdrop_counts(576, (0.5, 0.25, 0.125), 128) == [288, 144, 128]
    assert pdrop_counts(576, (0.5, 0.25, 0.125), 192) == [288, 192, 192]
    assert pdrop_counts(2928, (0.5, 0.25, 0.125), None) == [1464, 732, 366]
    layers = [8, 8, 8, 8]
    counts = [576, *pdrop_counts(576, (0.5, 0.25, 0.125), 64)]
    assert sum(c * n for c, n in zip(counts, layers)) / 32 == 268
    counts = [576, *pdrop_counts(576, (0.5, 0.25, 0.125), None)]
    assert sum(c * n for c, n in zip(counts, layers)) / 32 == 270


def _pdrop_row_oracle(h, wq, wk, cos, sin, last, heads, kv_heads):
    """The last token's causal attention row, loops over heads and keys; RoPE as rotate-half; mean over heads."""
    L, d = h.shape[0], wq.shape[0] // heads

    def rope(v, p):
        half = d // 2
        rot = [-v[half + t] for t in range(half)] + [v[t] for t in range(half)]
        return [v[t] * cos[p][t] + rot[t] * sin[p][t] for t in range(d)]

    q = (wq @ h[last]).tolist()
    ks = (h @ wk.T).tolist()
    row = [0.0] * L
    for head in range(heads):
        kvh = head // (heads // kv_heads)
        qh = rope(q[head * d : (head + 1) * d], last)
        logits = []
        for j in range(last + 1):
            kh = rope(ks[j][kvh * d : (kvh + 1) * d], j)
            logits.append(sum(a * b for a, b in zip(qh, kh)) / math.sqrt(d))
        mx = max(logits)
        ex = [math.exp(v - mx) for v in logits]
        s = sum(ex)
        for j in range(last + 1):
            row[j] += ex[j] / s / heads
    return row


@pytest.mark.parametrize("n,keep_count", [(576, 288), (576, 144), (1024, 512)])
def test_pdrop_stage_keep_set_equals_the_oracle(n, keep_count):
    from vtprune.ops.probe import causal_rows
    from vtprune.ops.select import topk_indices

    g = torch.Generator().manual_seed(n + keep_count)
    heads, kv_heads, d, start, m = 4, 2, 8, 35, 20
    L = start + n + m
    h = torch.randn(L, 32, generator=g)
    wq, wk = torch.randn(heads * d, 32, generator=g), torch.randn(kv_heads * d, 32, generator=g)
    pos = torch.arange(L, dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], dim=-1)
    cos, sin = ang.cos(), ang.sin()
    last = L - 1
    q = (h[last:] @ wq.T).view(1, heads, d)
    k = (h @ wk.T).view(L, kv_heads, d)
    row = causal_rows(q, k, cos, sin, torch.tensor([last]), None, d**-0.5)[0]
    got = topk_indices(row[start : start + n], keep_count)
    want_row = _pdrop_row_oracle(h, wq, wk, cos.tolist(), sin.tolist(), last, heads, kv_heads)
    image = want_row[start : start + n]
    want = sorted(sorted(range(n), key=lambda j: (-image[j], j))[:keep_count])
    assert got.tolist() == want
