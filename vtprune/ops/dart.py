"""DART's selection over tensors: pivots by key norm, then the tokens least similar to each pivot.

Pure functions over fp32 tensors (no model): `dart_quotas` is the budget
arithmetic, `dart_pivot_order` the order the pivots are visited in, and
`dart_select` the keep set of one image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .select import sanitize_scores

PIVOTS = 4  # image pivots and text pivots, each
COSINE_EPS = 1e-8
BUDGETS = ("reference", "exact")
PIVOT_ORDERS = ("reference", "sorted")


def top_descending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores in DESCENDING score order; ties to the lowest index."""
    scores = sanitize_scores(scores)
    return torch.sort(scores, descending=True, stable=True).indices[: min(k, scores.numel())]


def dart_quotas(keep: int, n_pivots: int, n_image_pivots: int, budget: str) -> list[int]:
    """Tokens each pivot takes from the pool, in visiting order, before the pool's size caps them.

    Every pivot takes ``keep // 8`` (the reference's TOKEN_TOPK): ``budget="reference"``
    keeps ``n_image_pivots + n_pivots * (keep // 8)`` (68 / 132 / 196 at 64 / 128 / 192).
    ``budget="exact"``: the quotas are trimmed from the last pivot (or raised by one
    from the first) until image pivots plus picks are exactly ``keep``.
    """
    quota = [keep // 8] * n_pivots
    if budget == "reference":
        return quota
    target = max(keep - n_image_pivots, 0)
    j = n_pivots - 1
    while sum(quota) > target:
        take = min(quota[j], sum(quota) - target)
        quota[j] -= take
        j -= 1
    j = 0
    while n_pivots and sum(quota) < target:
        quota[j % n_pivots] += 1
        j += 1
    return quota


def dart_pivot_order(image_pivots: list[int], text_pivots: list[int], order: str) -> list[int]:
    """The order pivots (sequence positions, each list in descending key norm) are visited in.

    ``"reference"``: the iteration order of a Python ``set`` built from the
    image pivots then the text pivots, as the reference builds it (it depends
    on the integer values: positions must be counted from the sample's first
    real token). ``"sorted"``: ascending positions.
    """
    positions = [*image_pivots, *text_pivots]
    if order == "sorted":
        return sorted(set(positions))
    seen: set[int] = set()
    for p in positions:
        seen.add(p)
    return list(seen)


def dart_select(
    key_norm: torch.Tensor,
    features: torch.Tensor,
    text_key_norm: torch.Tensor,
    text_features: torch.Tensor,
    keep: int,
    *,
    image_positions: torch.Tensor,
    text_positions: torch.Tensor,
    budget: str = "reference",
    pivot_order: str = "reference",
) -> torch.Tensor:
    """Kept indices (ascending) of one image's ``n`` tokens.

    ``key_norm`` ``(n,)`` and ``text_key_norm`` ``(m,)``: L1 norms of the
    layer's post-RoPE keys of the image's tokens and of the candidate text
    tokens (every real token after the image's span); ``features`` ``(n, D)``
    and ``text_features`` ``(m, D)``: the final norm of that layer's output.
    ``image_positions`` ``(n,)`` and ``text_positions`` ``(m,)``: their
    sequence positions counted from the sample's first real token (they
    set the reference pivot order).

    Image pivots: the 4 largest ``key_norm``; text pivots: the 4 largest
    ``text_key_norm`` (fewer where fewer exist). Visiting the pivots in
    `dart_pivot_order`, each takes its quota (`dart_quotas`) of the tokens
    left in the pool (the image's tokens minus its pivots) with the lowest
    cosine (eps 1e-8) to itself, lowest index on ties; they leave the pool.
    Kept: image pivots and every pick.
    """
    n = key_norm.numel()
    if keep >= n:
        return torch.arange(n, device=key_norm.device)
    if budget == "exact" and keep <= PIVOTS:
        return torch.sort(top_descending(key_norm, keep)).values
    img_piv = top_descending(key_norm, PIVOTS)
    txt_piv = top_descending(text_key_norm, PIVOTS)
    img_pos = [int(image_positions[i]) for i in img_piv.tolist()]
    txt_pos = [int(text_positions[j]) for j in txt_piv.tolist()]
    feature_of = {p: features[i] for p, i in zip(img_pos, img_piv.tolist())}
    feature_of.update({p: text_features[j] for p, j in zip(txt_pos, txt_piv.tolist())})
    order = dart_pivot_order(img_pos, txt_pos, pivot_order)
    quotas = dart_quotas(keep, len(order), img_piv.numel(), budget)
    pool = torch.ones(n, dtype=torch.bool, device=key_norm.device)
    pool[img_piv] = False
    feats = features.float()
    kept = [img_piv]
    for position, quota in zip(order, quotas):
        left = torch.nonzero(pool).flatten()
        take = min(quota, left.numel())
        if take <= 0:
            continue
        pivot = feature_of[position].float()
        cos = F.cosine_similarity(feats[left], pivot[None, :], dim=-1, eps=COSINE_EPS)
        picks = left[top_descending(-cos, take)]
        pool[picks] = False
        kept.append(picks)
    return torch.sort(torch.cat(kept)).values
