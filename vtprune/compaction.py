"""Sequence surgery: gather the kept rows of every tensor that carries sequence length.

`keep_index` turns a per-sample keep mask into gather indices with re-padding;
`gather_seq` applies them to hidden states, position ids (1-D or M-RoPE rows),
masks and rotary tables; `compact_batch` does the whole prefill compaction
(embeddings, new attention mask, positions) at once. This is the one
compaction op of the package (the CUDA kernel in `vtprune.cuda` does
`compact_batch` in one launch where a GPU is; the torch code here is the
reference and the CPU path).
"""

from __future__ import annotations

import torch


def keep_index(keep: torch.Tensor, pad_left: bool = True) -> torch.Tensor:
    """Gather indices ``(B, L')`` for a keep mask ``(B, L)``; ``-1`` marks padding.

    ``L'`` is the longest kept row; shorter rows are padded on the left (for
    generation) or on the right, as the input was.
    """
    counts = keep.sum(dim=1)
    width = int(counts.max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    slots = torch.arange(width, device=keep.device).expand(keep.shape[0], width)
    if pad_left:
        shift = width - counts
        src = (slots - shift[:, None]).clamp(min=0)
        index = torch.gather(order, 1, src)
        return index.masked_fill(slots < shift[:, None], -1)
    return order.masked_fill(slots >= counts[:, None], -1)


def gather_seq(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Rows of `x` along sequence dim `dim` picked by `index` ``(B, L')``; ``-1`` gives zeros.

    The batch dimension is the one just before `dim`; a batch size of 1 is
    broadcast (rotary tables are often shared across the batch).
    """
    dim = dim % x.dim()
    if x.is_cuda and x.dim() == 3 and dim == 1 and x.shape[0] == index.shape[0]:
        kernel = _kernel()
        if kernel is not None:
            with torch.cuda.device(x.device):
                return kernel.gather_seq(x, index.to(x.device), _stream(x))
    bdim = dim - 1
    bsz, width = index.shape
    if x.shape[bdim] != bsz:
        x = x.expand(*x.shape[:bdim], bsz, *x.shape[bdim + 1 :])
    rows = torch.arange(bsz, device=index.device)[:, None]
    safe = index.clamp(min=0)
    if bdim == 0:
        # (B, L, ...): one index_select over flattened rows, about the cost of a plain copy.
        flat = x.reshape(bsz * x.shape[1], *x.shape[2:])
        picked = flat.index_select(0, (rows * x.shape[1] + safe).flatten()).view(bsz, width, *x.shape[2:])
    else:  # leading dims (M-RoPE rows): advanced indexing, still whole rows
        picked = x[(slice(None),) * bdim + (rows, safe)]
    # Zero only the padding rows, in place (one host sync for their count; none are copied twice).
    pad = (index < 0).flatten().nonzero().squeeze(1)
    if pad.numel():
        if bdim == 0:
            picked.view(bsz * width, -1).index_fill_(0, pad, 0)
        else:
            view = [1] * x.dim()
            view[bdim], view[dim] = bsz, width
            picked.masked_fill_((index < 0).view(view), 0)
    return picked


def compact_batch(
    embeds: torch.Tensor, index: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The prefill compaction of a batch: kept embeddings, the new attention mask and the kept positions.

    `embeds` ``(B, L, D)``, `index` ``(B, L')`` from `keep_index` (``-1``
    pads), `positions` ``(B, L)`` or ``(P, B, L)`` (M-RoPE rows) or None.
    Returns ``gather_seq(embeds, index)``, ``(index >= 0).long()`` and
    ``gather_seq(positions, index, dim=-1)``: padding rows are zeros,
    padding positions 0. On a GPU the CUDA kernel writes all three in one
    launch, bit-identical (a pure copy).
    """
    if embeds.is_cuda and embeds.dim() == 3 and embeds.shape[0] == index.shape[0]:
        kernel = _kernel()
        rows = None if positions is None else positions.reshape(-1, *positions.shape[-2:])
        fits = rows is None or (rows.shape[1] == index.shape[0] and rows.dtype == torch.long and rows.is_cuda)
        if kernel is not None and fits:
            with torch.cuda.device(embeds.device):
                out, mask, pos = kernel.compact_batch(embeds, index.to(embeds.device), rows, _stream(embeds))
            return out, mask, None if pos is None else pos.view(*positions.shape[:-1], index.shape[1])
    mask = (index >= 0).long()
    pos = None if positions is None else gather_seq(positions, index, dim=-1)
    return gather_seq(embeds, index), mask, pos


def _stream(x: torch.Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream


def _kernel():
    from .cuda import load

    return load()
