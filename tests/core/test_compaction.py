"""The compaction op (torch path): gathers against a plain loop, every padding layout, the batch form."""

from __future__ import annotations

import pytest
import torch

from vtprune.compaction import compact_batch, gather_seq, keep_index


def loop_gather(x, index):
    bsz, width = index.shape
    out = torch.zeros(bsz, width, *x.shape[2:], dtype=x.dtype)
    for b in range(bsz):
        for j in range(width):
            if index[b, j] >= 0:
                out[b, j] = x[b if x.shape[0] == bsz else 0, index[b, j]]
    return out


@pytest.mark.parametrize("seed", range(20))
def test_gather_seq_equals_a_plain_loop(seed):
    g = torch.Generator().manual_seed(seed)
    bsz, length = int(torch.randint(1, 5, (), generator=g)), int(torch.randint(1, 12, (), generator=g))
    x = torch.randn(bsz, length, 3, generator=g)
    keep = torch.rand(bsz, length, generator=g) > 0.5
    for pad_left in (True, False):
        index = keep_index(keep, pad_left)
        assert torch.equal(gather_seq(x, index), loop_gather(x, index))
        ids = torch.randint(0, 9, (bsz, length), generator=g)
        assert torch.equal(gather_seq(ids, index), loop_gather(ids.unsqueeze(-1), index).squeeze(-1))
    scattered = torch.randint(-1, length, (bsz, 4), generator=g)  # -1 anywhere: the generic path
    assert torch.equal(gather_seq(x, scattered), loop_gather(x, scattered))
    shared = torch.randn(1, length, 2, generator=g)  # a batch of 1 is broadcast (rotary tables)
    assert torch.equal(gather_seq(shared, keep_index(keep)), loop_gather(shared, keep_index(keep)))


def test_compact_batch_equals_its_parts():
    torch.manual_seed(0)
    x = torch.randn(3, 20, 8)
    keep = torch.rand(3, 20) > 0.5
    keep[1] = False  # a sample that keeps nothing: all padding
    index = keep_index(keep)
    for positions in (torch.arange(20).expand(3, 20), torch.arange(60).view(3, 1, 20).expand(3, 3, 20), None):
        out, mask, pos = compact_batch(x, index, positions)
        assert torch.equal(out, gather_seq(x, index))
        assert torch.equal(mask, (index >= 0).long())
        if positions is None:
            assert pos is None
        else:
            assert torch.equal(pos, gather_seq(positions, index, dim=-1))
            assert pos.shape == (*positions.shape[:-1], index.shape[1])
    assert bool((out[1] == 0).all())


def test_gather_seq_zeros_only_padding():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3) + 1
    index = torch.tensor([[-1, -1, 1, 4], [0, 2, 3, 4]])
    out = gather_seq(x, index)
    assert torch.equal(out[0, :2], torch.zeros(2, 3))
    assert torch.equal(out[0, 2:], x[0, [1, 4]])
    assert torch.equal(out[1], x[1, [0, 2, 3, 4]])
    pos = gather_seq(torch.arange(10).view(2, 5) + 7, index, dim=-1)
    assert pos.tolist() == [[0, 0, 8, 11], [12, 14, 15, 16]]


@pytest.mark.parametrize("pad_left", [True, False])
def test_gather_seq_with_autograd_equals_no_grad_and_backpropagates(pad_left):
    """A forward without no_grad compacts hidden states that require grad: same values, gradients to the kept rows."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 4, generator=gen)
    keep = torch.tensor([[1, 0, 1, 1, 0, 0, 1], [0, 1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    index = keep_index(keep, pad_left=pad_left)
    with torch.no_grad():
        want = gather_seq(x, index)
    leaf = x.clone().requires_grad_(True)
    got = gather_seq(leaf, index)
    assert torch.equal(got, want)
    got.sum().backward()
    assert torch.equal(leaf.grad, keep[..., None].float().expand_as(x))
