"""The selection-time table's PruneSID reference loop keeps what the policy's selector keeps.

`eval/selection_time.py` reports ``equal`` beside each timing; for PruneSID the
reference is a second implementation with the official code's structure
(one batched seeded PCA over the views, a group-masked similarity per group,
NMS for all groups at once). On random fp32 tensors of LLaVA-1.5 geometry
(576 patches, CLIP-L width) both must keep the same patches, so the column
can say "yes" only when the two agree.
"""

import pytest
import torch

from vtprune.eval.selection_time import CLIP_PATCHES, reference_prunesid
from vtprune.ops.leaders import pca_groups, prunesid_select


@pytest.mark.parametrize("views,t", [(1, 64), (1, 128), (2, 32)])
def test_prunesid_reference_loop_keeps_the_selectors_patches(views, t):
    g = torch.Generator().manual_seed(views * 1000 + t)
    rows = torch.randn(views, 1 + CLIP_PATCHES, 1024, generator=g)  # CLS first, as the reference reads them
    attention = torch.softmax(torch.randn(views, CLIP_PATCHES, generator=g), dim=-1)
    ref = reference_prunesid(rows, attention, t)
    assert ref.shape == (views, t) and bool((ref[:, 0] == 0).all())  # CLS slot first, t tokens per view
    patches = list(rows[:, 1:])
    groups = pca_groups(patches, int(t / 4), 0, batched=True)
    for v in range(views):
        ours = prunesid_select(patches[v], attention[v], t, group=groups[v])
        assert ours.numel() == t - 1
        assert torch.equal(ours, torch.sort(ref[v, 1:] - 1).values)


def test_prunesid_reference_loop_sees_the_groups():
    """A different PCA seed gives other groups and, on random features, another keep set: the loop reads them."""
    g = torch.Generator().manual_seed(7)
    rows = torch.randn(1, 1 + CLIP_PATCHES, 1024, generator=g)
    attention = torch.softmax(torch.randn(1, CLIP_PATCHES, generator=g), dim=-1)
    assert not torch.equal(reference_prunesid(rows, attention, 64, seed=0), reference_prunesid(rows, attention, 64, seed=1))
