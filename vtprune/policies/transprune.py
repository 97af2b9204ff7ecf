"""TransPrune: progressive llm-stage pruning by token transition variation and instruction-guided attention."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import ClassVar

import torch

from ..budget import resolve_budget, validate_keep
from ..checks import check_bool
from ..context import StageContext
from ..ops.select import topk_indices
from ..ops.transition import token_transition
from .base import Policy, Selection, Signals, register

_EPS = 1e-8  # the reference's guard when each score is normalised by its sum


@register
@dataclass(frozen=True)
class TransPrune(Policy):
    """Prune visual tokens at several decoder layers by TTV plus instruction-guided attention.

    Source: "TransPrune: Token Transition Pruning for Efficient Large
    Vision-Language Model" (code liaolea/TransPrune, LLaVA only). Follows
    the code:

    - TTV (token transition variation) of each attention and MLP sub-block of
      the layers ``ttv_from .. prune_after[-1]`` (1-based): for input ``x``
      (after the sub-block's norm) and output ``y`` (before the residual
      add), ``softmax(1 - cos(x, y)) * |y| / |x|`` over the sample's tokens
      (`vtprune.ops.transition.token_transition`); a layer's TTV is the sum
      of its two sub-blocks, accumulated over the layers seen so far and
      carried through every prune (kept rows only).
    - IGA (instruction-guided attention) at a prune point: attention of the
      tokens from the end of the last image span to the end of the prompt to
      every key, in the next layer (its input norm, q/k projections, RoPE,
      GQA, causal mask), mean over heads and those rows, image columns.
      Recomputed by the attention probe (`StageContext.attention_rows`),
      so the model keeps SDPA/FlashAttention.
    - Score of an image's alive tokens: ``TTV / sum(TTV) + IGA / sum(IGA)``
      (each plus 1e-8); the top ``int(N0 * r)`` are kept, N0 the image's
      original token count; ties go to the lowest index.

    Where this departs from the reference: budgets and normalisation are per
    image (the reference has one image per sample); TTV's softmax runs over
    each sample's valid tokens (the reference sums over the whole batch
    tensor, correct at batch size 1); LLaVA-NeXT newline tokens are
    structure, never scored or counted (the reference prunes them like
    patches). The reference renumbers positions after every stage; that is
    ``vtprune.wrap(..., positions="compact")`` (1-D RoPE families); the
    default keeps original positions.

    Parameters (None: the per-model default from model_zoo.yaml; the paper's
    setting for every family):
        prune_after: 1-based decoder layers after which the sequence is pruned,
            increasing; default (7, 9, 12). Pruning after 1-based layer K is
            pruning before 0-based layer K, the ``at_layer`` convention, so the
            report's stages are ``llm@7``, ``llm@9``, ``llm@12``.
        ratios: fraction of the original visual tokens kept at each of those
            layers, non-increasing; default (0.875, 0.625, 0.125).
        ttv_from: first 1-based layer whose TTV is accumulated (up to the last
            prune layer); default 7.
        keep: None (default) follows ``ratios``; a token count or fraction
            replaces the last stage's budget (as ``keep`` does for every policy).
        ttv_only: score by TTV alone, the attention-free variant of the paper.
        abs_cos: use ``1 - |cos|`` in TTV's weight, as the paper writes it.
    """

    keep: int | float | None = None  # type: ignore[assignment]  # None: the schedule's counts (own image_budget)
    prune_after: Sequence[int] | None = None
    ratios: Sequence[float] | None = None
    ttv_from: int | None = None
    ttv_only: bool = False
    abs_cos: bool = False

    name: ClassVar[str] = "transprune"
    stage: ClassVar[str] = "llm"
    rounding: ClassVar[str] = "floor"
    paper: ClassVar[str] = "TransPrune, code liaolea/TransPrune"
    zoo_fields: ClassVar[tuple[str, ...]] = ("prune_after", "ratios", "ttv_from")

    def __post_init__(self) -> None:
        if self.keep is not None:
            self._set("keep", validate_keep(self.keep))
        for flag in ("ttv_only", "abs_cos"):
            check_bool(self.name, flag, getattr(self, flag))
        self._set("prune_after", _layers(self.prune_after))
        self._set("ratios", _ratios(self.ratios))
        self._set("ttv_from", _ttv_from(self.ttv_from))
        if self._resolved:
            _check_schedule(*self.schedule())

    @property
    def _resolved(self) -> bool:
        return None not in (self.prune_after, self.ratios, self.ttv_from)

    @property
    def at(self) -> int | None:
        """The first prune layer once known."""
        return self.prune_after[0] if self.prune_after else None

    def resolve(self, adapter) -> Policy:
        self.require_zoo(adapter, *sorted(self.zoo_fields))
        _check_schedule(*self.schedule(), depth=adapter.num_layers)
        return self

    def schedule(self) -> tuple[tuple[int, ...], tuple[float, ...], int]:
        """(prune_after, ratios, ttv_from) as resolved for the wrapped model."""
        return self.resolved("prune_after", "ratios", "ttv_from")

    def signals(self) -> Signals:
        """Pruned before each ``prune_after`` layer; IGA reads the attention of the layer each prune point comes
        before (none with ``ttv_only``); TTV observes the sub-blocks of 1-based ``ttv_from`` through the last
        prune layer."""
        layers, _, ttv_from = self.schedule()
        return Signals(
            prune_before=layers,
            decoder_attention=() if self.ttv_only else layers,
            sub_blocks=tuple(range(ttv_from - 1, layers[-1])),
        )

    def sub_block_statistic(self, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return token_transition(x, y, valid, abs_cos=self.abs_cos)

    def image_budget(self, ctx: StageContext, b: int, i: int) -> int:
        """``int(N0 * r)`` for this prune point's ratio (``keep`` at the last one, when given)."""
        layers, ratios, _ = self.schedule()
        step = layers.index(ctx.layer)
        target = self.keep if self.keep is not None and step == len(layers) - 1 else ratios[step]
        n_alive = int(ctx.alive[b][i].numel())
        return resolve_budget(target, n_alive, ctx.layouts[b].images[i].num_tokens, self.rounding)

    def select_sample(self, ctx: StageContext, b: int) -> list[Selection]:
        if not ctx.num_images(b):
            return []
        attention = None if self.ttv_only else self.instruction_attention(ctx, b)
        out = []
        for i in range(ctx.num_images(b)):
            score = _normalised(self.accumulated_ttv(ctx, b, i))
            if attention is not None:
                score = score + _normalised(attention[ctx.seq_positions[b][i]])
            out.append(Selection(topk_indices(score, self.image_budget(ctx, b, i))))
        return out

    @staticmethod
    def accumulated_ttv(ctx: StageContext, b: int, i: int) -> torch.Tensor:
        """TTV of image i's alive tokens summed over every observed sub-block so far, fp32."""
        positions = ctx.seq_positions[b][i]
        total = torch.zeros(positions.numel(), dtype=torch.float32, device=positions.device)
        for value in ctx.sub_block_stats.values():
            total += value[b, positions.to(value.device)].to(total.device)
        return total

    @staticmethod
    def instruction_attention(ctx: StageContext, b: int) -> torch.Tensor | None:
        """IGA of every position of sample b, ``(L,)`` fp32; None when no token follows the images."""
        rows = ctx.after_images(b)
        if not rows.numel():
            return None
        assert ctx.layer is not None  # the llm stage
        return ctx.attention_rows(ctx.layer, ctx.hidden[b], b, rows).mean(dim=0)

    def describe(self) -> str:
        if not self._resolved:
            return "transprune(per-model schedule)"
        layers, ratios, ttv_from = self.schedule()
        options = [f"after={','.join(map(str, layers))}", f"ratios={','.join(f'{r:g}' for r in ratios)}", f"ttv_from={ttv_from}"]
        if self.keep is not None:
            options.append(f"keep={self.keep}")
        options += [flag for flag in ("ttv_only", "abs_cos") if getattr(self, flag)]
        return f"transprune({', '.join(options)})"


def _normalised(score: torch.Tensor) -> torch.Tensor:
    return score / (score.sum() + _EPS)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layers(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"transprune: prune_after must be a non-empty list of 1-based layer numbers; got {value!r}")
    if not all(_is_int(k) and k >= 1 for k in value) or list(value) != sorted(set(value)):
        raise ValueError(f"transprune: prune_after must be strictly increasing ints >= 1 (1-based layers); got {list(value)}")
    return tuple(value)


def _ratios(value) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"transprune: ratios must be a non-empty list of fractions in (0, 1]; got {value!r}")
    if not all(isinstance(r, Real) and not isinstance(r, bool) and 0.0 < float(r) <= 1.0 for r in value):
        raise ValueError(f"transprune: every ratio must be a fraction in (0, 1] of the original tokens; got {list(value)}")
    if list(value) != sorted(value, reverse=True):
        raise ValueError(f"transprune: ratios must not increase from one prune layer to the next; got {list(value)}")
    return tuple(float(r) for r in value)


def _ttv_from(value) -> int | None:
    if value is not None and not (_is_int(value) and value >= 1):
        raise ValueError(f"transprune: ttv_from must be a 1-based layer number (int >= 1); got {value!r}")
    return value


def _check_schedule(
    layers: tuple[int, ...], ratios: tuple[float, ...], ttv_from: int, depth: int | None = None
) -> tuple[tuple[int, ...], tuple[float, ...], int]:
    """The schedule if it is consistent (and fits a model of `depth` decoder layers), else a ValueError."""
    if len(ratios) != len(layers):
        raise ValueError(
            f"transprune: one ratio per prune layer is needed; got prune_after={list(layers)} and ratios={list(ratios)}"
        )
    if ttv_from > layers[0]:
        raise ValueError(
            f"transprune: ttv_from={ttv_from} starts after the first prune layer {layers[0]}; "
            f"allowed: 1..{layers[0]} (TTV must be accumulated before the first prune)"
        )
    if depth is not None and layers[-1] > depth - 1:
        raise ValueError(
            f"transprune: prune_after={list(layers)} does not fit this model's {depth} decoder layers; every prune "
            f"layer must be in 1..{depth - 1} (the layer after it scores the instruction attention and sees the kept set)"
        )
    return layers, ratios, ttv_from
