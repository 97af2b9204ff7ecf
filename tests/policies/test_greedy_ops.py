"""Greedy selection loops, matrix entropy and the query probe against plain, obviously-correct reimplementations."""

import math

import pytest
import torch

from vtprune.ops import greedy
from vtprune.ops.entropy import matrix_entropy
from vtprune.ops.greedy import (
    coverage_select,
    coverage_value,
    divprune_select,
    minmax_normalize,
    mmr_select,
)
from vtprune.ops.select import topk_indices
from vtprune.patches.attention import layer_queries

SEEDS = range(4)


@pytest.fixture(params=["matrix", "lazy"])
def path(request, monkeypatch):
    """Run a test through the matrix loops or through the lazy ones (small batches and hot set, frequent full
    updates)."""
    if request.param == "matrix":
        monkeypatch.setattr(greedy, "LAZY_MAX_FRACTION", 0.0)
    else:
        monkeypatch.setattr(greedy, "LAZY_MAX_FRACTION", 1.0)
        monkeypatch.setattr(greedy, "LAZY_MIN_ENTRIES", 0)
        monkeypatch.setattr(greedy, "LAZY_BATCH", 3)
        monkeypatch.setattr(greedy, "LAZY_HOT", 2)
        monkeypatch.setattr(greedy, "COVERAGE_BATCH", 3)
        monkeypatch.setattr(greedy, "LAZY_PENDING", 4)
    return request.param


def tie_heavy_features(seed, n, dim=6):
    """Rows drawn from a few one-hot and all-zero vectors: every cosine is exactly 0 or 1, many exact ties."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.cat([torch.eye(dim), torch.zeros(1, dim)])
    return basis[torch.randint(0, dim + 1, (n,), generator=g)]


# --- brute force, in float64 python loops ------------------------------------


def cos64(x, y=None):
    x = x.double()
    y = x if y is None else y.double()
    xn = x / (x.norm(dim=1, keepdim=True) + 1e-8)
    yn = y / (y.norm(dim=1, keepdim=True) + 1e-8)
    return (xn @ yn.T).tolist()


def first_argmax(values, skip=()):
    best, best_i = None, None
    for i, v in enumerate(values):
        if i in skip:
            continue
        if best is None or v > best:
            best, best_i = v, i
    return best_i


def brute_mmr(x, importance, k, lam):
    s = cos64(x)
    imp = [float(v) for v in importance.double()]
    lo, hi = min(imp), max(imp)
    imp = [(v - lo) / (hi - lo + 1e-6) for v in imp]
    picked = [first_argmax(imp)]
    while len(picked) < k:
        score = [lam * imp[i] - (1 - lam) * max(s[i][p] for p in picked) for i in range(len(imp))]
        picked.append(first_argmax(score, picked))
    return sorted(picked)


def brute_farthest_point(x, k, seed_index):
    s = cos64(x)
    picked = [seed_index]
    while len(picked) < k:
        picked.append(first_argmax([-max(s[i][p] for p in picked) for i in range(len(s))], picked))
    return sorted(picked)


def brute_divprune(x, k):
    d = [[1 - v for v in row] for row in cos64(x)]
    n = len(d)
    nearest = [min(d[i][j] for j in range(n) if j != i) if n > 1 else math.inf for i in range(n)]
    picked = [first_argmax(nearest)]
    while len(picked) < k:
        picked.append(first_argmax([min(d[i][p] for p in picked) for i in range(n)], picked))
    return sorted(picked)


def brute_coverage(cover, k):
    c = cover.double().tolist()
    rows, n = len(c), len(c[0])
    best = [0.0] * rows
    picked, gains = [], []
    for _ in range(k):
        gain = [sum(max(c[r][j] - best[r], 0.0) for r in range(rows)) for j in range(n)]
        j = first_argmax(gain, picked)
        picked.append(j)
        gains.append(gain[j])
        best = [max(best[r], c[r][j]) for r in range(rows)]
    return picked, gains


def random_cover(seed, n_text, n, dim=24):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(n_text, dim, generator=g)
    vis = torch.randn(n, dim, generator=g)
    pre = torch.randn(n, dim, generator=g)
    t = torch.softmax(greedy.cosine_similarity(text, vis) / 0.05, dim=1) / n_text
    v = 0.5 * torch.softmax(greedy.cosine_similarity(pre) / 0.2, dim=1) / n
    return torch.cat([t, v])


# --- shared behaviour ----------------------------------------------------------


def test_argmax_and_max_return_the_first_maximum():
    # The tie rule of every loop rests on this (documented torch behaviour).
    for n in (5, 64, 1000, 70000):
        x = torch.zeros(n)
        x[[n // 3, n // 2, n - 1]] = 1.0
        assert int(torch.argmax(x)) == n // 3
        assert int(torch.max(x, dim=0).indices) == n // 3


@pytest.mark.parametrize("select", ["mmr", "divprune", "coverage"])
def test_edge_counts_and_bad_k(select):
    x = torch.randn(6, 8)
    run = {
        "mmr": lambda k: mmr_select(x, torch.randn(6), k),
        "divprune": lambda k: divprune_select(x, k),
        "coverage": lambda k: coverage_select(torch.rand(7, 6), k).indices,
    }[select]
    assert run(0).numel() == 0
    assert run(6).tolist() == list(range(6))
    assert run(100).tolist() == list(range(6))
    one = run(1)
    assert one.dtype == torch.long and one.numel() == 1
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="k must be an int >= 0"):
            run(bad)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="2-D"):
        divprune_select(torch.randn(2, 3, 4), 1)
    with pytest.raises(ValueError, match="importance must have shape"):
        mmr_select(torch.randn(5, 3), torch.randn(4), 2)
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
        mmr_select(torch.randn(5, 3), torch.randn(5), 2, lam=1.5)


# --- MMR (IDPruner) ------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_mmr_lam_one_is_topk_by_importance(seed, path):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 16, generator=g)
    imp = torch.randint(0, 6, (40,), generator=g).float()  # many ties
    assert mmr_select(x, imp, 11, lam=1.0).tolist() == topk_indices(imp, 11).tolist()


@pytest.mark.parametrize("seed", SEEDS)
def test_mmr_lam_zero_constant_importance_is_farthest_point(seed, path):
    x = torch.randn(50, 12, generator=torch.Generator().manual_seed(seed))
    got = mmr_select(x, torch.full((50,), 3.0), 9, lam=0.0)
    assert got.tolist() == brute_farthest_point(x, 9, seed_index=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("lam", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (64, 20)])
def test_mmr_matches_brute_force(seed, path, lam, n, k):
    g = torch.Generator().manual_seed(seed)
    x, imp = torch.randn(n, 10, generator=g), torch.randn(n, generator=g)
    assert mmr_select(x, imp, k, lam).tolist() == brute_mmr(x, imp, k, lam)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_mmr_tie_heavy_matches_brute_force(seed, lam, path):
    g = torch.Generator().manual_seed(seed)
    x = tie_heavy_features(seed, 40)
    imp = torch.randint(0, 4, (40,), generator=g).float()
    assert mmr_select(x, imp, 15, lam).tolist() == brute_mmr(x, imp, 15, lam)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("hot", [1, 16, 500])
def test_mmr_lazy_equals_matrix_loop(seed, hot, monkeypatch):
    monkeypatch.setattr(greedy, "LAZY_HOT", hot)  # 500: every refreshed candidate stays hot
    g = torch.Generator().manual_seed(seed)
    x, imp = torch.randn(300, 32, generator=g), torch.randn(300, generator=g)
    unit, norm = greedy.normalize_rows(x), minmax_normalize(imp)
    want = greedy.mmr_matrix(greedy.cosine_similarity(x), norm, 120, 0.5)
    for batch in (1, 8, 64):
        assert torch.equal(greedy.mmr_lazy(unit, norm, 120, 0.5, batch=batch), want)


def test_minmax_normalize():
    out = minmax_normalize(torch.tensor([2.0, 4.0, 3.0]))
    assert torch.allclose(out, torch.tensor([0.0, 2 / (2 + 1e-6), 1 / (2 + 1e-6)]))
    assert minmax_normalize(torch.full((3,), 7.0)).tolist() == [0.0, 0.0, 0.0]


# --- DivPrune ------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,k", [(1, 1), (2, 1), (9, 4), (64, 16)])
def test_divprune_matches_brute_force(seed, path, n, k):
    x = torch.randn(n, 10, generator=torch.Generator().manual_seed(seed))
    assert divprune_select(x, k).tolist() == brute_divprune(x, k)


def test_divprune_duplicates_pick_lowest_index_and_never_repeat(path):
    base = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    x = base.repeat(4, 1)  # tokens 0-2 repeated 4 times
    kept = divprune_select(x, 6)
    assert kept.unique().numel() == 6
    assert kept.tolist()[:3] == [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
def test_divprune_tie_heavy_matches_brute_force(seed, path):
    x = tie_heavy_features(seed, 40)
    assert divprune_select(x, 12).tolist() == brute_divprune(x, 12)


def test_self_cosine_and_symmetrize_equal_the_full_product():
    x = torch.randn(70, 16, generator=torch.Generator().manual_seed(0))
    unit = greedy.normalize_rows(x)
    raw = unit @ unit.T
    sym = greedy.symmetrize_(raw.clone(), block=16)
    assert torch.equal(sym, (raw + raw.T.contiguous()) * 0.5)
    assert torch.equal(sym, sym.T)
    tri = greedy.self_cosine(unit, block=16)
    assert torch.equal(tri, tri.T)
    assert torch.allclose(tri, raw, atol=1e-6)


# --- coverage (MMTok) ------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_text,n,k", [(0, 1, 1), (3, 10, 4), (5, 40, 25)])
def test_coverage_matches_brute_force(seed, path, n_text, n, k):
    cover = random_cover(seed, n_text, n) if n_text else random_cover(seed, 1, n)[1:]
    result = coverage_select(cover, k)
    order, gains = brute_coverage(cover, k)
    assert result.order.tolist() == order
    assert result.indices.tolist() == sorted(order)
    assert torch.allclose(result.gains.double(), torch.tensor(gains, dtype=torch.float64), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_coverage_gains_never_increase_and_totals_are_f(seed, path):
    cover = random_cover(seed, 4, 48)
    result = coverage_select(cover, 30)
    assert bool((result.gains[1:] <= result.gains[:-1] * (1 + 1e-6)).all())
    for t in range(30):
        f = coverage_value(cover, result.order[: t + 1])
        assert torch.allclose(result.totals[t], f, rtol=1e-5)
    assert result.gains[0] == pytest.approx(float(cover.sum(0).max()), rel=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_coverage_compaction_is_exact(seed, monkeypatch):
    cover = random_cover(seed, 6, 64)
    plain = greedy.coverage_eager(cover, 40)
    monkeypatch.setattr(greedy, "COMPACT_MIN_ENTRIES", 0)
    monkeypatch.setattr(greedy, "_FIRST_COMPACTION", 1)
    compacted = greedy.coverage_eager(cover, 40)
    assert compacted.order.tolist() == plain.order.tolist() == brute_coverage(cover, 40)[0]
    assert torch.allclose(compacted.gains, plain.gains, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_coverage_tie_heavy_matches_brute_force(seed, path):
    # small integers: every gain is exact in any summation order, and many tie
    g = torch.Generator().manual_seed(seed)
    cover = torch.randint(0, 4, (12, 30), generator=g).float()
    cover[:, 7] = cover[:, 3]  # duplicate columns
    result = coverage_select(cover, 14)
    order, gains = brute_coverage(cover, 14)
    assert result.order.tolist() == order
    assert result.gains.tolist() == gains


@pytest.mark.parametrize("seed", SEEDS)
def test_coverage_lazy_equals_eager(seed):
    cover = random_cover(seed, 8, 200)
    want = greedy.coverage_eager(cover, 80)
    for batch in (1, 8, 64):
        got = greedy.coverage_lazy(cover, 80, batch=batch)
        assert got.order.tolist() == want.order.tolist()
        assert torch.allclose(got.gains, want.gains, rtol=1e-5, atol=1e-10)


def test_coverage_fully_covered_falls_back_to_lowest_index(path):
    cover = torch.zeros(4, 6)
    cover[:, 3] = 1.0
    assert coverage_select(cover, 3).order.tolist() == [3, 0, 1]


# --- dtype and non-finite inputs ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_select_like_fp32_on_the_same_values(dtype, path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 16, generator=g).to(dtype)
    imp = torch.randn(48, generator=g).to(dtype)
    cover = random_cover(1, 3, 48).to(dtype)
    assert torch.equal(mmr_select(x, imp, 12), mmr_select(x.float(), imp.float(), 12))
    assert torch.equal(divprune_select(x, 12), divprune_select(x.float(), 12))
    assert torch.equal(coverage_select(cover, 12).indices, coverage_select(cover.float(), 12).indices)


def test_nonfinite_inputs_warn_and_stay_deterministic(path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 8, generator=g)
    x[3] = float("nan")
    x[7, 2] = float("inf")
    imp = torch.randn(20, generator=g)
    imp[5] = float("nan")
    cover = random_cover(0, 2, 20)
    cover[0, 4] = float("nan")
    for run in (
        lambda: mmr_select(x, imp, 6),
        lambda: divprune_select(x, 6),
        lambda: coverage_select(cover, 6).indices,
    ):
        with pytest.warns(RuntimeWarning, match="non-finite"):
            first = run()
        with pytest.warns(RuntimeWarning):
            again = run()
        assert torch.equal(first, again)
        assert first.unique().numel() == 6


def test_finite_fast_path_keeps_large_finite_values_silent():
    import warnings

    x = torch.full((4, 3), 3e38)  # the sum overflows; every entry is finite
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(greedy.finite_fp32(x), x)
        assert torch.equal(greedy.sanitize_scores(x[0]), x[0])


# --- matrix entropy -------------------------------------------------------------------


def brute_entropy(q, normalize=None):
    """Entropy of the head_dim x head_dim covariance, keeping its H largest eigenvalues (the dual's spectrum)."""
    out = []
    heads = q.shape[1]
    for token in q.double():
        r = token - token.mean(dim=0, keepdim=True)
        cov = r.T @ r / heads  # d x d: its non-zero spectrum is that of R R^T / H
        lam = torch.linalg.eigvalsh(cov).flip(0)[:heads].clamp_min(1e-10)
        if normalize == "trace":
            lam = lam / lam.sum()
        out.append(float(-(lam * lam.log()).sum() / math.log(heads)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("normalize", [None, "trace"])
def test_entropy_dual_gram_equals_covariance_spectrum(normalize):
    q = torch.randn(9, 6, 16, generator=torch.Generator().manual_seed(0))
    got = matrix_entropy(q, normalize)
    assert got.dtype == torch.float64
    assert torch.allclose(got, brute_entropy(q, normalize), atol=1e-9)


def test_entropy_is_invariant_under_rope():
    g = torch.Generator().manual_seed(1)
    n, heads, d = 7, 4, 8
    q = torch.randn(n, heads, d, generator=g)
    # RoPE: rotate each pair (i, i + d/2) by a per-token angle, the same for every head of the token.
    angle = torch.rand(n, d // 2, generator=g) * 100
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    a, b = q[..., : d // 2], q[..., d // 2 :]
    rotated = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    assert torch.allclose(matrix_entropy(rotated.double()), matrix_entropy(q.double()), atol=1e-9)


def test_entropy_chunks_and_errors():
    q = torch.randn(10, 4, 8)
    assert torch.allclose(matrix_entropy(q, chunk=3), matrix_entropy(q))
    with pytest.raises(ValueError, match="normalize must be one of"):
        matrix_entropy(q, normalize="sum")
    with pytest.raises(ValueError, match="at least 2 heads"):
        matrix_entropy(torch.randn(3, 1, 8))
    with pytest.raises(ValueError, match=r"\(tokens, heads, head_dim\)"):
        matrix_entropy(torch.randn(3, 8))
    bad = q.clone()
    bad[2, 1, 3] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert torch.isfinite(matrix_entropy(bad)).all()


# --- query probe ------------------------------------------------------------------------


def test_layer_queries_llama_and_qwen3():
    from transformers import LlamaConfig, Qwen3Config
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    llama = LlamaDecoderLayer(LlamaConfig(**small), layer_idx=0).eval()
    h = torch.randn(5, 32)
    q = layer_queries(llama, h)
    assert q.shape == (5, 4, 8)
    assert torch.allclose(q, llama.self_attn.q_proj(llama.input_layernorm(h)).view(5, 4, 8))

    qwen3 = Qwen3DecoderLayer(Qwen3Config(**small, head_dim=16), layer_idx=0).eval()
    with torch.no_grad():
        qwen3.self_attn.q_norm.weight.uniform_(0.5, 2.0)
    q = layer_queries(qwen3, h.unsqueeze(0))
    attn = qwen3.self_attn
    expected = attn.q_norm(attn.q_proj(qwen3.input_layernorm(h)).view(5, 4, 16))
    assert q.shape == (1, 5, 4, 16)
    assert torch.allclose(q[0], expected)
