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

from vtprune.eval.selection_time import (
    CLIP_PATCHES,
    SPARSEVLM_PREFIX,
    SPARSEVLM_RATERS,
    SPARSEVLM_TABLES,
    SPARSEVLM_TEXT,
    merged_rows_match,
    reference_prunesid,
    reference_sparsevlm,
    sparsevlm_stage,
)
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


def _sparsevlm_inputs(seed: int, n: int = 576):
    """Random rater attention rows (24 raters over LLaVA-1.5's 35 + n + 40 tokens) and layer-output rows, D = 4096."""
    g = torch.Generator().manual_seed(seed)
    length = SPARSEVLM_PREFIX + n + SPARSEVLM_TEXT
    rows = torch.softmax(torch.randn(SPARSEVLM_RATERS, length, generator=g), dim=-1)
    return rows, torch.randn(length, 4096, generator=g)


@pytest.mark.parametrize("seed,budget,step", [(0, 64, 0), (1, 64, 1), (2, 128, 0), (3, 192, 2)])
def test_sparsevlm_reference_loop_keeps_and_merges_what_the_ops_do(seed, budget, step):
    """576 tokens: the official-structure loop (mask, gather, broadcast distances, weighted merge) and vtprune's
    ops (`prune_stage` as the policy calls it) keep the same tokens and emit the same merged rows in order."""
    rows, hidden = _sparsevlm_inputs(seed)
    kept, merged = sparsevlm_stage(rows, hidden, SPARSEVLM_PREFIX, CLIP_PATCHES, budget, step)
    want_kept, want_merged = reference_sparsevlm(rows, hidden, SPARSEVLM_PREFIX, CLIP_PATCHES, budget, step)
    k = SPARSEVLM_TABLES[budget][step]
    assert want_kept.numel() == k and want_merged.shape == (int((int((576 - k) * 0.3) + 1) / 10) + 1, 4096)
    assert torch.equal(kept, want_kept)
    assert merged_rows_match(merged, want_merged) == "in order"


def test_sparsevlm_reference_loop_reads_the_scores_and_the_table():
    """Other rater rows keep other tokens; another named budget keeps its own table's count."""
    rows, hidden = _sparsevlm_inputs(0)
    kept, _ = reference_sparsevlm(rows, hidden, SPARSEVLM_PREFIX, CLIP_PATCHES, 64)
    other_rows, _ = _sparsevlm_inputs(1)
    assert not torch.equal(reference_sparsevlm(other_rows, hidden, SPARSEVLM_PREFIX, CLIP_PATCHES, 64)[0], kept)
    assert reference_sparsevlm(rows, hidden, SPARSEVLM_PREFIX, CLIP_PATCHES, 128)[0].numel() == 303


def test_merged_rows_match_tells_order_from_set():
    a = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    assert merged_rows_match(a, a.clone()) == "in order"
    assert merged_rows_match(a, a[[1, 0, 2, 3, 4]]) == "as a set"
    assert merged_rows_match(a, a + 1e-3) == "no"
    assert merged_rows_match(a, a[:4]) == "no"
