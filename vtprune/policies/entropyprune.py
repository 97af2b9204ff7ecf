"""EntropyPrune: matrix entropy of the visual tokens' queries, at the entropy-collapse layer (llm stage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import check_bool
from ..context import StageContext
from ..ops.entropy import matrix_entropy, validate_normalize
from .base import PerModelLayerPolicy, Signals, register


@register
@dataclass(frozen=True)
class EntropyPrune(PerModelLayerPolicy):
    """Keep the visual tokens whose queries have the highest matrix entropy, pruning once before layer K.

    Source: "EntropyPrune: Matrix Entropy Guided Visual Token Pruning for
    Multimodal Large Language Models" (code YahongWang1/EntropyPrune). The
    queries of decoder layer K-1 (its input norm and ``q_proj``, computed
    by `vtprune.patches.attention.layer_queries`, pre-RoPE: the score is
    RoPE-invariant) give each visual token an ``heads x head_dim`` matrix;
    its score is the matrix entropy of `vtprune.ops.entropy.matrix_entropy`
    (centred across heads, ``H x H`` dual Gram, float64 eigenvalues clamped
    at 1e-10, normalised by ln H); the top scores are kept. Layers 0..K-1
    see every visual token. Positions stay original, as in the reference.

    Parameters:
        keep: visual tokens per image from layer K on (int) or a fraction
            of the image's tokens; default 64.
        at_layer: K, 0-based like every ``at_layer``; None (default) is the
            reference's choice per model: 2 for LLaVA-1.5/NeXT, 1 for Qwen.
        normalize: None (default, the reference) or ``"trace"`` (eigenvalues
            divided by their sum before the entropy).
        average: False (default): ``keep`` is the count from layer K on.
            True reads ``keep`` as the reference does, the average count over
            all L layers: kept = ``int((L * keep - K * N) / (L - K))``
            (LLaVA-1.5-7B: 192/128/64 -> 166/98/29); a fraction means
            ``keep * N``. A target the formula cannot meet is an error.
    """

    keep: int | float = 64
    at_layer: int | None = None
    normalize: str | None = None
    average: bool = False

    name: ClassVar[str] = "entropyprune"
    paper: ClassVar[str] = "EntropyPrune, code YahongWang1/EntropyPrune"

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_normalize(self.normalize)
        check_bool(self.name, "average", self.average)

    def signals(self) -> Signals:
        """Pruned before K; reads the queries of layer K-1 (its own q_proj output, captured), a softmax layer."""
        k = self.resolved_layer()
        return Signals(prune_before=(k,), decoder_queries=(k - 1,), decoder_attention=(k - 1,))

    def budget(self, ctx: StageContext, b: int, i: int) -> int:
        if not self.average:
            return super().budget(ctx, b, i)
        n_alive = int(ctx.alive[b][i].numel())
        if n_alive == 0:
            return 0
        depth, at = ctx.adapter.num_layers, self.resolved_layer()
        n = ctx.layouts[b].images[i].num_tokens
        target = self.keep if isinstance(self.keep, int) else self.keep * n
        kept = int((depth * target - at * n) / (depth - at))
        if kept < 1:
            raise ValueError(
                f"entropyprune(average=True): an average of {target:g} visual tokens over {depth} layers cannot be "
                f"met when layers 0..{at - 1} see all {n} tokens (the formula gives {kept}); raise keep above "
                f"{(at * n + depth - at) / depth:g} or use average=False"
            )
        return min(kept, n_alive)

    def score(self, ctx: StageContext, b: int, i: int) -> torch.Tensor:
        return matrix_entropy(ctx.queries(self.resolved_layer() - 1, b, i), self.normalize)

    def describe(self) -> str:
        options = [f"at_layer={self.at_layer if self.at_layer is not None else 'per-model'}"]
        if self.normalize:
            options.append(f"normalize={self.normalize}")
        if self.average:
            options.append("average")
        return f"entropyprune({', '.join(options)})"
