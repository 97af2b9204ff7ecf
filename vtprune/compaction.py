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
    if bdim == 0:
        return _gather_rows(x, index)
    # leading dims (M-RoPE rows): advanced indexing, still whole rows
    rows = torch.arange(bsz, device=index.device)[:, None]
    picked = x[(slice(None),) * bdim + (rows, index.clamp(min=0))]
    pad = index < 0
    view = [1] * x.dim()
    view[bdim], view[dim] = bsz, width
    return picked.masked_fill_(pad.view(view), 0)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`gather_seq` for ``(B, L, ...)``: each output byte written once where the padding is left or right.

    With the padding at one end of each row (what `keep_index` makes), every
    sample's kept rows are gathered straight into their place and only the
    padding rows are zeroed, so the cost is a plain copy of the output. Any
    other layout of ``-1`` takes one gather of all slots and zeroes the
    padding rows after.
    """
    bsz, width = index.shape
    rest = x.shape[2:]
    valid = index >= 0
    counts = valid.sum(dim=1)
    kept = counts.tolist()  # the one host sync
    if all(c == width for c in kept):  # no padding: one gather over the flattened rows
        flat = x.reshape(bsz * x.shape[1], *rest)
        offsets = torch.arange(bsz, device=index.device)[:, None] * x.shape[1]
        return flat.index_select(0, (offsets + index).flatten()).view(bsz, width, *rest)
    slots = torch.arange(width, device=index.device)
    left = torch.equal(valid, slots >= (width - counts)[:, None])
    # out= writes cannot be differentiated: with autograd on (a forward without no_grad) take the gather below
    tracked = x.requires_grad and torch.is_grad_enabled()
    if not tracked and (left or torch.equal(valid, slots < counts[:, None])):
        out = torch.empty(bsz, width, *rest, dtype=x.dtype, device=x.device)
        for b, c in enumerate(kept):
            rows, pad = (slice(width - c, width), slice(0, width - c)) if left else (slice(0, c), slice(c, width))
            torch.index_select(x[b], 0, index[b, rows], out=out[b, rows])
            out[b, pad].zero_()
        return out
    flat = x.reshape(bsz * x.shape[1], *rest)
    offsets = torch.arange(bsz, device=index.device)[:, None] * x.shape[1]
    out = flat.index_select(0, (offsets + index.clamp(min=0)).flatten())
    out.view(bsz * width, -1).index_fill_(0, (~valid).flatten().nonzero().squeeze(1), 0)
    return out.view(bsz, width, *rest)


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
            return out, mask, None if pos is None or positions is None else pos.view(*positions.shape[:-1], index.shape[1])
    mask = (index >= 0).long()
    pos = None if positions is None else gather_seq(positions, index, dim=-1)
    return gather_seq(embeds, index), mask, pos


def _stream(x: torch.Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream


def _kernel():
    from .cuda import load

    return load()
