"""SparseVLM (code v1.5): text raters score image tokens inside the LLM; pruned ones are partly recycled into merged rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import BadValue, check_bool, check_int
from ..context import StageContext
from ..ops import sparsevlm as ops
from .base import Policy, Selection, Signals, register
from .pdrop import check_layers


@register
@dataclass(frozen=True)
class SparseVLM(Policy):
    """Prune image tokens at three decoder layers by the attention of text raters, recycling some into merged tokens.

    Source: "SparseVLM: Visual Token Sparsification for Efficient
    Vision-Language Model Inference" (Zhang et al., ICML 2025; code
    Gumpest/SparseVLMs, v1.5: ``modelling_sparse_llama.py``, ``score.py``,
    ``utils.py``). Per image:

    - Raters, once, from the layer-0 input embeddings: V = the image's rows,
      T = the rows after the image's span (text; other images' visual tokens
      excluded); m_j = mean over V of softmax_j(V T^T); the raters are the
      text rows with m_j > mean(m).
    - At each pruning layer l (``prune_after`` = l + 1: layer l runs on all
      current tokens, the prune applies to its output) the score of a
      current visual token (merged ones included) is layer l's own
      attention (post-RoPE queries of the rater rows, keys of every token,
      causal, grouped KV heads repeated, fp32 softmax), mean over heads,
      then over raters. The attention probe (`StageContext.attention_rows`)
      recomputes only those rows: the model never returns attention
      weights.
    - The top min(K_s, n - 1) of the n current tokens are kept, ascending
      (ties to the lowest index). With ``recycle``, the top
      int(0.3 * pruned) + 1 pruned tokens by score are clustered by DPC-KNN
      on layer l's output into int(that / 10) + 1 clusters and each cluster
      becomes one merged token (mean of its members), inserted right after
      the image's kept tokens in centre order (`vtprune.ops.sparsevlm`). A
      merged token is a visual token of the image at the next pruning layer.

    K_s: ``keep`` names one of the reference's tables for 576 tokens,
    64 -> (66, 30, 17), 128 -> (303, 110, 36), 192 -> (300, 200, 110)
    (visual tokens after each layer with the merged ones: 82 / 32 / 18,
    312 / 117 / 39, 309 / 204 / 113), scaled by N / 576 (floored) for an
    image of N tokens; or ``budgets`` gives K_s directly. The report's
    ``after`` counts the merged rows, ``merged`` says how many, ``kept``
    lists the image's own tokens only.

    Positions: a merged token takes its cluster centre's position id (and
    rotary rows), so with the default ``positions="original"`` positions
    are not monotone in sequence order (the decoder gets an explicit mask).
    The reference renumbers contiguously after every pruning layer:
    ``vtprune.wrap(..., positions="compact")`` (1-D RoPE families).

    Randomness: the DPC-KNN density noise (uniform times 1e-6) is drawn
    after seeding the global RNG with ``seed`` inside
    `torch.random.fork_rng`, once per image and pruning layer, so the
    caller's RNG stream is untouched and results are deterministic.

    Departures from the reference: batches, several images per sample and
    every family (the reference: LLaVA-1.5, batch 1, the first image,
    576 tokens at a fixed offset); each image has its own raters and its
    own tables scaled by its N (LLaVA-NeXT newlines are structure, never
    scored or counted); only the rater rows' attention is computed, in fp32
    (the reference materialises the full fp16 softmax); grouped KV heads
    are repeated; the noise comes from the seeded RNG (the reference draws
    from the unseeded global stream). A rater set that would be empty (all
    m_j equal, e.g. one text token) is every text row; an image with no
    text after it is rated by the sample's last real token. Not
    implemented: the October 2024 code and v2.0 (SparseVLM+).

    Parameters (None: the per-model default from model_zoo.yaml):
        keep: 64, 128 or 192, the reference's tables (default 64); not used
            when ``budgets`` is given (recorded as None).
        budgets: K_s per pruning layer (ints >= 1), one per ``prune_after``
            entry, used as given for every image (the reference also ships
            96 = (238, 48, 26)).
        prune_after: 1-based layer counts after which the sequence is
            pruned, strictly increasing; the reference's layers 2, 6, 15
            (0-based) are (3, 7, 16) on 32-layer LLaVA, scaled to each
            model's depth in the zoo. Report stages ``llm@3``, ``llm@7``,
            ``llm@16``.
        recycle: True (default, v1.5) inserts the merged tokens; False
            keeps K_s exactly.
        seed: seed of the DPC-KNN noise; default 0.
    """

    keep: int | None = 64  # type: ignore[assignment]  # None with `budgets`
    budgets: Sequence[int] | None = None
    prune_after: Sequence[int] | None = None
    recycle: bool = True
    seed: int = 0

    name: ClassVar[str] = "sparsevlm"
    stage: ClassVar[str] = "llm"
    rounding: ClassVar[str] = "floor"
    paper: ClassVar[str] = "SparseVLM (ICML 2025), code Gumpest/SparseVLMs"
    zoo_fields: ClassVar[tuple[str, ...]] = ("prune_after",)
    first_llm: ClassVar[bool] = True  # raters from layer 0's sequence

    def __post_init__(self) -> None:
        if self.budgets is not None:
            budgets = self.budgets
            if isinstance(budgets, (str, bytes)) or not isinstance(budgets, Sequence) or not budgets:
                raise BadValue(f"sparsevlm: budgets must be a non-empty list of token counts; got {budgets!r}")
            self._set("budgets", tuple(check_int(self.name, "every budget", k, minimum=1) for k in budgets))
            self._set("keep", None)
        elif isinstance(self.keep, bool) or self.keep not in ops.TABLES:
            raise BadValue(
                f"sparsevlm: keep must be one of {sorted(ops.TABLES)} (the reference's tables, scaled to each "
                f"image's tokens), or give budgets=(k1, k2, k3) per pruning layer; got keep={self.keep!r}"
            )
        self._set("prune_after", check_layers(self.name, self.prune_after))
        check_bool(self.name, "recycle", self.recycle)
        check_int(self.name, "seed", self.seed, minimum=0)
        stages = len(self.budgets) if self.budgets is not None else 3
        if self.prune_after is not None and len(self.prune_after) != stages:
            raise BadValue(
                f"sparsevlm: one pruning layer per budget is needed; got prune_after={list(self.prune_after)} and "
                f"{stages} budgets ({'budgets' if self.budgets is not None else f'the table of keep={self.keep}'})"
            )

    @property
    def at(self) -> int | None:
        return self.prune_after[0] if self.prune_after else None

    def resolve(self, adapter) -> Policy:
        self.require_zoo(adapter, "prune_after")
        assert self.prune_after is not None  # required above
        if self.prune_after[-1] > adapter.num_layers - 1:
            raise BadValue(
                f"sparsevlm: prune_after={list(self.prune_after)} does not fit this model's {adapter.num_layers} "
                f"decoder layers; every entry must be in 1..{adapter.num_layers - 1} (a layer runs after it)"
            )
        return self

    def signals(self) -> Signals:
        """Pruned after each scoring layer; reads layer 0's input (raters) and each scoring layer's input and attention."""
        layers = tuple(self.resolved("prune_after"))
        scoring = tuple(k - 1 for k in layers)
        return Signals(prune_before=layers, decoder_inputs=tuple(sorted({0, *scoring})), decoder_attention=scoring)

    def stage_counts(self, n: int) -> tuple[int, ...]:
        """K_s at each pruning layer for an image of ``n`` tokens (`vtprune.ops.sparsevlm.stage_counts`)."""
        return ops.stage_counts(self.keep, n, None if self.budgets is None else tuple(self.budgets))

    def select(self, ctx: StageContext) -> list[list[Selection]]:
        step = tuple(self.resolved("prune_after")).index(ctx.layer)
        if step == 0:  # the sequence is still layer 0's (`first_llm`): the raters' positions hold there
            for b in range(ctx.batch_size):
                for i in range(ctx.num_images(b)):
                    ctx.prefill_memo[(self, b, i)] = self._raters(ctx, b, i)
        return [[self._select_image(ctx, b, i, step) for i in range(ctx.num_images(b))] for b in range(ctx.batch_size)]

    @staticmethod
    def _text_after(ctx: StageContext, b: int, i: int) -> torch.Tensor:
        """Current positions of the rows after image i's span, other images' visual tokens excluded."""
        after = ctx.tokens_after(b, i)
        later = [ctx.seq_positions[b][j] for j in range(i + 1, ctx.num_images(b))]
        if later:
            after = after[~torch.isin(after, torch.cat(later).to(after.device))]
        return after

    def _raters(self, ctx: StageContext, b: int, i: int) -> torch.Tensor | None:
        """The raters of image i as indices into its text rows (`_text_after`); None where it has no text after it."""
        text = self._text_after(ctx, b, i)
        if text.numel() == 0:
            return None
        embeds = ctx.layer_input(0)[b]
        chosen = ops.raters(embeds[ctx.seq_positions[b][i]], embeds[text])
        return chosen if chosen.numel() else torch.arange(text.numel(), device=text.device)

    def _select_image(self, ctx: StageContext, b: int, i: int, step: int) -> Selection:
        n = int(ctx.alive[b][i].numel())
        device = ctx.hidden.device
        if n == 0:
            return Selection(torch.zeros(0, dtype=torch.long, device=device))
        raters = ctx.prefill_memo.get((self, b, i))
        if raters is None:
            rows = torch.nonzero(ctx.valid(b)).flatten()[-1:]
        else:
            rows = self._text_after(ctx, b, i)[raters.to(device)]
        assert ctx.layer is not None  # an llm-stage context
        layer = ctx.layer - 1
        attention = ctx.attention_rows(layer, ctx.layer_input(layer)[b], b, rows)
        score = attention.mean(dim=0)[ctx.seq_positions[b][i]]
        k = self.stage_counts(ctx.layouts[b].images[i].num_tokens)[step]
        noise = None
        if self.recycle:
            pruned = n - min(k, n - 1)
            count = int(pruned * ops.RECYCLE_FRACTION) + 1
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                noise = torch.rand(count, device=device) * ops.NOISE
        kept, merged, centres = ops.prune_stage(score, ctx.features(b, i), k, self.recycle, noise)
        if merged is None:
            return Selection(kept)
        return Selection(kept, inserted=merged.to(ctx.hidden.dtype), inserted_at=centres)

    def describe(self) -> str:
        if self.prune_after is None:
            return "sparsevlm(per-model layers)"
        counts = f"budgets={','.join(map(str, self.budgets))}" if self.budgets is not None else f"keep={self.keep}"
        options = [counts, f"after={','.join(map(str, self.prune_after))}"]
        if not self.recycle:
            options.append("recycle=False")
        return f"sparsevlm({', '.join(options)})"
