"""Selection math of the video methods, on one video's features ``(T, P, D)``: pure functions, fp32.

Every function returns the kept tokens as flat indices ``t * P + cell``,
ascending. Ties go to the lowest flat index (rankings by "least similar"
sort by negated similarity, stably). ``keep`` is a float fraction in
(0, 1] or an int token count per video, read by each method's own budget
rule (`evs_count`, `vidcom2_target`, `dycoke_count`). The policies in
`vtprune.policies.video` call these; tests compare them with brute-force
loops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VIDCOM2_ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0)
VIDCOM2_TEMPERATURE = 0.01


def keeps_all(keep: int | float, n: int) -> bool:
    """keep = 1.0 or an int >= N: the video stays untouched (no scoring, no merging)."""
    return (isinstance(keep, float) and keep >= 1.0) or (isinstance(keep, int) and keep >= n)


def _rank_desc(score: torch.Tensor) -> torch.Tensor:
    """Indices by descending score, ties to the lowest index."""
    return torch.sort(score, descending=True, stable=True).indices


def _rank_asc(score: torch.Tensor) -> torch.Tensor:
    """Indices by ascending score, ties to the lowest index."""
    return torch.sort(score, stable=True).indices


# --- EVS ----------------------------------------------------------------------------------------------
def evs_count(frames: int, per_frame: int, keep: int | float) -> int:
    """EVS's retained count: max(P, int(T * P * keep)); an int keep k: max(P, min(k, N))."""
    n = frames * per_frame
    if isinstance(keep, int):
        return max(per_frame, min(keep, n))
    return max(per_frame, int(n * keep))


def evs_scores(x: torch.Tensor) -> torch.Tensor:
    """``(T, P)``: frame 0 +inf, later cells 1 - cos(x[t, i], x[t-1, i]) (cosine eps 1e-8)."""
    x = x.float()
    change = 1.0 - F.cosine_similarity(x[1:], x[:-1], dim=-1, eps=1e-8)
    first = torch.full_like(x[:1, :, 0], float("inf"))
    return torch.cat([first, change], dim=0)


def evs_select(x: torch.Tensor, keep: int | float) -> torch.Tensor:
    """EVS on one video ``(T, P, D)``: the top ``evs_count`` tokens by temporal change, frame 0 whole."""
    t, p = x.shape[:2]
    if keeps_all(keep, t * p):
        return torch.arange(t * p, device=x.device)
    order = _rank_desc(evs_scores(x).flatten())
    return torch.sort(order[: evs_count(t, p, keep)]).values


# --- VidCom2 ------------------------------------------------------------------------------------------
def vidcom2_target(frames: int, per_frame: int, keep: int | float) -> int:
    """``budget="exact"``'s count (vLLM): max(T, min(int(N * keep), N)); an int keep k: max(T, min(k, N))."""
    n = frames * per_frame
    k = keep if isinstance(keep, int) else int(n * keep)
    return max(frames, min(k, n))


def _gaussian(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    dist = ((x - centre) ** 2).sum(-1)
    return sum((torch.exp(-dist / (2 * a)) for a in VIDCOM2_ALPHAS), torch.zeros_like(dist))


def vidcom2_scores(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, u)``, both ``(T, P)``: similarity to the video's centre, and the redundancy u = v + f.

    On the int(D/2) lowest-variance channels (population variance over all
    N rows; ties: lowest channel), tokens L2-normalised (eps 1e-12).
    """
    t, p, d = x.shape
    flat = x.float().reshape(t * p, d)
    channels = _rank_asc(flat.var(dim=0, unbiased=False))[: d // 2]
    frames = F.normalize(flat[:, channels].reshape(t, p, -1), dim=-1)
    v = _gaussian(frames, frames.mean(dim=(0, 1), keepdim=True))
    f = _gaussian(frames, frames.mean(dim=1, keepdim=True))
    return v, v + f


def vidcom2_frame_budgets(v: torch.Tensor, keep: float) -> list[int]:
    """k_t = max(1, round(min(1, r * (1 + p_t - mean p)) * P)) with p = softmax(-(mean v per frame) / 0.01).

    fp32, rounding half to even, as the official ``compute_scales`` (the
    mean of p is 1/T up to rounding).
    """
    t, p = v.shape
    s = -v.mean(dim=-1)
    prob = F.softmax((s - s.max()) / VIDCOM2_TEMPERATURE, dim=0)
    scales = (keep * (1 + prob - prob.mean())).clamp(max=1.0)
    return (scales * p).round().long().clamp(min=1, max=p).tolist()


def vidcom2_select(x: torch.Tensor, keep: int | float, budget: str = "reference") -> torch.Tensor:
    """VidCom2 on one video ``(T, P, D)``: per frame its k_t tokens of smallest u.

    ``budget="exact"`` then drops the kept tokens of largest u (or adds the
    unkept of smallest u) until ``vidcom2_target`` tokens remain; there,
    tokens rank by (u, index), so of equal u the higher index goes first.
    """
    t, p = x.shape[:2]
    n = t * p
    if keeps_all(keep, n):
        return torch.arange(n, device=x.device)
    r = keep / n if isinstance(keep, int) else keep
    v, u = vidcom2_scores(x)
    ks = vidcom2_frame_budgets(v, r)
    mask = torch.zeros(t, p, dtype=torch.bool, device=x.device)
    for frame, k in enumerate(ks):
        mask[frame, _rank_asc(u[frame])[:k]] = True
    mask = mask.flatten()
    if budget == "exact":
        target = vidcom2_target(t, p, keep)
        rank = torch.empty(n, dtype=torch.long, device=x.device)
        rank[_rank_asc(u.flatten())] = torch.arange(n, device=x.device)  # position of each token by (u, index)
        kept = torch.nonzero(mask).flatten()
        if kept.numel() > target:
            worst = kept[torch.sort(rank[kept], descending=True).indices[: kept.numel() - target]]
            mask[worst] = False
        elif kept.numel() < target:
            free = torch.nonzero(~mask).flatten()
            mask[free[torch.sort(rank[free]).indices[: target - kept.numel()]]] = True
    return torch.nonzero(mask).flatten()


# --- DyCoke (TTM) -------------------------------------------------------------------------------------
def dycoke_count(frames: int, per_frame: int, keep: int | float) -> int:
    """Tokens each pruned frame keeps: int(keep * P); an int keep k: k // T (at most P)."""
    n = keep // frames if isinstance(keep, int) else int(keep * per_frame)
    return max(0, min(n, per_frame))


def dycoke_select(x: torch.Tensor, keep: int | float) -> torch.Tensor:
    """DyCoke's temporal token merging (TTM) on one video ``(T, P, D)``.

    Pairs (0, 1), (2, 3), ...: the first frame whole, the second keeps its n
    cells least similar (cosine of the L2-normalised cells, as the official)
    to the same cell of the first. Windows i = 0, 4, ... while i < T - 4:
    frame i + 2 keeps its n cells least similar (plain cosine) to frame i.
    An odd last frame stays whole.
    """
    t, p = x.shape[:2]
    if keeps_all(keep, t * p):
        return torch.arange(t * p, device=x.device)
    n = dycoke_count(t, p, keep)
    xf = x.float()
    mask = torch.ones(t, p, dtype=torch.bool, device=x.device)
    for i in range(0, t - 1, 2):
        sim = F.cosine_similarity(F.normalize(xf[i], dim=1), F.normalize(xf[i + 1], dim=1), dim=1)
        mask[i + 1] = False
        mask[i + 1, _rank_asc(sim)[:n]] = True
    for i in range(0, t - 4, 4):
        sim = F.cosine_similarity(xf[i], xf[i + 2], dim=1)
        mask[i + 2] = False
        mask[i + 2, _rank_asc(sim)[:n]] = True
    return torch.nonzero(mask.flatten()).flatten()


# --- FastVID (LLaVA-OneVision path) -------------------------------------------------------------------
def fastvid_segments(g: torch.Tensor, c: int, tau: float) -> list[int]:
    """Segment lengths: cut after the c - 1 least similar adjacent frames and after every similarity < tau.

    g is ``(T, D')``, one global feature per frame; the similarity of frames
    t and t + 1 is the dot product of their normalised features. With fewer
    than c - 1 gaps every gap is cut (the official ``topk`` raises there).
    """
    t = g.shape[0]
    if t == 1:
        return [1]
    gn = g.float() / g.float().norm(dim=1, keepdim=True)
    sim = (gn[:-1] * gn[1:]).sum(dim=1)
    cuts = set(_rank_asc(sim)[: max(c - 1, 0)].tolist()) | set(torch.nonzero(sim < tau).flatten().tolist())
    if t - 1 < c - 1:
        cuts = set(range(t - 1))
    bounds = [-1, *sorted(cuts), t - 1]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def fastvid_counts(per_frame: int, keep: float, d: float) -> tuple[int, int]:
    """(S, C): salient and context tokens per frame; R = int(P * keep), S = R - int(R * d), C = R - S."""
    r = int(per_frame * keep)
    s = r - int(r * d)
    return s, r - s


def fastvid_anchor_slots(segments: list[int], context: int, stride: int) -> list[int]:
    """Context slots A per frame: in a segment of length L the frames (L - 1 - j) % p == 0 get (C * L) // ceil(L / p)."""
    slots = []
    for length in segments:
        a = (context * length) // -(-length // stride)
        slots += [a if (length - 1 - j) % stride == 0 else 0 for j in range(length)]
    return slots


def fastvid_noise(frames: int, candidates: int, seed: int, device=None) -> torch.Tensor:
    """The density tie-breaking draw, uniform [0, 1) of shape ``(T, P - S)``, from ``seed`` (the caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.rand(frames, candidates).to(device)


def _merge(pool: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """Each pool row joins the target of highest cosine (ties: the lowest target index); a target with n
    members becomes w * target + (1 - w) * mean(members), w = max(beta, 1 / (n + 1)) (w = 1 when n = 0)."""
    pn = pool / pool.norm(dim=-1, keepdim=True)
    tn = targets / targets.norm(dim=-1, keepdim=True)
    join = (pn @ tn.T).argmax(dim=1)  # argmax returns the first maximum: targets are in ascending order here
    onehot = torch.zeros(pool.shape[0], targets.shape[0], dtype=pool.dtype, device=pool.device)
    onehot[torch.arange(pool.shape[0], device=pool.device), join] = 1
    n = onehot.sum(dim=0)[:, None]
    w = (1 / (n + 1)).clamp(min=beta)
    mean = (onehot.T @ pool) / n.clamp(min=1)
    return w * targets + (1 - w) * mean


def fastvid_ov_select(x: torch.Tensor, g: torch.Tensor, a: torch.Tensor, keep: float, noise: torch.Tensor,
                      c: int = 8, tau: float = 0.9, d: float = 0.4, stride: int = 4,
                      beta: float = 0.6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FastVID's LLaVA-OneVision path on one video: (kept flat indices ascending, their rows, merged mask).

    ``x`` ``(T, P, D)`` projector output, ``g`` ``(T, D')`` frame-global
    features, ``a`` ``(T, P)`` saliency, ``noise`` ``(T, P - S)``
    (`fastvid_noise`). Per frame the top S tokens by saliency are kept
    unchanged; density-peak targets (score = delta * rho over the frame's
    other tokens, ascending) absorb by merging: a single-frame segment's
    frame takes C targets from its own tokens; in a longer segment every
    anchor takes A targets (capped at P - S) and merges the non-salient
    tokens of the whole segment. Ties to the lowest index throughout.
    """
    t, p, dim = x.shape
    xf = x.float()
    salient, context = fastvid_counts(p, keep, d)
    segments = fastvid_segments(g, c, tau)
    raw = fastvid_anchor_slots(segments, context, stride)
    slots = [min(s, p - salient) for s in raw]  # the official raises where A > P - S
    rows, values, merged = [], [], []
    others, scores = [], []
    for f in range(t):
        top = _rank_desc(a[f].float())[:salient]
        rest = torch.ones(p, dtype=torch.bool, device=x.device)
        rest[top] = False
        rest = torch.nonzero(rest).flatten()
        for i in torch.sort(top).values.tolist():
            rows.append(f * p + i)
            values.append(xf[f, i])
            merged.append(False)
        feats = xf[f, rest]
        dist = torch.cdist(feats, feats) / dim**0.5
        near = torch.sort(dist, dim=-1).values[:, :4]
        rho = torch.exp(-(near**2).mean(dim=-1)) + noise[f].float().to(x.device) * 1e-6
        higher = rho[None, :] > rho[:, None]
        delta = torch.where(higher, dist, dist.max()).min(dim=-1).values
        others.append((rest, feats))
        scores.append(delta * rho)
    start = 0
    for length in segments:
        pool = torch.cat([others[f][1] for f in range(start, start + length)])
        for f in range(start, start + length):
            if slots[f] == 0:
                continue
            rest, feats = others[f]
            pick = torch.sort(_rank_desc(scores[f])[: slots[f]]).values
            # a frame whose slots equal C (a one-frame segment) merges its own tokens, an anchor its segment's
            new = _merge(feats if raw[f] == context else pool, feats[pick], beta)
            for j, v in zip(pick.tolist(), new):
                rows.append(f * p + int(rest[j]))
                values.append(v)
                merged.append(True)
        start += length
    order = torch.argsort(torch.tensor(rows))
    idx = torch.tensor(rows)[order].to(x.device)
    vals = torch.stack(values)[order.to(x.device)] if values else xf.new_zeros(0, dim)
    return idx, vals, torch.tensor(merged)[order].to(x.device)
