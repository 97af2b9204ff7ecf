"""Baselines every comparison needs: seeded random selection and spatial pooling."""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from numbers import Integral
from typing import ClassVar

import torch

from ..budget import split_budget
from ..checks import check_int
from ..context import StageContext
from .base import AnyStagePolicy, Policy, Selection, register


def _image_generator(seed: int, b_image_index: int, n: int) -> torch.Generator:
    # A seed per (image index within its sample, token count): a sample draws
    # the same keep set whether it runs alone or inside a batch.
    mixed = zlib.crc32(f"{seed}:{b_image_index}:{n}".encode())
    return torch.Generator().manual_seed(mixed)


def warn_nonfinite(ctx: StageContext, b: int, i: int, who: str) -> None:
    """Warn once per image when its features hold NaN/inf (the selection stays deterministic)."""
    if not bool(torch.isfinite(ctx.features(b, i)).all()):
        warnings.warn(
            f"{who}: image {i} of sample {b} has NaN or inf features (check the pixel values); "
            "the selection is deterministic but the model's output will not be meaningful",
            RuntimeWarning,
            stacklevel=3,
        )


@register
@dataclass(frozen=True)
class Random(AnyStagePolicy):
    """Keep a uniformly random subset of each image's visual tokens (seeded).

    Works at the projector stage (default), at ``where="vision"`` or at the
    llm stage by giving ``at_layer=k`` (then ``stage`` is ``"llm"``), as in
    the information-horizon recipe (``Random(at_layer=20, keep=38)``).
    ``where="vision"`` selects at the same point as ``"projector"`` (after
    the projector, before the first decoder layer; the vision tower always
    sees every token): it only labels the stage in the report, so a Pipeline
    can order it before projector-stage policies. ``vit_layer=k`` selects
    the same keep sets inside the vision encoder, after its k-th block: the
    blocks after it, and the merger or projector, run on the kept tokens only
    (`vtprune.policies.vit_layer`).
    """

    keep: int | float = 64
    seed: int = 0
    at_layer: int | None = None
    where: str | None = None
    vit_layer: int | None = None

    name: ClassVar[str] = "random"
    paper: ClassVar[str] = "baseline (seeded uniform subset)"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.name, "seed", self.seed)

    def select_image(self, ctx: StageContext, b: int, i: int, k: int) -> Selection:
        warn_nonfinite(ctx, b, i, "random")
        n = int(ctx.alive[b][i].numel())
        perm = torch.randperm(n, generator=_image_generator(self.seed, i, n))[:k]
        return Selection(torch.sort(perm).values.to(ctx.hidden.device))

    def describe(self) -> str:
        where = f"llm@{self.at_layer}" if self.at_layer is not None else self.stage
        if self.vit_layer is not None:
            where = f"vit@{self.vit_layer}"
        return f"random(seed={self.seed}, {where})"


def _window_grid(h: int, w: int, k: int) -> list[tuple[int, int, int, int]]:
    """Exactly `k` non-empty windows tiling an h x w grid, as (r0, r1, c0, c1).

    Rows are cut into bands; each band is cut into the same number of
    columns, except that the first ``k % bands`` bands get one more, so any
    ``k <= h * w`` is met exactly with near-square windows.
    """
    k = max(1, min(k, h * w))
    bands = round((k * h / w) ** 0.5)
    bands = max(bands, -(-k // w), 1)
    bands = min(bands, h, k)
    per, extra = divmod(k, bands)
    windows = []
    for r in range(bands):
        r0, r1 = r * h // bands, (r + 1) * h // bands
        cols = per + (1 if r < extra else 0)
        for c in range(cols):
            windows.append((r0, r1, c * w // cols, (c + 1) * w // cols))
    return windows


@register
@dataclass(frozen=True)
class Pooling(Policy):
    """Spatial average pooling of each image's token grid down to the budget.

    Each pooled token is the mean of its window and takes the position of the
    window's first (top-left) token. Sub-grids (LLaVA-NeXT views, video
    frames) are pooled separately with the budget split by size. Exactly
    ``keep`` tokens come out for any budget (windows are near-square bands).
    The pooled rows replace features; the report does not list them as
    ``merged``.

    After PixelPrune (``Pipeline([PixelPrune(), Pooling(...)])``, ours): the
    windows are laid over the whole grid as above, from the budget counted
    from the image's unpruned token count (capped at PixelPrune's kept
    units); each window's kept units are averaged into one row standing at
    its first kept unit (raster order), and a window whose every unit was
    dropped is gone, so fewer than ``keep`` tokens may come out.
    """

    keep: int | float = 64
    name: ClassVar[str] = "pooling"
    stage: ClassVar[str] = "projector"
    paper: ClassVar[str] = "baseline (spatial average pooling)"
    whole_grid: ClassVar[bool] = True
    after_pixelprune: ClassVar[bool] = True

    def select_image(self, ctx: StageContext, b: int, i: int, k: int) -> Selection:
        image = ctx.layouts[b].images[i]
        warn_nonfinite(ctx, b, i, "pooling")
        feats = ctx.features(b, i)  # the alive tokens: the whole grid, or after PixelPrune its kept units
        parts = split_budget([g.size for g in image.grids], k)
        labels: list[torch.Tensor] = []
        windows = 0
        for grid, kg in zip(image.grids, parts):
            if kg == 0:  # a sub-grid with no budget (tiny fractions): its tokens go nowhere
                labels.append(torch.full((grid.size,), -1, dtype=torch.long))
                continue
            label = torch.empty(grid.height, grid.width, dtype=torch.long)
            for r0, r1, c0, c1 in _window_grid(grid.height, grid.width, kg):
                label[r0:r1, c0:c1] = windows
                windows += 1
            labels.append(label.flatten())
        label = torch.cat(labels).to(feats.device)[ctx.alive[b][i].to(feats.device)]  # the window of each alive token
        src = feats.float()
        position = torch.arange(label.numel(), device=feats.device)
        if bool((label < 0).any()):
            used = label >= 0
            label, src, position = label[used], src[used], position[used]
        sums = src.new_zeros(windows, src.shape[-1]).index_add_(0, label, src)
        counts = torch.bincount(label, minlength=windows)
        first = torch.full((windows,), len(feats), dtype=torch.long, device=feats.device)
        first = first.scatter_reduce_(0, label, position, "amin")  # each window's first alive member (raster order)
        present = counts > 0  # a window whose every token PixelPrune dropped is gone
        order, rows = first[present], (sums[present] / counts[present, None]).to(feats.dtype)
        sort = torch.argsort(order)
        return Selection(order[sort], rows[sort])


@register
@dataclass(frozen=True)
class Fixed(AnyStagePolicy):
    """Keep given grid indices: ``kept[sample][image]`` (e.g. replayed from a report).

    Useful to rerun a selection exactly, for instance to compare generation
    with and without the KV cache under the same keep sets when a policy
    depends on the prompt (recomputation sees the generated tokens too).
    Acts at the projector stage, at ``where="vision"``, before
    ``at_layer``, or inside the vision encoder after its ``vit_layer``-th
    block; ``keep`` is ignored (the lists are the budget).
    """

    kept: tuple = ()
    keep: int | float = 1
    at_layer: int | None = None
    where: str | None = None
    vit_layer: int | None = None

    name: ClassVar[str] = "fixed"
    paper: ClassVar[str] = "baseline (given keep sets, e.g. a replayed report)"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("kept", _kept_lists(self.kept))

    def select(self, ctx: StageContext) -> list[list[Selection]]:
        if len(self.kept) > ctx.batch_size:
            raise ValueError(
                f"fixed: kept gives keep sets for {len(self.kept)} samples but this batch has {ctx.batch_size}; "
                f"give one list per sample of the batch ({ctx.batch_size})"
            )
        return super().select(ctx)

    def select_sample(self, ctx: StageContext, b: int) -> list[Selection]:
        if b >= len(self.kept) or len(self.kept[b]) != ctx.num_media(b):
            raise ValueError(
                f"fixed: sample {b} has {ctx.num_media(b)} images but kept gives "
                f"{len(self.kept[b]) if b < len(self.kept) else 'no'} lists"
            )
        out = []
        for i, image in enumerate(ctx.layouts[b].images):
            grid_indices = self.kept[b][image.index]  # inside one encoder call: this call's media only
            alive = ctx.alive[b][i]
            want = torch.as_tensor(grid_indices, dtype=torch.long, device=alive.device)
            idx = torch.searchsorted(alive, want)
            if bool((idx >= alive.numel()).any()) or not torch.equal(alive[idx.clamp(max=alive.numel() - 1)], want):
                raise ValueError(f"fixed: image {i} of sample {b}: some kept indices are not alive at this stage")
            out.append(Selection(idx))
        return out

    def describe(self) -> str:
        return "fixed" if self.vit_layer is None else f"fixed(vit@{self.vit_layer})"


def _kept_lists(kept: object) -> tuple:
    """``kept[sample][image]`` as nested tuples of ascending, distinct ints (hashable, like every policy)."""
    if not isinstance(kept, (list, tuple)) or not all(isinstance(s, (list, tuple)) for s in kept):
        raise TypeError(f"fixed: kept must be a list (samples) of lists (images) of indices; got {kept!r}")
    if not kept:
        raise ValueError(f"fixed: kept must give the keep sets of at least one sample; got {kept!r}")
    out = []
    for b, sample in enumerate(kept):
        images = []
        for i, indices in enumerate(sample):
            if not isinstance(indices, (list, tuple)) or not all(_is_index(k) for k in indices):
                raise TypeError(f"fixed: kept[{b}][{i}] must be a list of int grid indices >= 0; got {indices!r}")
            if len(set(indices)) != len(indices):
                duplicates = sorted({k for k in indices if list(indices).count(k) > 1})
                raise ValueError(f"fixed: kept[{b}][{i}] lists indices {duplicates} more than once; each is kept once")
            images.append(tuple(sorted(int(k) for k in indices)))
        if images and not any(images):  # one image of a pooled selection may keep none (a replayed report)
            raise ValueError(
                f"fixed: kept[{b}] keeps no token of its {len(images)} image(s); a sample keeps at least 1 visual "
                "token (give 1 or more grid indices)"
            )
        out.append(tuple(images))
    return tuple(out)


def _is_index(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and int(value) >= 0
