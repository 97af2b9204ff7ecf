"""Token transition variation (TTV): how much one residual sub-block changes each token."""

from __future__ import annotations

import torch


@torch.no_grad()
def token_transition(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor | None = None, abs_cos: bool = False) -> torch.Tensor:
    """TTV of one sub-block per token, ``(B, L)`` in fp32 (TransPrune, Eq. for one attention or MLP block).

    ``x`` is the sub-block's input after its norm and ``y`` its output before
    the residual add, ``(B, L, D)``. Magnitude ``m = |y| / |x|``; direction
    ``d = cos(x, y)``; weight ``w = softmax(1 - d)`` over the valid tokens of
    each sample (padding, ``valid`` False, gets weight 0); TTV = ``w * m``.
    ``abs_cos=True`` uses ``1 - |d|``, as the paper writes it; the reference
    code uses ``1 - d``.
    """
    x, y = x.float(), y.float()
    x_norm, y_norm = x.norm(dim=-1), y.norm(dim=-1)
    magnitude = y_norm / x_norm
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    change = 1.0 - (cos.abs() if abs_cos else cos)
    if valid is None:
        valid = torch.ones_like(change, dtype=torch.bool)
    weight = torch.softmax(change.masked_fill(~valid, float("-inf")), dim=-1)
    return torch.where(valid, weight * magnitude, torch.zeros_like(magnitude))
