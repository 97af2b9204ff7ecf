"""What the vision-stage methods SCOPE, VisPruner and PruneSID read of a model, per view.

A view is what the methods select in separately: LLaVA-NeXT's base view and
each high-resolution crop (its region of the unpadded grid), LLaVA-OneVision's
base and high-resolution views as packed, a video's frames, otherwise the
whole image. Budgets are split with `view_budgets`.
"""

from __future__ import annotations

import torch

from ..context import NotCaptured, StageContext


def per_crop_cls(adapter) -> bool:
    """True where every crop of an image has its own CLS token (LLaVA-NeXT)."""
    return bool(adapter.vision_cls) and not bool(adapter.vision_cls_per_image)


def crop_of_tokens(ctx: StageContext, b: int, i: int, layer: int) -> torch.Tensor:
    """Encoder crop (global index among the crops the ViT saw) of each of image i's tokens, span order.

    Each captured call of vision ``layer`` is replaced by its crops' indices
    (one per patch of the whole crop, also where the layer ran on fewer) and
    packed exactly as the adapter packs any per-ViT-token value.
    """
    calls = ctx.captured.get("vision_layers", {}).get(layer)
    if not calls:
        raise NotCaptured(f"vision layer {layer} was not captured; list it in `signals().vision_inputs`")
    per_call, start = [], 0
    ran_on = ctx.vision_ran_on(layer)
    for c, call in enumerate(calls):
        crops, length = call.hidden.shape[0], call.hidden.shape[1]
        if c < len(ran_on):  # the layer ran on PixelPrune's (or a vit_layer policy's) units: a whole crop's length
            grid, keep = ran_on[c]
            length = ctx.adapter.full_vit_rows(call.hidden.new_zeros(crops, length), grid, keep).shape[1]
        ids = torch.arange(start, start + crops, dtype=torch.float32, device=call.hidden.device)
        per_call.append(ids[:, None].expand(crops, length))
        start += crops
    values = ctx.adapter.vision_token_values(ctx.captured, ctx.layouts, b, i, per_call)
    return values.round().long()


def image_views(ctx: StageContext, b: int, i: int, layer: int | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(token indices of each view, base view first; each token's encoder crop or None) of image i.

    ``layer``: a captured vision layer (0-based) to read LLaVA-NeXT's crops
    from; None where the policy captures none (its views are then the
    layout's sub-grids).
    """
    image = ctx.layouts[b].images[i]
    device = ctx.hidden.device
    if layer is not None and per_crop_cls(ctx.adapter):
        crop = crop_of_tokens(ctx, b, i, layer).to(device)
        order = list(dict.fromkeys(crop.tolist()))  # crops in span order: the base view first
        return [torch.nonzero(crop == c).flatten() for c in order], crop
    return [torch.arange(g.offset, g.offset + g.size, device=device) for g in image.grids], None


def alive_views(ctx: StageContext, b: int, i: int, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views given as grid indices of image i -> indices into its alive tokens, the dropped ones left out.

    The identity on a whole grid; after PixelPrune each view holds its kept
    units only (a view may then be empty).
    """
    if int(ctx.alive[b][i].numel()) == ctx.layouts[b].images[i].num_tokens:
        return views
    rank = ctx.alive_rank(b, i)
    return [w[w >= 0].to(v.device) for v, w in ((v, rank[v.to(rank.device)]) for v in views)]


def view_budgets(k: int, sizes: list[int]) -> list[int]:
    """``k`` over views of the given sizes: ``k // views`` each, the remainder to the base view (first).

    A view smaller than its share keeps all its tokens and passes the rest on,
    base view first. The parts sum to ``min(k, sum(sizes))``.
    """
    if not sizes:
        return []
    share = [k // len(sizes)] * len(sizes)
    share[0] += k % len(sizes)
    out = [min(s, n) for s, n in zip(share, sizes)]
    rest = k - sum(out)
    for j, n in enumerate(sizes):
        add = min(rest, n - out[j])
        out[j] += add
        rest -= add
    return out


def merged_rows(ctx: StageContext, b: int, i: int) -> torch.Tensor:
    """Pre-projector rows of image i, one per token: Qwen's merger input averaged over each merge unit."""
    rows = ctx.pre_projector(b, i)
    merge = getattr(ctx.adapter, "merge", None)
    if merge:
        unit = merge**2
        rows = rows.reshape(rows.shape[0], unit, rows.shape[-1] // unit).mean(dim=1)
    return rows


SALIENCIES = ("cls", "received")


def check_saliency(who: str, saliency: object) -> None:
    if saliency is not None and saliency not in SALIENCIES:
        raise ValueError(f"{who}: saliency must be one of {SALIENCIES} or None (the model's default); got {saliency!r}")


def resolve_layer(who: str, adapter, layer: int | None) -> int:
    """The 1-based ViT layer of the signals: ``layer``, or the one whose output is the visual feature; checked."""
    from .base import probe_depth

    depth = probe_depth(adapter, who)
    chosen = layer or adapter.feature_vision_layer
    if not 1 <= chosen <= depth:
        origin = "" if layer else f" (the {adapter.model_type} feature layer)"
        raise ValueError(f"{who}: layer={chosen}{origin} is outside this ViT's layers 1..{depth}; give layer in 1..{depth}")
    return chosen


def resolve_saliency(who: str, adapter, saliency: str | None) -> str:
    """The saliency for this model, checked against it."""
    chosen = saliency or ("cls" if adapter.vision_cls else "received")
    if chosen == "cls" and not adapter.vision_cls:
        raise ValueError(
            f"{who}: saliency='cls' needs a vision encoder with a CLS token; {adapter.model_type}'s has none "
            "(use 'received': the attention each token receives)"
        )
    return chosen


def view_saliency(ctx: StageContext, b: int, i: int, layer: int, saliency: str) -> torch.Tensor:
    """The saliency of image i's tokens at vision ``layer``: CLS attention summed over heads, or attention received.

    ``"cls"``: the attention each crop's CLS token pays its patches, summed
    over heads. ``"received"``: the attention each token receives from the
    queries of its own attention segment (image, frame, crop), summed over
    queries, mean over heads (Qwen: merge units averaged, raster order); within
    one view this is the per-segment mean over queries times a constant.
    """
    from ..ops.select import sanitize_scores

    if saliency == "cls":
        return sanitize_scores(ctx.vision_cls_attention(b, i, layer), "CLS attention")
    return sanitize_scores(ctx.vision_attention(b, i, layer), "attention received")


def select_per_view(ctx: StageContext, b: int, i: int, k: int, layer: int | None, pick) -> torch.Tensor:
    """Image i's keep set: ``pick(view_indices, budget)`` (indices into the view) over every view, ascending.

    Indices are into the image's alive tokens. Before any prune they are the
    whole grid; after PixelPrune each view holds its kept units only, and
    the budget is split over the views by those counts (`view_budgets`).
    """
    n = int(ctx.alive[b][i].numel())
    device = ctx.hidden.device
    if k >= n:
        return torch.arange(n, device=device)
    views = alive_views(ctx, b, i, image_views(ctx, b, i, layer)[0])
    kept = [view[pick(view, t).to(view.device)] for view, t in zip(views, view_budgets(k, [v.numel() for v in views])) if t > 0]
    return torch.sort(torch.cat(kept)).values.to(device)


def select_per_view_by_saliency(ctx: StageContext, b: int, i: int, k: int, layer: int, saliency: str, choose) -> torch.Tensor:
    """`select_per_view` for the methods that pick from the merged pre-projector rows and a saliency per token
    (SCOPE, VisPruner): ``choose(rows, saliency, t)`` gives one view's picks; both are read once per image."""
    feats, sal = None, None

    def pick(view, t):
        nonlocal feats, sal
        if feats is None:
            feats = merged_rows(ctx, b, i)
            sal = view_saliency(ctx, b, i, layer, saliency).to(feats.device)
        view = view.to(feats.device)
        return choose(feats[view], sal[view], t)

    return select_per_view(ctx, b, i, k, layer, pick)
