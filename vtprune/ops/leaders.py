"""Selection math of three vision-stage methods: SCOPE, VisPruner and PruneSID.

Pure functions over fp32 tensors of one view (an image, a LLaVA-NeXT crop, a
video frame); the policies in ``vtprune.policies`` read the model's signals
and call them. Common rules: fp32 on the input's device; ties go to the
lowest token index (`torch.argmax` returns the first maximum; sorts are
stable); kept indices come back ascending.

- `scope_select`: saliency-weighted greedy soft coverage (SCOPE, Deng et al.,
  NeurIPS 2025; code kinredon/SCOPE, ``scope/clip_encoder.py``).
- `vispruner_select`: important tokens by attention, then diverse tokens by
  repeatedly removing the most duplicated (VisPruner, Zhang et al., ICCV 2025;
  code Theia-4869/VisPruner, ``llava/model/llava_arch.py``).
- `prunesid_select` / `prunesid_qwen_select`: PCA groups, similarity NMS in each
  group and a budget split in proportion to the survivors (PruneSID, ICLR 2026;
  code ZhengyaoFang/PruneSID, ``prunesid_llava/clip_encoder.py`` and
  ``prunesid_qwen/modeling_qwen2_vl.py``).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from .greedy import finite_fp32
from .select import sanitize_scores, topk_indices


def _descending(scores: torch.Tensor) -> torch.Tensor:
    """Order of `scores`, highest first, ties to the lowest index."""
    return torch.sort(scores, descending=True, stable=True).indices


# --- SCOPE ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def scope_select(
    features: torch.Tensor, saliency: torch.Tensor, k: int, alpha: float = 1.0, combine: str = "multi"
) -> torch.Tensor:
    """SCOPE's greedy picks for one view: ``k`` indices into ``features`` ``(N, D)``, ascending.

    S = cosine of the rows (each row divided by its L2 norm, no eps); w =
    ``saliency ** alpha``; ``k`` times: gain_j = sum_i max(0, S_ij - cover_i),
    score = gain * w (``combine="multi"``) or gain + w (``"add"``), the best
    unpicked j (lowest index on ties) is kept and cover = max(cover, S_j).
    """
    if combine not in ("multi", "add"):
        raise ValueError(f"scope: combine must be 'multi' or 'add'; got {combine!r}")
    x = finite_fp32(features)
    n = x.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    xn = x / x.norm(dim=-1, keepdim=True)
    sim = xn @ xn.T
    w = sanitize_scores(saliency, "saliency").to(x.device) ** alpha
    cover = torch.zeros(n, device=x.device)
    picked = torch.zeros(n, dtype=torch.bool, device=x.device)
    out = torch.empty(k, dtype=torch.long, device=x.device)
    for step in range(k):
        gain = (sim - cover[:, None]).clamp_min(0).sum(dim=0)
        score = gain * w if combine == "multi" else gain + w
        score = score.masked_fill(picked, float("-inf"))
        j = torch.argmax(score)
        out[step] = j
        picked[j] = True
        cover = torch.maximum(cover, sim[j])
    return torch.sort(out).values


# --- VisPruner -----------------------------------------------------------------------------------------------------
def vispruner_split(k: int, important_ratio: float) -> tuple[int, int]:
    """(important, diverse) counts: ``int(k * r)`` (floor) and the rest."""
    important = int(k * important_ratio)
    return important, k - important


@torch.no_grad()
def vispruner_select(
    features: torch.Tensor, attention: torch.Tensor, k: int, important_ratio: float = 0.5, step: int = 8
) -> torch.Tensor:
    """VisPruner's keep set for one view: ``k`` indices into ``features`` ``(N, D)``, ascending.

    Important: the top ``int(k * r)`` by ``attention``. The rest stay in
    attention-descending order; while the list is longer than the diverse
    budget, up to ``step`` entries at even list positions whose highest cosine
    to an odd-position entry is largest are removed, and the list becomes the
    surviving even entries (in that similarity order), then the odd ones.
    """
    x = finite_fp32(features)
    n = x.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    important_count, diverse = vispruner_split(k, important_ratio)
    order = _descending(sanitize_scores(attention, "attention").to(x.device))
    important, rest = order[:important_count], order[important_count:]
    if diverse <= 0:
        return torch.sort(important).values
    xn = x / x.norm(dim=-1, keepdim=True)
    while True:
        r = rest.numel()
        s = min(step, r - diverse)
        if s <= 0:
            break
        a, b = rest[0::2], rest[1::2]
        m = (xn[a] @ xn[b].T).max(dim=1).values  # the reference's product per round (same fp32 bits)
        # ties: the lowest token index (a stable sort over a's entries ordered by index)
        by_index = torch.argsort(a, stable=True)
        ranked = by_index[_descending(m[by_index])]
        rest = torch.cat([a[ranked[min(s, a.numel()) :]], b])
    return torch.sort(torch.cat([important, rest])).values


# --- PruneSID ------------------------------------------------------------------------------------------------------
def prunesid_llava_settings(t: int) -> dict:
    """The LLaVA reference's constants for budget ``t`` (CLS included): groups, NMS ratio, per-group cap."""
    return {"groups": int(t / 4), "ratio": t / 32, "cap": 5 * math.ceil(t / 64)}


def prunesid_qwen_budget(m: int, keep: int | float) -> int:
    """The Qwen reference's token count for an image of ``m`` merged tokens: ``max(round(m * keep / 576), 16)``.

    A float ``keep`` f takes the place of keep/576: ``max(round(m * f), 16)``;
    never more than ``m`` (``m <= 16``: no pruning).
    """
    if m <= 16:
        return m
    t = round(m * keep / 576) if isinstance(keep, int) else round(m * keep)
    return min(max(t, 16), m)


@torch.no_grad()
def pca_groups(rows: list[torch.Tensor], q: int | list[int], seed: int, batched: bool = False) -> list[torch.Tensor]:
    """PCA group of every row of each view: ``argmax_g |V_ig|`` of ``torch.pca_lowrank(sigmoid(X)^T, q, niter=2)``.

    ``rows``: per view ``(N, D)``. The global RNG is seeded with ``seed``
    inside `torch.random.fork_rng` (the caller's stream is untouched), once for
    all views; with ``batched`` (views of equal size) one batched call draws one
    random test matrix for all, as the reference does for LLaVA-NeXT crops.
    ``q`` (one, or one per view) is clamped to each view's ``min(N, D)``.
    """
    qs = [q] * len(rows) if isinstance(q, int) else list(q)
    devices = [rows[0].device] if rows and rows[0].is_cuda else []
    out = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if batched and rows and len({tuple(r.shape) for r in rows}) == 1 and len(set(qs)) == 1:
            z = torch.sigmoid(torch.stack([finite_fp32(r) for r in rows])).transpose(1, 2)
            qq = max(1, min(qs[0], *z.shape[1:]))
            _, _, v = torch.pca_lowrank(z, q=qq, niter=2)
            return [g for g in torch.argmax(v.abs(), dim=-1)]
        for r, q_view in zip(rows, qs):
            z = torch.sigmoid(finite_fp32(r)).T
            qq = max(1, min(q_view, *z.shape))
            _, _, v = torch.pca_lowrank(z, q=qq, niter=2)
            out.append(torch.argmax(v.abs(), dim=-1))
    return out


def _nms(sim: torch.Tensor, scores: torch.Tensor, members: torch.Tensor, theta: float) -> list[int]:
    """Similarity NMS inside one group: picks (token indices) in pick order."""
    left = scores[members].clone()
    picks = []
    sub = sim[members][:, members]
    while bool((left > 0).any()):
        p = int(torch.argmax(left))
        picks.append(int(members[p]))
        left[p] = 0
        left[sub[p] > theta] = 0
    return picks


def _group_budgets(counts: list[int], picks: list[int], t: int, cap: int, spare: int) -> list[int]:
    """Tokens per group (PruneSID step 4): ``spare`` is the slots left out of ``t`` (LLaVA: 1, the CLS token)."""
    g = len(counts)
    lower = [min(1, c) for c in counts]
    upper = [min(cap, c, n) for c, n in zip(counts, picks)]
    while sum(upper) < t and any(u < c for u, c in zip(upper, counts)):
        upper = [min(u + 1, c) for u, c in zip(upper, counts)]
    m = max(t - sum(lower) - spare, 0)
    n = torch.tensor(picks, dtype=torch.float32)
    r = torch.round(torch.cumsum(n / n.sum(), dim=0) * m).to(torch.int64).tolist()
    d = [min(r[j] - (r[j - 1] if j else 0) + lower[j], upper[j]) for j in range(g)]
    target = m + sum(lower)
    order = sorted(range(g), key=lambda j: (-picks[j], j))
    for j in order:
        if sum(d) >= target:
            break
        d[j] += min(upper[j] - d[j], target - sum(d))
    return d


def _grouped_keep(sim, key_scores, group, g, t, cap, spare, theta, pick_key):
    """Steps 3-5 shared by both variants: NMS per group, budgets, each group's first ranked members."""
    n = key_scores.numel()
    members = [torch.nonzero(group == j).flatten() for j in range(g)]
    picks = [_nms(sim, key_scores, mem, theta) if mem.numel() else [] for mem in members]
    counts = [int(mem.numel()) for mem in members]
    if sum(len(p) for p in picks) == 0:
        warnings.warn("prunesid: every score is 0; keeping the top tokens by score instead", RuntimeWarning, stacklevel=3)
        return topk_indices(key_scores, t - spare)
    d = _group_budgets(counts, [len(p) for p in picks], t, cap, spare)
    kept = []
    for j in range(g):
        if d[j] <= 0:
            continue
        key = key_scores[members[j]].clone()
        where = {int(x): pos for pos, x in enumerate(members[j].tolist())}
        for rank, token in enumerate(picks[j]):
            key[where[token]] = pick_key(n, rank)
        kept.append(members[j][_descending(key)[: d[j]]])
    out = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long, device=key_scores.device)
    return torch.sort(out).values


@torch.no_grad()
def prunesid_select(
    features: torch.Tensor, attention: torch.Tensor, t: int, group: torch.Tensor | None = None, seed: int = 0
) -> torch.Tensor:
    """PruneSID (LLaVA) for one view with budget ``t`` counting the CLS token: ``t - 1`` patch indices, ascending.

    ``features`` ``(N, D)`` are the patch rows (CLS excluded), ``attention``
    ``(N,)`` the CLS attention summed over heads; ``group`` the PCA group of
    each row (`pca_groups` with q = int(t/4); computed here when None).
    """
    x = finite_fp32(features)
    n = x.shape[0]
    if t - 1 >= n:
        return torch.arange(n, device=x.device)
    if t <= 1:  # the CLS slot only
        return torch.zeros(0, dtype=torch.long, device=x.device)
    settings = prunesid_llava_settings(t)
    g = max(1, settings["groups"])
    if group is None:
        group = pca_groups([x], g, seed)[0]
    g = max(g, int(group.max()) + 1)
    a = sanitize_scores(attention, "attention").to(x.device)
    xn = F.normalize(x, p=2, dim=-1, eps=1e-12)
    sim = xn @ xn.T
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), diagonal=1)
    mean = float(sim[upper].sum() / upper.sum()) if n > 1 else 0.0
    theta = settings["ratio"] * mean
    return _grouped_keep(sim, a, group.to(x.device), g, t, settings["cap"], 1, theta, lambda n_, rank: 1000.0 - rank)


@torch.no_grad()
def prunesid_qwen_select(
    features: torch.Tensor, t: int, group_and_score: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0
) -> torch.Tensor:
    """PruneSID's Qwen variant for one image of ``M`` merged tokens ``(M, D)``, budget ``t``: ``t`` indices, ascending.

    Groups from the PCA of sigmoid(X)^T with q = max(int(t/4), 4); a token's
    score is |V| of its own group; theta = max(18 t / M, 1) * mean of the
    upper triangle (diagonal kept, zeros below) of the cosine matrix.
    """
    x = finite_fp32(features)
    m = x.shape[0]
    if t >= m:
        return torch.arange(m, device=x.device)
    g = qwen_group_count(t)
    if group_and_score is None:
        group_and_score = qwen_groups(x, g, seed)
    group, score = group_and_score
    g = max(g, int(group.max()) + 1)
    xn = F.normalize(x, p=2, dim=-1, eps=1e-12)
    sim = xn @ xn.T
    mean = float(torch.triu(sim).mean())
    theta = max(18 * t / m, 1) * mean
    return _grouped_keep(sim, score, group, g, t, 5 * math.ceil(t / 64), 0, theta, lambda n_, rank: float(n_ - rank))


def qwen_group_count(t: int) -> int:
    """Groups of the Qwen variant: ``max(int(t / 4), 4)``, and at most ``t`` (every group keeps a token; the
    reference never runs below 16 tokens, where this bound starts to matter)."""
    return min(max(int(t / 4), 4), t)


@torch.no_grad()
def qwen_groups(x: torch.Tensor, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(group, |V| of the own group) of each row for the Qwen variant, seeded as `pca_groups`."""
    return scored_groups([x], [q], seed)[0]


@torch.no_grad()
def scored_groups(rows: list[torch.Tensor], qs: list[int], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(group, |V| of the own group) of each row of each view, one seeded `torch.random.fork_rng` for all views."""
    devices = [rows[0].device] if rows and rows[0].is_cuda else []
    out = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for x, q in zip(rows, qs):
            z = torch.sigmoid(finite_fp32(x)).T
            _, _, v = torch.pca_lowrank(z, q=max(1, min(q, *z.shape)), niter=2)
            v = v.abs()
            group = torch.argmax(v, dim=-1)
            out.append((group, v.gather(1, group[:, None])[:, 0]))
    return out
