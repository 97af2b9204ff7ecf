"""Each selector beside a plain reimplementation of its reference loop: same tensors, one process, interleaved.

The reference loops below are ours, written from the papers
(never copied): the structure each paper's code has, in plain torch.

- IDPruner / AngelSlim MMR: the full cosine matrix, then one argmax per step
  over ``lam * I - (1 - lam) * max_sim``.
- MMTok (official greedy): the full coverage matrix, every column's gain
  recomputed at every step.
- DivPrune (official loop): the full ``1 - cosine`` matrix; each step takes
  the minimum over all the picked columns again.
- DART: 4 image and 4 text pivots by key norm (``topk``), visited in a
  Python set's order, each taking the ``k // 8`` lowest cosines of the pool.
- PyramidDrop: ``topk`` of one attention row (the probe that computes the
  row is the attention probe, timed with FastV's in the bench).
- HoloV (official structure): a Python loop over the chunks, each with its
  own masked similarity matrix, scores, allocation, then a top-k per chunk
  (the reference's ``overflow="drop"``).
- CDPruner (official loop): the conditional kernel, then the incremental
  Cholesky greedy with an einsum over all earlier rows at every step.
- SCOPE (official loop): every step masks the picked columns of the full
  cosine matrix and sums all N x N clipped differences again.
- VisPruner (official rounds): the same rounds; compared on even-length lists.
- PruneSID (official structure): one seeded batched PCA over the views, a
  ``(views, groups, N, N)`` group-masked copy of the cosine matrix, NMS for
  all groups at once, the budget split in whole-tensor loops, an argsort per
  group; per 576-token view (2880 -> 320 is LLaVA-NeXT's 5 views of
  576 -> 64, both sides), so only on LLaVA shapes whose N is a multiple of 576.
- SparseVLM (official v1.5 structure, one pruning layer, the first): the
  raters' mean attention over the image's columns, a boolean ``topk`` mask
  to K_s (the table of keep = K * 576 / N, scaled to N), the pruned tokens
  gathered from the whole sequence, the top 30% of them by score, DPC-KNN on
  broadcast pairwise differences and the weighted ``index_add_`` merge; the
  same seeded noise both sides. Compared: keep set and merged rows
  (allclose 1e-5). Only where K * 576 / N names a table (64, 128, 192).

Per case it prints vtprune's time, the reference's, their ratio, the peak
memory each allocates (`vtprune.measure.peak_bytes`) and whether the keep
sets are equal (MMTok: the pick order too). Runs are interleaved
(round-robin over repeats after a warm-up) with one torch thread, so load
drift hits both sides alike. EntropyPrune has no reference loop here (its
score is one batched eigen-decomposition); its time is listed alone, as is
the ViT probe of IDPruner's default `received` importance (LLaVA shapes).

    python -m vtprune.eval.selection_time                        # 576 -> 64, 2880 -> 320, 8192 -> 819
    python -m vtprune.eval.selection_time --cases llava:576:64 --repeats 9 --json runs/sel.json
    python -m vtprune.eval.selection_time --cases llava:576:64 --only scope dart --json runs/sel.json
    python -m vtprune.eval.selection_time --whole 1 5 --repeats 9  # the policy's whole selection, 576 and 2880

``--whole IMAGES``: selection as users pay for it. A tiny random-weight
LLaVA with the language model's width D = 1024 (`WHOLE_GEOMETRY`: 576
tokens per image) is wrapped with IDPruner (``importance="norm"``) and
MMTok at keep=64 per image, and one prompt with IMAGES images and a
32-token question is run through the public API; the policy's whole
selection is the report's ``ms`` (what `StageRunner.apply` times around
``policy.select``), read in thread CPU time. Beside it, on the same
in-model tensors (the projector's input and output, the question's
embeddings): the selector function alone and the reference loop, each
with the importance or question computation it needs. Rounds are
interleaved; the table gives medians and the quietest round's ratios.

Shapes: ``llava`` is LLaVA-1.5/NeXT-7B (D=4096, CLIP-L D'=1024, 32 heads x
128), ``qwen`` Qwen2.5-VL-7B (D=3584, ViT D'=1280, 28 heads x 128). The
question has 32 tokens. Features are random (the issue's setting); real
image features are more redundant, which changes the lazy loops' work but
not their result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn

from vtprune.measure import interleaved, median, peak_bytes
from vtprune.ops import sparsevlm as sparsevlm_ops
from vtprune.ops.coverage import coverage_select
from vtprune.ops.dart import dart_select
from vtprune.ops.diversity import divprune_select
from vtprune.ops.dpp import cdpruner_select, minmax_llm, relevance_llm
from vtprune.ops.entropy import matrix_entropy
from vtprune.ops.greedy import cosine_similarity
from vtprune.ops.holov import holov_select
from vtprune.ops.leaders import pca_groups, prunesid_select, scope_select, vispruner_select
from vtprune.ops.mmr import mmr_select
from vtprune.ops.select import topk_indices
from vtprune.patches.attention import layer_queries, vit_attention_received
from vtprune.policies.mmtok import coverage_matrix
from vtprune.policies.selector import VisionSelector


class Shape(TypedDict):
    """One model's geometry: LLM width, ViT width, attention heads and head width, MMTok's text temperature."""

    dim: int
    pre_dim: int
    heads: int
    head_dim: int
    tau_t: float


SHAPES: dict[str, Shape] = {
    "llava": {"dim": 4096, "pre_dim": 1024, "heads": 32, "head_dim": 128, "tau_t": 0.02},
    "qwen": {"dim": 3584, "pre_dim": 1280, "heads": 28, "head_dim": 128, "tau_t": 0.01},
}
DEFAULT_CASES = [("llava", 576, 64), ("llava", 2880, 320), ("qwen", 8192, 819)]
QUESTION_TOKENS = 32
SELECTOR_HIDDEN = 1792
LAM, ALPHA, TAU_V = 0.5, 0.5, 0.2
CLIP_L: dict[str, Any] = {"hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096}
CLIP_TOKENS = 577  # 336 px / 14, plus CLS
CLIP_PATCHES = CLIP_TOKENS - 1
#: the reference loops allocate the same temporaries at every step, so at N >= this their memory run
#: stops after `MEMORY_STEPS` picks (the peak is reached at the first step); vtprune's runs are complete
BIG = 4096
MEMORY_STEPS = 8


# --- reference loops (ours, from the algorithms) ------------------------------------------------------


def _unit(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    x = x.float()
    return x / (x.norm(dim=-1, keepdim=True) + eps)


def reference_mmr(features: torch.Tensor, importance: torch.Tensor, k: int, lam: float = LAM) -> torch.Tensor:
    """AngelSlim-style MMR: full cosine matrix, one argmax per step; kept indices ascending."""
    unit = _unit(features)
    sim = unit @ unit.T
    s = importance.float()
    imp = (s - s.min()) / (s.max() - s.min() + 1e-6)
    picked = torch.zeros(unit.shape[0], dtype=torch.bool, device=unit.device)
    first = torch.argmax(imp)
    keep = [first]
    picked[first] = True
    max_sim = sim[:, first].clone()
    for _ in range(1, k):
        score = lam * imp - (1 - lam) * max_sim
        score[picked] = float("-inf")
        j = torch.argmax(score)
        keep.append(j)
        picked[j] = True
        max_sim = torch.maximum(max_sim, sim[:, j])
    return torch.sort(torch.stack(keep)).values


def reference_divprune(features: torch.Tensor, k: int) -> torch.Tensor:
    """The official DivPrune loop's structure: ``1 - cosine`` matrix, the min over all picked columns each step."""
    unit = _unit(features)
    dist = 1.0 - unit @ unit.T
    dist.fill_diagonal_(float("inf"))  # a token is not its own nearest neighbour (first pick)
    keep = [torch.argmax(dist.min(dim=1).values)]
    picked = torch.zeros(unit.shape[0], dtype=torch.bool, device=unit.device)
    picked[keep[0]] = True
    for _ in range(1, k):
        # the matrix is symmetric: the picked rows, read contiguously, are the picked columns
        to_set = dist.index_select(0, torch.stack(keep)).min(dim=0).values
        to_set[picked] = float("-inf")
        j = torch.argmax(to_set)
        keep.append(j)
        picked[j] = True
    return torch.sort(torch.stack(keep)).values


def reference_coverage_matrix(visual, visual_pre, text, tau_t: float) -> torch.Tensor:
    """MMTok's coverage matrix, plainly: text rows softmax(cos(T, V) / tau_t) / m; visual rows alpha softmax(...) / n."""
    v, vp, t = _unit(visual), _unit(visual_pre), _unit(text)
    n, m = v.shape[0], t.shape[0]
    text_rows = torch.softmax(t @ v.T / tau_t, dim=1) / m
    visual_rows = ALPHA * torch.softmax(vp @ vp.T / TAU_V, dim=1) / n
    return torch.cat([text_rows, visual_rows])


def reference_mmtok(visual, visual_pre, text, tau_t: float, k: int) -> torch.Tensor:
    """The official MMTok greedy's structure: full coverage matrix, all gains every step; the pick order."""
    cover = reference_coverage_matrix(visual, visual_pre, text, tau_t)
    best = torch.zeros(cover.shape[0], 1, device=cover.device)
    picked = torch.zeros(cover.shape[1], dtype=torch.bool, device=cover.device)
    order = []
    for _ in range(k):
        gains = (cover - best).clamp(min=0).sum(dim=0)
        gains[picked] = float("-inf")
        j = torch.argmax(gains)
        order.append(j)
        picked[j] = True
        best = torch.maximum(best, cover[:, j : j + 1])
    return torch.stack(order)


def reference_dart(key_norm, features, text_key_norm, text_features, k: int) -> torch.Tensor:
    """DART's loop structure: 4 + 4 pivots by key norm, a Python set of positions, per pivot the k // 8 lowest cosines."""
    n = features.shape[0]
    img = torch.topk(key_norm, 4).indices
    txt = torch.topk(text_key_norm, 4).indices
    pivot = {int(i): features[i] for i in img}
    pivot.update({n + 1 + int(j): text_features[j] for j in txt})  # text after the image (and its end token)
    pool = torch.ones(n, dtype=torch.bool, device=features.device)
    pool[img] = False
    kept = [img]
    for p in set(pivot):
        left = torch.nonzero(pool).flatten()
        cos = torch.nn.functional.cosine_similarity(features[left].float(), pivot[p][None].float(), dim=-1)
        picks = left[torch.topk(cos, min(k // 8, left.numel()), largest=False).indices]
        pool[picks] = False
        kept.append(picks)
    return torch.sort(torch.cat(kept)).values


def reference_holov(features: torch.Tensor, attention: torch.Tensor, k: int) -> torch.Tensor:
    """HoloV's structure: per contiguous chunk a masked similarity matrix and a score; floor allocation, the
    left-over to the largest weights, the excess of a full chunk lost; top-k attention per chunk; ascending."""
    n = features.shape[0]
    chunks = max(1, int(((1024 / 576) * n) / k))
    size, extra = divmod(n, chunks)
    bounds, start = [], 0
    for p in range(chunks):
        end = start + size + (1 if p < extra else 0)
        if end > start:
            bounds.append((start, end))
        start = end
    scores = []
    for lo, hi in bounds:
        f, a = features[lo:hi].float(), attention[lo:hi].float()
        m = hi - lo
        if m <= 1:
            scores.append(a.mean())
            continue
        fn = f / (f.norm(dim=1, keepdim=True) + 1e-6)
        s = (fn @ fn.T) * (1 - torch.eye(m, device=f.device))
        mean = s.sum(1) / (m - 1)
        var = ((s - mean[:, None]) ** 2).sum(1) / (m - 1)
        a = a * 1e3
        scores.append((a + 0.09 * var * (a.abs().mean() / (var.abs().mean() + 1e-6))).mean())
    stacked = torch.stack(scores)
    weights = stacked / (stacked.sum() + 1e-6)
    alloc = (weights * k).floor().long()
    left = int(k - alloc.sum())
    if left > 0:
        alloc[torch.topk(weights, min(left, len(bounds))).indices] += 1
    kept = []
    for (lo, hi), al in zip(bounds, alloc.tolist()):
        if al >= hi - lo:
            kept.append(torch.arange(lo, hi, device=features.device))
        elif al > 0:
            kept.append(torch.topk(attention[lo:hi], al).indices + lo)
    return torch.sort(torch.cat(kept)).values


def reference_cdpruner(features: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """CDPruner's loop: kernel r S r, then each step an einsum over every earlier row (incremental Cholesky)."""
    unit = features.float() / features.float().norm(dim=-1, keepdim=True)
    kernel = relevance[:, None] * (unit @ unit.T) * relevance[None, :]
    n = kernel.shape[0]
    cis = torch.zeros(k, n, device=kernel.device)
    di2s = torch.diagonal(kernel).clone()
    picks = []
    for i in range(k):
        j = torch.argmax(di2s)
        picks.append(j)
        eis = (kernel[j] - torch.einsum("t,tn->n", cis[:i, j], cis[:i])) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s -= eis**2
        di2s[j] = -float("inf")
    return torch.sort(torch.stack(picks)).values


# --- the case --------------------------------------------------------------------------------------


class _ProbeLayer(nn.Module):
    """Just the parts of a decoder layer the query probe reads."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(dim)
        attn: Any = nn.Module()
        attn.q_proj = nn.Linear(dim, heads * head_dim)
        attn.head_dim = head_dim
        self.self_attn = attn


def _clip_layer(device: torch.device) -> nn.Module:
    """One CLIP-L/336 encoder layer (random weights): what the ViT probe of IDPruner's `received` importance reads."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    return CLIPEncoderLayer(CLIPVisionConfig(**CLIP_L)).to(device).eval()


def reference_scope(features: torch.Tensor, saliency: torch.Tensor, k: int) -> torch.Tensor:
    """SCOPE's loop as its code has it: every step masks the picked columns of the full cosine matrix, subtracts
    the cover from every row and sums all N x N entries again."""
    x = features.float()
    unit = x / x.norm(dim=-1, keepdim=True)
    sim = unit @ unit.T
    n = sim.shape[0]
    picked = torch.zeros(n, dtype=torch.bool, device=x.device)
    cover = torch.zeros(n, device=x.device)
    out = []
    for _ in range(k):
        gains = torch.clamp(sim.masked_fill(picked[None, :], 0) - cover[:, None], min=0).sum(dim=0) * saliency
        j = int(torch.argmax(gains.masked_fill(picked, float("-inf"))))
        out.append(j)
        picked[j] = True
        cover = torch.maximum(cover, sim[j])
    return torch.sort(torch.tensor(out, device=x.device)).values


def reference_vispruner(features: torch.Tensor, attention: torch.Tensor, k: int) -> torch.Tensor:
    """VisPruner's rounds as its code has them (even-length lists): argsort of the even entries' max cosine."""
    x = features.float()
    unit = x / x.norm(dim=-1, keepdim=True)
    order = torch.sort(attention, descending=True, stable=True).indices
    important, rest = order[: k // 2], order[k // 2 :]
    diverse = k - k // 2
    while (s := min(8, rest.numel() - diverse)) > 0:
        evens, odds = rest[0::2], rest[1::2]
        best = (unit[evens] @ unit[odds].T).max(dim=-1).values
        keep = torch.sort(best, descending=True, stable=True).indices[s:]
        rest = torch.cat([evens[keep], odds])
    return torch.sort(torch.cat([important, rest])).values


def reference_prunesid(views: torch.Tensor, cls_attention: torch.Tensor, t: int, seed: int = 0) -> torch.Tensor:
    """PruneSID (LLaVA) as its code has it, batched over views: ``views`` (B, 1 + N, D') are the layer -2 rows
    with CLS first, ``cls_attention`` (B, N) the CLS row summed over heads, ``t`` each view's budget with its
    CLS slot. One seeded PCA call for the whole batch; a (B, G, N, N) copy of the cosine matrix kept where the
    row or the column is in group g; NMS for every group at once, one pick per group per round; the budget
    split with whole-tensor ``while`` loops; per group an argsort of its (B, N) score column. Sorts are
    stable (ties to the lowest index, vtprune's rule; the reference's are not). Returns (B, t) token indices, CLS (0) first, then
    group 0's picks, group 1's, ... as the reference emits them."""
    b, n = cls_attention.shape
    g = int(t / 4)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        z = torch.sigmoid(views.float()).transpose(2, 1)[:, :, 1:]  # (B, D', N) without CLS
        _, _, v = torch.pca_lowrank(z, q=g, niter=2)
    member = torch.argmax(v.abs(), dim=-1)  # (B, N)
    in_group = member[:, :, None] == torch.arange(g)[None, None, :]  # (B, N, G)
    scores = cls_attention.float()[:, :, None].expand(b, n, g).clone()
    scores[~in_group] = 0
    unit = torch.nn.functional.normalize(views[:, 1:].float(), p=2, dim=-1)
    sim = torch.bmm(unit, unit.transpose(1, 2))
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    theta = (t / 32) * (sim * upper).sum((-1, -2)) / upper.sum()  # (B,)
    rows = in_group.transpose(1, 2)  # (B, G, N)
    group_sim = sim[:, None].expand(b, g, n, n).clone()
    group_sim[~(rows[:, :, :, None] | rows[:, :, None, :])] = 0
    left, ranked, mark, picks = scores.clone(), scores.clone(), 1000.0, torch.zeros(b, g, dtype=torch.long)
    bi, gi = torch.arange(b)[:, None].expand(b, g), torch.arange(g)[None, :].expand(b, g)
    while left.sum() > 0:
        best, where = left.max(dim=1)  # (B, G): one pick per group
        live = best > 0
        sim_row = group_sim[bi, gi, where]  # (B, G, N)
        ranked[bi[live], where[live], gi[live]] = mark
        left[bi[live], where[live], gi[live]] = 0
        picks += live.long()
        mark -= 1
        left[(sim_row > theta[:, None, None]).transpose(1, 2)] = 0
    counts = in_group.sum(dim=1)  # (B, G)
    lower = counts.clamp(max=1)
    upper_b = torch.minimum(torch.minimum(torch.full_like(counts, 5 * math.ceil(t / 64)), counts), picks)
    while bool((upper_b.sum(-1) < t).any()):
        short = upper_b.sum(-1) < t
        upper_b[short] = torch.minimum(upper_b[short] + 1, counts[short])
    spare = (t - lower.sum(-1) - 1).clamp(min=0)  # the -1: the CLS slot
    cum = torch.round(torch.cumsum(picks / picks.sum(-1, keepdim=True), dim=-1) * spare[:, None]).long()
    share = torch.minimum(cum - torch.nn.functional.pad(cum[:, :-1], (1, 0)) + lower, upper_b)
    order = torch.argsort(picks, dim=-1, descending=True, stable=True)
    target = spare + lower.sum(-1)
    for i in range(b):
        for j in order[i].tolist():
            if int(share[i].sum()) >= int(target[i]):
                break
            share[i, j] += min(int(upper_b[i, j] - share[i, j]), int(target[i] - share[i].sum()))
    ranking = torch.argsort(ranked, dim=1, descending=True, stable=True)  # (B, N, G)
    out = []
    for i in range(b):
        parts = [ranking[i, : int(share[i, j]), j] + 1 for j in range(g)]
        out.append(torch.cat([torch.zeros(1, dtype=torch.long), *parts]))
    return torch.stack(out)


#: SparseVLM (code v1.5): K_s at its three pruning layers per named budget on 576 tokens (its score.py tables)
SPARSEVLM_TABLES = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}
#: rows of the pairwise-difference tensor per block in `reference_sparsevlm` (the official one broadcast is
#: (r, r, D): 9.6 GB fp32 at 2880 -> 320's 766 recycled rows of D = 4096)
SPARSEVLM_DIST_ROWS = 32


def reference_sparsevlm(
    rater_rows: torch.Tensor, hidden: torch.Tensor, start: int, n: int, budget: int, step: int = 0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SparseVLM v1.5 pruning layer as its code has it, for one image of ``n`` tokens at ``start``.

    ``rater_rows`` (R, L): the text raters' attention rows (mean over heads) over the whole sequence;
    ``hidden`` (L, D): the layer's output; ``budget``: the named budget on 576 tokens (64, 128, 192), its
    table scaled by ``n / 576``. The score is the raters' mean over the image's columns; a boolean mask of its
    ``topk`` (at most n - 1); the pruned tokens gathered from the whole sequence where the mask is off; the
    top int(0.3 * pruned) + 1 of them by score (``topk``); DPC-KNN over those: the full pairwise L2 distance
    of broadcast differences / sqrt(D) (here in blocks of `SPARSEVLM_DIST_ROWS` rows, to bound memory),
    density from the ``topk`` nearest plus global-RNG noise drawn after seeding ``seed`` (the reference
    draws from the unseeded stream), the masked delta, ``topk`` centres, argmin assignment, centres to
    themselves, the weighted ``index_add_`` merge. Returns (kept image indices ascending, merged rows (c, D)).
    """
    table = SPARSEVLM_TABLES[budget]
    k = table[step] if n == 576 else int(table[step] * n / 576)
    relation = rater_rows[None, :, start : start + n].float().mean(dim=1)  # (1, n)
    mask = torch.zeros_like(relation, dtype=torch.bool)
    mask[0, torch.topk(relation, min(k, n - 1), dim=1).indices[0]] = True
    keep_all = torch.ones(1, hidden.shape[0], dtype=torch.bool, device=hidden.device)
    keep_all[:, start : start + n] = mask
    sparse = hidden[None].float()[:, torch.nonzero(~keep_all[0]).flatten()]  # (1, pruned, D), sequence order
    pruned_scores = relation[0][torch.nonzero(~mask[0]).flatten()]
    count = int(pruned_scores.numel() * 0.3) + 1
    x = sparse[:, torch.topk(pruned_scores, count).indices]  # (1, r, D)
    clusters = int(x.shape[1] / 10) + 1
    _, r, d = x.shape
    dist = torch.cat(
        [(x[:, i : i + SPARSEVLM_DIST_ROWS, None] - x[:, None]).norm(dim=-1, p=2) for i in range(0, r, SPARSEVLM_DIST_ROWS)],
        dim=1,
    ) / (d**0.5)
    nearest = torch.topk(dist, k=clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    with torch.random.fork_rng(devices=[hidden.device] if hidden.device.type == "cuda" else []):
        torch.manual_seed(seed)
        density = density + torch.rand(density.shape, device=density.device, dtype=density.dtype) * 1e-6
    denser = (density[:, None, :] > density[:, :, None]).float()
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
    delta = (dist * denser + dist_max * (1 - denser)).min(dim=-1).values
    centres = torch.topk(delta * density, k=clusters, dim=-1).indices  # (1, c)
    assign = dist[:, centres[0]].argmin(dim=1)  # (1, r)
    assign[0, centres[0]] = torch.arange(clusters, device=x.device)
    weight = x.new_zeros(clusters, 1).index_add_(0, assign[0], x.new_ones(r, 1)) + 1e-6
    norm_weight = x.new_ones(r, 1) / weight[assign[0]]
    merged = x.new_zeros(clusters, d).index_add_(0, assign[0], x[0] * norm_weight)
    return torch.nonzero(mask[0]).flatten(), merged


#: the sequence around a SparseVLM image: LLaVA-1.5's 35 prompt tokens before it, a 40-token question after
#: it, 24 of whose rows are raters (in the reference about half the text rows pass m_j > mean(m))
SPARSEVLM_PREFIX, SPARSEVLM_TEXT, SPARSEVLM_RATERS = 35, 40, 24


def sparsevlm_stage(
    rater_rows: torch.Tensor, hidden: torch.Tensor, start: int, n: int, budget: int, step: int = 0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """vtprune's side of one SparseVLM pruning layer, as the policy runs it on one image: the raters' mean
    attention over the image's columns, the scaled table's K_s, the seeded noise, `prune_stage`."""
    score = rater_rows.float().mean(dim=0)[start : start + n]
    k = sparsevlm_ops.stage_counts(budget, n)[step]
    count = int((n - min(k, n - 1)) * sparsevlm_ops.RECYCLE_FRACTION) + 1
    with torch.random.fork_rng(devices=[hidden.device] if hidden.device.type == "cuda" else []):
        torch.manual_seed(seed)
        noise = torch.rand(count, device=hidden.device) * sparsevlm_ops.NOISE
    kept, merged, _ = sparsevlm_ops.prune_stage(score, hidden[start : start + n], k, True, noise)
    assert merged is not None  # recycle=True with k < n
    return kept, merged


def merged_rows_match(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> str:
    """``"in order"`` when the merged rows are allclose row by row, ``"as a set"`` when they are after a
    permutation (clusters emitted in another centre order), else ``"no"``."""
    if ours.shape != theirs.shape:
        return "no"
    if torch.allclose(ours, theirs, rtol=rtol, atol=atol):
        return "in order"
    close = (ours[:, None] - theirs[None]).abs() <= atol + rtol * theirs[None].abs()  # (c, c, D)
    match = close.all(dim=-1)
    used: set[int] = set()
    for i in range(match.shape[0]):
        free = [j for j in torch.nonzero(match[i]).flatten().tolist() if j not in used]
        if not free:
            return "no"
        used.add(free[0])
    return "as a set"


def _topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, k).indices).values


def time_case(
    shape: str, n: int, k: int, repeats: int, warmup: int, device: torch.device, only: list[str] | None = None
) -> list[dict]:
    """Rows of the table for one geometry: each selector, vtprune beside its reference (``only``: the selectors
    whose row name starts with one of these words, e.g. ``["scope", "dart"]``)."""
    geo = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    visual = torch.randn(n, geo["dim"], generator=g).to(device)
    visual_pre = torch.randn(n, geo["pre_dim"], generator=g).to(device)
    question = torch.randn(QUESTION_TOKENS, geo["dim"], generator=g).to(device)
    hidden = torch.randn(n, geo["dim"], generator=g).to(device)
    scorer = VisionSelector(
        "random",
        geo["dim"],
        SELECTOR_HIDDEN,
        torch.randn(SELECTOR_HIDDEN, geo["dim"], generator=g) * 0.02,
        torch.zeros(SELECTOR_HIDDEN),
        torch.randn(SELECTOR_HIDDEN, geo["dim"], generator=g) * 0.02,
        torch.zeros(SELECTOR_HIDDEN),
    )
    with torch.no_grad():
        prompt_imp = cosine_similarity(visual, question.mean(dim=0, keepdim=True))[:, 0]
        relevance = minmax_llm(relevance_llm(visual, question))
        vit_attention = torch.softmax(torch.randn(n, generator=g), dim=0).to(device)
        selector_imp = scorer.score(visual).float()
        saliency = torch.softmax(torch.randn(n, generator=torch.Generator().manual_seed(1)), dim=0).to(device)  # CLS row
        queries = layer_queries(_ProbeLayer(geo["dim"], geo["heads"], geo["head_dim"]).to(device), hidden)
    key_norm = torch.rand(n, generator=g).to(device) * 100
    text_norm = torch.rand(QUESTION_TOKENS, generator=g).to(device) * 100
    last_row = torch.softmax(torch.randn(n, generator=g), dim=0).to(device)
    tau_t = geo["tau_t"]
    mem_k = min(k, MEMORY_STEPS) if n >= BIG else k

    # name: (vtprune, reference or None, reference for the memory run, what is compared)
    pairs = {
        "idpruner MMR (prompt importance)": (
            lambda: mmr_select(visual, prompt_imp, k, LAM),
            lambda: reference_mmr(visual, prompt_imp, k),
            lambda: reference_mmr(visual, prompt_imp, mem_k),
            "keep set",
        ),
        "idpruner MMR (selector importance)": (
            lambda: mmr_select(visual, selector_imp, k, LAM),
            lambda: reference_mmr(visual, selector_imp, k),
            lambda: reference_mmr(visual, selector_imp, mem_k),
            "keep set",
        ),
        "divprune": (
            lambda: divprune_select(visual, k),
            lambda: reference_divprune(visual, k),
            lambda: reference_divprune(visual, mem_k),
            "keep set",
        ),
        "mmtok (coverage matrix + greedy)": (
            lambda: coverage_select(coverage_matrix(visual, visual_pre, question, ALPHA, TAU_V, tau_t), k).order,
            lambda: reference_mmtok(visual, visual_pre, question, tau_t, k),
            lambda: reference_mmtok(visual, visual_pre, question, tau_t, mem_k),
            "pick order",
        ),
        "holov (chunks, overflow=drop)": (
            lambda: holov_select(visual, vit_attention, k, "drop"),
            lambda: reference_holov(visual, vit_attention, k),
            lambda: reference_holov(visual, vit_attention, k),
            "keep set",
        ),
        "cdpruner (conditional DPP)": (
            lambda: cdpruner_select(visual, relevance, k),
            lambda: reference_cdpruner(visual, relevance, k),
            lambda: reference_cdpruner(visual, relevance, mem_k),
            "keep set",
        ),
        "entropyprune (matrix entropy + top-k)": (lambda: _topk(matrix_entropy(queries), k), None, None, "-"),
        "dart (pivots + least-duplicated picks)": (
            lambda: dart_select(
                key_norm,
                hidden,
                text_norm,
                question,
                k,
                image_positions=torch.arange(n),
                text_positions=n + 1 + torch.arange(QUESTION_TOKENS),
            ),
            lambda: reference_dart(key_norm, hidden, text_norm, question, k),
            lambda: reference_dart(key_norm, hidden, text_norm, question, k),
            "keep set",
        ),
        "pdrop (top-k of the last token's row)": (
            lambda: topk_indices(last_row, k),
            lambda: _topk(last_row, k),
            lambda: _topk(last_row, k),
            "keep set",
        ),
        "scope (saliency-weighted coverage)": (
            lambda: scope_select(visual_pre, saliency, k),
            lambda: reference_scope(visual_pre, saliency, k),
            lambda: reference_scope(visual_pre, saliency, mem_k),
            "keep set",
        ),
        "vispruner (important + diverse rounds)": (
            lambda: vispruner_select(visual_pre, saliency, k, 0.5),
            lambda: reference_vispruner(visual_pre, saliency, k),
            lambda: reference_vispruner(visual_pre, saliency, k),
            "keep set",
        ),
    }
    if k * 576 % n == 0 and k * 576 // n in SPARSEVLM_TABLES:  # keep 64 / 128 / 192 per 576 tokens: the tables
        budget = k * 576 // n
        sv = torch.Generator().manual_seed(3)
        sv_len = SPARSEVLM_PREFIX + n + SPARSEVLM_TEXT
        rater_rows = torch.softmax(torch.randn(SPARSEVLM_RATERS, sv_len, generator=sv), dim=-1).to(device)
        sv_hidden = torch.randn(sv_len, geo["dim"], generator=sv).to(device)

        def sparsevlm_ours():
            return sparsevlm_stage(rater_rows, sv_hidden, SPARSEVLM_PREFIX, n, budget)

        def sparsevlm_reference():
            return reference_sparsevlm(rater_rows, sv_hidden, SPARSEVLM_PREFIX, n, budget)

        pairs["sparsevlm (raters' attention top-k + DPC-KNN recycling, one stage)"] = (
            sparsevlm_ours,
            sparsevlm_reference,
            sparsevlm_reference,
            "keep set + merged rows",
        )
    if shape == "llava" and n % CLIP_PATCHES == 0:
        # PruneSID runs per 576-token view (LLaVA-NeXT: 2880 -> 320 is 5 crops of 576 -> 64), as the policy does
        views, t = n // CLIP_PATCHES, k // (n // CLIP_PATCHES)
        view_rows = list(visual_pre.view(views, CLIP_PATCHES, -1))
        view_saliency = saliency.view(views, CLIP_PATCHES)
        cls_rows = torch.randn(views, 1, geo["pre_dim"], generator=torch.Generator().manual_seed(2)).to(device)
        with_cls = torch.cat([cls_rows, visual_pre.view(views, CLIP_PATCHES, -1)], dim=1)
        offsets = torch.arange(views, device=device)[:, None] * CLIP_PATCHES

        def prunesid_ours():
            groups = pca_groups(view_rows, int(t / 4), 0, batched=True)
            return torch.cat(
                [
                    prunesid_select(r, a, t, group=gr) + i * CLIP_PATCHES
                    for i, (r, a, gr) in enumerate(zip(view_rows, view_saliency, groups))
                ]
            )

        def prunesid_reference():
            # the patches the reference keeps (its CLS slot dropped), ascending, in the flat numbering
            return torch.sort(((reference_prunesid(with_cls, view_saliency, t)[:, 1:] - 1) + offsets).flatten()).values

        pairs["prunesid (PCA groups + NMS + split, per 576-token view)"] = (
            prunesid_ours,
            prunesid_reference,
            prunesid_reference,
            "keep set",
        )
    if shape == "llava":
        vit = _clip_layer(device)
        clip_views = torch.randn(max(1, n // 576), CLIP_TOKENS, CLIP_L["hidden_size"], generator=g).to(device)
        pairs["idpruner received importance (ViT probe)"] = (
            lambda: vit_attention_received(vit, clip_views).flatten()[:n],
            None,
            None,
            "-",
        )

    if only:
        pairs = {name: pair for name, pair in pairs.items() if name.split()[0] in only}
    rows = []
    for name, (ours, ref, ref_mem, compared) in pairs.items():
        with torch.no_grad():
            fns = {"ours": ours} if ref is None else {"ours": ours, "reference": ref}
            times = interleaved(fns, repeats, warmup)
            mine = ours()
            row = {
                "selector": name,
                "shape": shape,
                "n": n,
                "keep": k,
                "ours_ms": median(times["ours"]),
                "ours_runs_ms": times["ours"],
                "ours_peak_mb": peak_bytes(ours, device) / 2**20,
            }
            if ref is not None:
                assert ref_mem is not None  # a reference has its memory run
                theirs = ref()
                if compared == "keep set + merged rows":  # (kept, merged rows): equal sets, rows allclose in order
                    merged = merged_rows_match(mine[1].cpu(), theirs[1].cpu())
                    row["same_keep_set"] = torch.equal(mine[0].cpu(), theirs[0].cpu())
                    row["merged_rows"] = merged
                    same = row["same_keep_set"] and merged == "in order"
                else:
                    same = torch.equal(mine.cpu(), theirs.cpu())
                if compared == "pick order" and not same:
                    compared_sets = torch.equal(mine.sort().values.cpu(), theirs.sort().values.cpu())
                    row["same_keep_set"] = compared_sets
                row.update(
                    reference_ms=median(times["reference"]),
                    reference_runs_ms=times["reference"],
                    ratio=median(times["ours"]) / median(times["reference"]),
                    reference_peak_mb=peak_bytes(ref_mem, device) / 2**20,
                    reference_memory_steps=mem_k,
                    compared=compared,
                    equal=same,
                )
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    if "reference_ms" not in r:
        return f"| {r['selector']} | {r['n']} -> {r['keep']} | {r['ours_ms']:.1f} | - | - | {r['ours_peak_mb']:.1f} | - | - |"
    equal = "yes" if r["equal"] else ("keep set yes, order no" if r.get("same_keep_set") else "NO")
    if not r["equal"] and r.get("same_keep_set") and r.get("merged_rows") == "as a set":
        equal = "keep set yes, merged rows as a set (order no)"
    elif not r["equal"] and "merged_rows" in r:
        equal = "NO"
    steps = "" if r["reference_memory_steps"] == r["keep"] else f" ({r['reference_memory_steps']} steps)"
    return (
        f"| {r['selector']} | {r['n']} -> {r['keep']} | {r['ours_ms']:.1f} | {r['reference_ms']:.1f} | "
        f"{r['ratio']:.2f}x | {r['ours_peak_mb']:.1f} | {r['reference_peak_mb']:.1f}{steps} | {equal} |"
    )


HEADER = (
    "| selector | N -> K | vtprune ms | reference ms | ratio | vtprune peak MB | reference peak MB | "
    "equal |\n|---|---|---:|---:|---:|---:|---:|---|"
)


def markdown(rows: list[dict]) -> str:
    return "\n".join([HEADER, *(_line(r) for r in rows)])


# --- the policy's whole selection through the public API -------------------------------------------

#: the `--whole` model: LLaVA, language width 1024, 576 tokens per image (96 px / 4), one small ViT layer
WHOLE_GEOMETRY = dict(
    hidden=1024, layers=1, heads=8, kv_heads=8, intermediate=64, vision_hidden=256, vision_layers=1, image_size=96, patch=4
)
WHOLE_KEEP = 64


class _ReportClock:
    """The clock `StageRunner.apply` times selection with, set to thread CPU time while the mode runs."""

    perf_counter = staticmethod(time.thread_time)


def _thread_ms(fn) -> float:
    start = time.thread_time()
    fn()
    return (time.thread_time() - start) * 1000.0


def time_whole(n_images: int, repeats: int, warmup: int) -> list[dict]:
    """Rows for one prompt of `n_images` images: each policy's report ms beside its selector and reference."""
    import vtprune
    import vtprune.stages
    from vtprune.patches import adapter_for
    from vtprune.policies import IDPruner, MMTok
    from vtprune.tiny import IMAGE_TOKEN, Geometry, SampleSpec, make_inputs, tiny_model

    model = tiny_model("llava", Geometry(**WHOLE_GEOMETRY))
    batch = make_inputs(model, [SampleSpec(images=((96, 96),) * n_images, question=QUESTION_TOKENS)])
    tensors: dict[str, torch.Tensor] = {}
    projector = adapter_for(model).projector_module()
    hooks = [
        projector.register_forward_pre_hook(lambda _m, args: tensors.__setitem__("pre", args[0])),
        projector.register_forward_hook(lambda _m, _a, out: tensors.__setitem__("post", out)),
    ]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    dim = model.config.text_config.hidden_size
    per_image = tensors["post"].shape[1]
    visual = tensors["post"].reshape(-1, dim).contiguous()
    visual_pre = tensors["pre"].reshape(-1, tensors["pre"].shape[-1]).contiguous()
    ids = batch["input_ids"][0]
    after = int(torch.nonzero(ids == IMAGE_TOKEN).max()) + 1  # the question: every token after the last image
    with torch.no_grad():
        question = model.get_input_embeddings()(ids[after:])
    n, k = visual.shape[0], WHOLE_KEEP * n_images
    images = [slice(i * per_image, (i + 1) * per_image) for i in range(n_images)]
    tau_t = SHAPES["llava"]["tau_t"]

    def norm_mmr():
        return mmr_select(visual, torch.linalg.vector_norm(visual, dim=-1), k, LAM)

    def norm_reference():
        return reference_mmr(visual, visual.norm(dim=-1), k)

    def mmtok_alone():
        return [
            coverage_select(coverage_matrix(visual[s], visual_pre[s], question, ALPHA, TAU_V, tau_t), WHOLE_KEEP).indices
            + s.start
            for s in images
        ]

    def mmtok_reference():
        return [reference_mmtok(visual[s], visual_pre[s], question, tau_t, WHOLE_KEEP).sort().values + s.start for s in images]

    cases = {
        "idpruner (importance=norm)": (IDPruner(keep=WHOLE_KEEP, importance="norm"), norm_mmr, norm_reference),
        "mmtok": (MMTok(keep=WHOLE_KEEP, tau_t=tau_t), mmtok_alone, mmtok_reference),
    }
    rows = []
    saved = vtprune.stages.time
    vtprune.stages.time = _ReportClock  # type: ignore[assignment]  # the report's ms, in thread CPU time
    try:
        for name, (policy, alone, reference) in cases.items():
            vtprune.wrap(model, policy)

            def whole():
                with torch.no_grad():
                    model(**batch)
                return vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]["projector"]["ms"]

            times: dict[str, list[float]] = {"whole": [], "alone": [], "reference": []}
            for rnd in range(warmup + repeats):
                got = {"whole": whole(), "alone": None, "reference": None}
                with torch.no_grad():
                    got["alone"] = _thread_ms(alone)
                    got["reference"] = _thread_ms(reference)
                if rnd >= warmup:
                    for key, value in got.items():
                        times[key].append(value)
            kept = torch.cat(
                [
                    torch.tensor(img["stages"]["projector"]["kept"]) + i * per_image
                    for i, img in enumerate(vtprune.report(model).to_dict()["samples"][0]["images"])
                ]
            )
            with torch.no_grad():
                mine, theirs = alone(), reference()
            mine = torch.cat(mine) if isinstance(mine, list) else mine
            theirs = torch.cat(theirs) if isinstance(theirs, list) else theirs
            quiet = min(range(repeats), key=lambda r: times["reference"][r] + times["whole"][r])
            rows.append(
                {
                    "policy": name,
                    "n": n,
                    "keep": k,
                    "images": n_images,
                    "dim": dim,
                    "whole_ms": median(times["whole"]),
                    "alone_ms": median(times["alone"]),
                    "reference_ms": median(times["reference"]),
                    "whole_ratio": median(times["whole"]) / median(times["reference"]),
                    "alone_ratio": median(times["alone"]) / median(times["reference"]),
                    "quietest_whole_ratio": times["whole"][quiet] / times["reference"][quiet],
                    "runs_ms": times,
                    "equal": torch.equal(kept.sort().values, theirs.sort().values)
                    and torch.equal(mine.sort().values, theirs.sort().values),
                }
            )
            print(_whole_line(rows[-1]), flush=True)
            vtprune.unwrap(model)
    finally:
        vtprune.stages.time = saved
    return rows


WHOLE_HEADER = (
    "| policy | N -> K | whole selection ms (report) | selector alone ms | reference ms | "
    "whole / reference | alone / reference | quietest round whole / reference | keep sets equal |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---|"
)


def _whole_line(r: dict) -> str:
    return (
        f"| {r['policy']} | {r['n']} -> {r['keep']} | {r['whole_ms']:.2f} | {r['alone_ms']:.2f} | "
        f"{r['reference_ms']:.2f} | {r['whole_ratio']:.2f}x | {r['alone_ratio']:.2f}x | "
        f"{r['quietest_whole_ratio']:.2f}x | {'yes' if r['equal'] else 'NO'} |"
    )


def _case(text: str) -> tuple[str, int, int]:
    shape, n, k = text.split(":")
    if shape not in SHAPES:
        raise argparse.ArgumentTypeError(f"shape must be one of {sorted(SHAPES)}; got {shape!r}")
    return shape, int(n), int(k)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        nargs="+",
        type=_case,
        default=DEFAULT_CASES,
        help="shape:N:K, e.g. llava:576:64 (default: llava:576:64 llava:2880:320 qwen:8192:819)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="SELECTOR",
        help="time only these selectors (the first word of a row: scope, dart, idpruner, ...)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--big-repeats", type=int, default=1, help=f"repeats (and no warm-up) for N >= {BIG}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--whole",
        nargs="+",
        type=int,
        metavar="IMAGES",
        help="instead of the selectors: each policy's whole selection through the public API for one "
        "prompt of IMAGES images of 576 tokens (1: 576 -> 64, 5: 2880 -> 320), CPU",
    )
    parser.add_argument("--json", default="runs/selection_time.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    from .outputs import file_problem

    if problem := file_problem(args.json, "--json"):
        parser.error(problem)  # before timing, not after

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = os.getloadavg()
    if args.whole:
        print(WHOLE_HEADER)
        rows = [row for images in args.whole for row in time_whole(images, args.repeats, args.warmup)]
        result = {
            "mode": "whole",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "geometry": WHOLE_GEOMETRY,
            "rows": rows,
        }
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(
            f"\n(thread CPU time, {torch.get_num_threads()} torch thread, load average before "
            f"{load_before[0]:.2f}, after {result['load_average_after'][0]:.2f}); wrote {out}"
        )
        return result
    print(HEADER)
    rows = []
    for shape, n, k in args.cases:
        big = n >= BIG
        repeats, warmup = (args.big_repeats, 0) if big else (args.repeats, args.warmup)
        rows.extend(time_case(shape, n, k, repeats, warmup, device, args.only))
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "big_repeats": args.big_repeats,
        "rows": rows,
    }
    print(
        f"\n(load average before {load_before[0]:.2f}, after {result['load_average_after'][0]:.2f}; "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch thread)"
    )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
