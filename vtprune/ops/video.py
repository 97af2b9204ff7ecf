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

from typing import NamedTuple

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


# --- FastVID ------------------------------------------------------------------------------------------
class FastVIDPick(NamedTuple):
    """One video's FastVID selection.

    ``indices``: kept flat indices, ascending; ``merged``: bool per kept
    token, True for a merge target (its row is replaced); ``mix``: how every
    kept row is made from the video's rows, ``(rows, sources, weights)``
    (kept row r = sum of weight * x[source] over its entries: a kept row
    unchanged is one entry of weight 1), so any per-token feature level
    (Qwen3-VL's DeepStack) merges with the same weights (`fastvid_apply`);
    ``values``: the kept rows of the features selected on (fp32).
    """

    indices: torch.Tensor
    values: torch.Tensor
    merged: torch.Tensor
    mix: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def fastvid_apply(mix: tuple[torch.Tensor, torch.Tensor, torch.Tensor], kept: int, x: torch.Tensor) -> torch.Tensor:
    """The kept rows ``(kept, D)`` (fp32) that `FastVIDPick.mix` makes from a video's rows ``x`` ``(N, D)``."""
    rows, sources, weights = (t.to(x.device) for t in mix)
    matrix = torch.sparse_coo_tensor(torch.stack([rows, sources]), weights.float(), (kept, x.shape[0]), check_invariants=True)
    return torch.sparse.mm(matrix.coalesce(), x.float())


def fastvid_retained(frames: int, per_frame: int, keep: int | float) -> int:
    """R, tokens per frame: int(P * keep); an int keep k (tokens per video): k // T (at most P)."""
    return min(keep // frames, per_frame) if isinstance(keep, int) else int(per_frame * keep)


def fastvid_segments(g: torch.Tensor, c: int, tau: float) -> list[int]:
    """Segment lengths: cut after the c - 1 least similar adjacent frames and after every similarity < tau.

    g is ``(T, D')``, one global feature per frame; the similarity of frames
    t and t + 1 is the dot product of their normalised features. With fewer
    than c - 1 gaps every gap is cut (the official ``topk`` raises there).
    """
    t = g.shape[0]
    if t == 1:
        return [1]
    sim = _adjacent_similarity(g)
    cuts = set(_rank_asc(sim)[: max(c - 1, 0)].tolist()) | set(torch.nonzero(sim < tau).flatten().tolist())
    if t - 1 < c - 1:
        cuts = set(range(t - 1))
    return _runs(t, cuts)


def _adjacent_similarity(g: torch.Tensor) -> torch.Tensor:
    gn = g.float() / g.float().norm(dim=1, keepdim=True)
    return (gn[:-1] * gn[1:]).sum(dim=1)


def _runs(t: int, cuts: set[int]) -> list[int]:
    """Lengths of the runs of ``t`` frames cut after each frame in ``cuts``."""
    bounds = [-1, *sorted(cuts), t - 1]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def fastvid_counts(per_frame: int, keep: int | float, d: float, frames: int = 1) -> tuple[int, int]:
    """(S, C): salient and context tokens per frame (OneVision path); R = `fastvid_retained`, S = R - int(R * d), C = R - S."""
    r = fastvid_retained(frames, per_frame, keep)
    s = r - int(r * d)
    return s, r - s


def fastvid_anchor_slots(segments: list[int], context: int, stride: int) -> list[int]:
    """Context slots A per frame: in a segment of length L the frames (L - 1 - j) % p == 0 get (C * L) // ceil(L / p)."""
    slots = []
    for length in segments:
        a = (context * length) // -(-length // stride)
        slots += [a if (length - 1 - j) % stride == 0 else 0 for j in range(length)]
    return slots


def fastvid_qwen_budgets(
    g: torch.Tensor,
    per_frame: int,
    keep: int | float,
    c: int = 8,
    tau: float = 0.84,
    ignore: float = 0.95,
    d: float = 0.4,
    stride: int = 4,
) -> tuple[list[int], list[int], list[int]]:
    """FastVID's Qwen2.5-VL budgets: (segment lengths, salient count per frame, context count per frame).

    A segment of L frames holds R * L tokens, C_seg = max(int(R L d), 1)
    context and S_seg the rest. L = 1: the frame takes both. L > 1: the
    segment splits where adjacent frames' similarity < ``ignore`` into V
    runs of near-duplicates and only each run's last frame gets tokens;
    S_seg is split evenly over the runs (the remainder one each to the
    first); every ``stride``-th run counted from the last is an anchor,
    C_seg split evenly over the anchors (the remainder one each to those
    nearest the end) and capped at P // 2; an anchor's salient count is
    capped at P minus its context, another run's at P.
    """
    t = g.shape[0]
    segments = fastvid_segments(g, c, tau)
    sim = _adjacent_similarity(g) if t > 1 else g.new_zeros(0)
    r = fastvid_retained(t, per_frame, keep)
    salient, context, start = [], [], 0
    for length in segments:
        held = r * length
        ctx = max(int(held * d), 1)
        sal = max(held - ctx, 0)  # R = 0 (an int keep below T): the official's negative topk raises
        if length == 1:
            salient.append(sal)
            context.append(ctx)
            start += 1
            continue
        inner = sim[start : start + length - 1]
        runs = _runs(length, set(torch.nonzero(inner < ignore).flatten().tolist()))
        v = len(runs)
        run_salient = [sal // v + (1 if j < sal % v else 0) for j in range(v)]
        anchors = -(-v // stride)
        shares = [ctx // anchors + (1 if j < ctx % anchors else 0) for j in range(anchors)]
        forward = [min(shares[j // stride], per_frame // 2) if j % stride == 0 else 0 for j in range(v)]
        run_context = forward[::-1]
        for size, s_j, c_j in zip(runs, run_salient, run_context):
            salient += [0] * (size - 1)
            context += [0] * (size - 1)
            salient.append(min(s_j, per_frame - c_j))
            context.append(c_j)
        start += length
    return segments, salient, context


def fastvid_noise(frames: int, candidates: int, seed: int, device=None) -> torch.Tensor:
    """The density tie-breaking draw, uniform [0, 1) of shape ``(T, P - S)``, from ``seed`` (the caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.rand(frames, candidates).to(device)


def fastvid_noise_rows(sizes: list[int], seed: int) -> list[torch.Tensor]:
    """The Qwen path's draws: one ``(1, n)`` per frame that gets context, in frame order, from ``seed`` (CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [torch.rand(1, n)[0] for n in sizes]


def _density_score(feats: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Density-peak score delta * rho of one frame's candidate rows ``(n, D)`` (fp32), ``noise`` ``(n,)``."""
    dist = torch.cdist(feats, feats) / feats.shape[-1] ** 0.5
    near = torch.topk(dist, min(4, dist.shape[-1]), dim=-1, largest=False).values
    rho = torch.exp(-(near**2).mean(dim=-1)) + noise.float().to(feats.device) * 1e-6
    higher = rho[None, :] > rho[:, None]
    return torch.where(higher, dist, dist.max()).min(dim=-1).values * rho


class _Mix:
    """Collects kept rows (flat index, merged?) and the entries (row, source, weight) of the row-mixing matrix."""

    def __init__(self) -> None:
        self.kept: list[torch.Tensor] = []
        self.merged: list[torch.Tensor] = []
        self.entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.rows = 0

    def keep(self, flat: torch.Tensor) -> None:
        """Rows kept unchanged: one entry of weight 1 each."""
        flat = flat.cpu()
        rows = torch.arange(self.rows, self.rows + flat.numel())
        self._add(flat, False, (rows, flat, torch.ones(flat.numel())))

    def merge(self, xn: torch.Tensor, pool: torch.Tensor, targets: torch.Tensor, beta: float) -> None:
        """Each pool token joins the target of highest cosine (ties: the lowest target, targets ascending); a
        target with n members becomes w * target + (1 - w) * mean(members), w = max(beta, 1 / (n + 1))."""
        join = (xn[pool] @ xn[targets].T).argmax(dim=1).cpu()  # argmax: the first maximum
        pool, targets = pool.cpu(), targets.cpu()
        n = torch.bincount(join, minlength=targets.numel()).float()
        w = (1 / (n + 1)).clamp(min=beta)
        rows = torch.arange(self.rows, self.rows + targets.numel())
        share = (1 - w) / n.clamp(min=1)
        self._add(targets, True, (torch.cat([rows, rows[join]]), torch.cat([targets, pool]), torch.cat([w, share[join]])))

    def _add(self, flat: torch.Tensor, merged: bool, entries) -> None:
        self.kept.append(flat)
        self.merged.append(torch.full((flat.numel(),), merged))
        self.entries.append(entries)
        self.rows += flat.numel()

    def pick(self, x_flat: torch.Tensor) -> FastVIDPick:
        kept = torch.cat(self.kept) if self.kept else torch.zeros(0, dtype=torch.long)
        order = torch.argsort(kept)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        parts = list(zip(*self.entries)) or [[torch.zeros(0, dtype=torch.long)]] * 2 + [[torch.zeros(0)]]
        mix = (rank[torch.cat(parts[0])], torch.cat(parts[1]), torch.cat(parts[2]))
        device = x_flat.device
        return FastVIDPick(
            indices=kept[order].to(device),
            values=fastvid_apply(mix, order.numel(), x_flat),
            merged=torch.cat(self.merged)[order].to(device) if self.merged else torch.zeros(0, dtype=torch.bool),
            mix=mix,
        )


def fastvid_ov_select(
    x: torch.Tensor,
    g: torch.Tensor,
    a: torch.Tensor,
    keep: int | float,
    noise: torch.Tensor,
    c: int = 8,
    tau: float = 0.9,
    d: float = 0.4,
    stride: int = 4,
    beta: float = 0.6,
) -> FastVIDPick:
    """FastVID's LLaVA-OneVision path on one video.

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
    xf = x.float().reshape(t * p, dim)
    xn = xf / xf.norm(dim=-1, keepdim=True)
    salient, context = fastvid_counts(p, keep, d, t)
    segments = fastvid_segments(g, c, tau)
    raw = fastvid_anchor_slots(segments, context, stride)
    slots = [min(s, p - salient) for s in raw]  # the official raises where A > P - S
    out = _Mix()
    others, scores = [], []
    for f in range(t):
        top = _rank_desc(a[f].float())[:salient]
        out.keep(torch.sort(top).values + f * p)
        rest = torch.ones(p, dtype=torch.bool, device=x.device)
        rest[top] = False
        rest = torch.nonzero(rest).flatten() + f * p
        others.append(rest)
        scores.append(_density_score(xf[rest], noise[f]) if any(slots) else torch.empty(0))  # read only where slots
    start = 0
    for length in segments:
        pool = torch.cat(others[start : start + length])
        for f in range(start, start + length):
            if slots[f] == 0:
                continue
            targets = torch.sort(others[f][_rank_desc(scores[f])[: slots[f]]]).values
            # a frame whose slots equal C (a one-frame segment) merges its own tokens, an anchor its segment's
            out.merge(xn, others[f] if raw[f] == context else pool, targets, beta)
        start += length
    return out.pick(xf)


def fastvid_qwen_select(
    x: torch.Tensor,
    g: torch.Tensor,
    a: torch.Tensor,
    keep: int | float,
    seed: int = 0,
    c: int = 8,
    tau: float = 0.84,
    ignore: float = 0.95,
    d: float = 0.4,
    stride: int = 4,
    beta: float = 0.6,
) -> FastVIDPick:
    """FastVID's Qwen2.5-VL path on one video ``(T, P, D)`` (budgets: `fastvid_qwen_budgets`).

    Frame f keeps its top S_f tokens by saliency ``a`` ``(T, P)``
    unchanged; a frame with C_f > 0 takes its C_f density-peak targets
    (among its other tokens, noise from ``seed``: one ``(1, P - S_f)`` draw
    per such frame in frame order), re-sorted ascending, and merges every
    token of its segment except the segment's salient tokens and its own
    targets (other frames' targets included). Ties to the lowest index.
    """
    t, p, dim = x.shape
    xf = x.float().reshape(t * p, dim)
    xn = xf / xf.norm(dim=-1, keepdim=True)
    segments, salient, context = fastvid_qwen_budgets(g, p, keep, c, tau, ignore, d, stride)
    noise = iter(fastvid_noise_rows([p - s for s, n in zip(salient, context) if n > 0], seed))
    out = _Mix()
    start = 0
    for length in segments:
        frames = range(start, start + length)
        tops, targets = {}, {}
        for f in frames:
            top = _rank_desc(a[f].float())[: salient[f]]
            tops[f] = torch.sort(top).values + f * p
            out.keep(tops[f])
            if context[f] > 0:
                rest = torch.ones(p, dtype=torch.bool, device=x.device)
                rest[top] = False
                rest = torch.nonzero(rest).flatten() + f * p
                score = _density_score(xf[rest], next(noise))
                targets[f] = torch.sort(rest[_rank_desc(score)[: context[f]]]).values
        segment_salient = torch.cat([tops[f] for f in frames])
        for chosen in targets.values():
            left = torch.ones(t * p, dtype=torch.bool, device=x.device)
            left[: start * p] = False
            left[(start + length) * p :] = False
            left[segment_salient] = False
            left[chosen] = False
            out.merge(xn, torch.nonzero(left).flatten(), chosen, beta)
        start += length
    return out.pick(xf)
