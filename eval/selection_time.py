"""Time each policy's selection math on random features of real model geometry.

Covers the attention-free policies (IDPruner, MMTok, DivPrune, EntropyPrune) and the ViT probe
of IDPruner's default `received` importance (LLaVA shapes: one CLIP-L/336 layer per view):
the ops each runs once per image, on the features the runtime hands it, in
fp32 on one device. Per case and policy it reports the median over repeats
after warm-up, split into the one-off part (pairwise matrix, coverage
matrix, query probe) and the rest (greedy loop, importance, entropy).

    python eval/selection_time.py                  # default cases, CPU, 1 thread
    python eval/selection_time.py --all --json runs/selection_time.json

Prints a markdown table and writes JSON. Shapes: ``llava`` is LLaVA-1.5/NeXT-7B
(D=4096, CLIP-L D'=1024, 32 heads x 128, 32 layers), ``qwen`` Qwen2.5-VL-7B
(D=3584, ViT D'=1280, 28 heads x 128). The question has 32 tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from vtprune.ops.entropy import matrix_entropy
from vtprune.ops.greedy import cosine_similarity, coverage_select, divprune_select, mmr_select
from vtprune.ops.probe import layer_queries, vit_attention_received
from vtprune.policies.mmtok import coverage_matrix
from vtprune.policies.selector import VisionSelector

SHAPES = {
    "llava": {"dim": 4096, "pre_dim": 1024, "heads": 32, "head_dim": 128, "tau_t": 0.02},
    "qwen": {"dim": 3584, "pre_dim": 1280, "heads": 28, "head_dim": 128, "tau_t": 0.01},
}
SIZES = [(576, 64), (2880, 320), (8192, 819)]  # 8192 keeps 10 %
DEFAULT_CASES = [("llava", 576, 64), ("llava", 2880, 320), ("qwen", 8192, 819)]
QUESTION_TOKENS = 32
SELECTOR_HIDDEN = 1792
CLIP_L = {"hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096, "tokens": 577}  # 336 px / 14 + CLS


def _clip_layer(device: torch.device) -> nn.Module:
    """One CLIP-L/336 encoder layer (random weights): what the ViT probe of IDPruner's `received` importance reads."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    config = CLIPVisionConfig(**{k: v for k, v in CLIP_L.items() if k != "tokens"})
    return CLIPEncoderLayer(config).to(device).eval()


class _ProbeLayer(nn.Module):
    """Just the parts of a decoder layer the query probe reads."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(dim)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(dim, heads * head_dim)
        self.self_attn.head_dim = head_dim


def _median_ms(fn, repeats: int, warmup: int, device: torch.device) -> float:
    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    for _ in range(warmup):
        run()
    return statistics.median(run() for _ in range(repeats))


def time_case(shape: str, n: int, k: int, repeats: int, warmup: int, device: torch.device) -> list[dict]:
    """Timings of every policy for one geometry: a list of table rows."""
    geo = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    visual = torch.randn(n, geo["dim"], generator=g).to(device)
    visual_pre = torch.randn(n, geo["pre_dim"], generator=g).to(device)
    question = torch.randn(QUESTION_TOKENS, geo["dim"], generator=g).to(device)
    hidden = torch.randn(n, geo["dim"], generator=g).to(device)
    selector = VisionSelector(
        "random",
        geo["dim"],
        SELECTOR_HIDDEN,
        torch.randn(SELECTOR_HIDDEN, geo["dim"], generator=g) * 0.02,
        torch.zeros(SELECTOR_HIDDEN),
        torch.randn(SELECTOR_HIDDEN, geo["dim"], generator=g) * 0.02,
        torch.zeros(SELECTOR_HIDDEN),
    )
    probe = _ProbeLayer(geo["dim"], geo["heads"], geo["head_dim"]).to(device)
    queries = layer_queries(probe, hidden)
    sim = cosine_similarity(visual)
    cover = coverage_matrix(visual, visual_pre, question, tau_t=geo["tau_t"])

    def prompt_importance():
        return cosine_similarity(visual, question.mean(dim=0, keepdim=True))[:, 0]

    cases = {}
    if shape == "llava":  # the CLIP probe; one 577-token layer per 576-patch view
        vit = _clip_layer(device)
        views = torch.randn(max(1, n // 576), CLIP_L["tokens"], CLIP_L["hidden_size"], generator=g).to(device)

        def received_importance():
            return vit_attention_received(vit, views).flatten()[:n]

        cases["idpruner (TF, received)"] = (
            lambda: mmr_select(visual, received_importance(), k),
            received_importance,
            "ViT probe, feature layer",
        )
    cases |= {
        # name: (whole selection, one-off part, label of the one-off part)
        "idpruner (TF, prompt)": (
            lambda: mmr_select(visual, prompt_importance(), k),
            lambda: cosine_similarity(visual),
            "cosine N x N",
        ),
        "idpruner (selector)": (
            lambda: mmr_select(visual, selector.score(visual), k),
            lambda: cosine_similarity(visual),
            "cosine N x N",
        ),
        "divprune": (lambda: divprune_select(visual, k), lambda: cosine_similarity(visual), "cosine N x N"),
        "mmtok": (
            lambda: coverage_select(coverage_matrix(visual, visual_pre, question, tau_t=geo["tau_t"]), k),
            lambda: coverage_matrix(visual, visual_pre, question, tau_t=geo["tau_t"]),
            "coverage matrix",
        ),
        "entropyprune": (
            lambda: topk(matrix_entropy(layer_queries(probe, hidden)), k),
            lambda: layer_queries(probe, hidden),
            "q_proj probe",
        ),
    }
    loops = {
        "idpruner (TF, prompt)": lambda: mmr_select(visual, prompt_importance(), k, similarity=sim),
        "idpruner (selector)": lambda: mmr_select(visual, selector.score(visual), k, similarity=sim),
        "divprune": lambda: divprune_select(visual, k, similarity=sim),
        "mmtok": lambda: coverage_select(cover, k),
        "entropyprune": lambda: topk(matrix_entropy(queries), k),
    }
    if shape == "llava":
        loops["idpruner (TF, received)"] = lambda: mmr_select(visual, received_importance(), k, similarity=sim)
    rows = []
    for name, (whole, part, part_label) in cases.items():
        with torch.no_grad():
            rows.append(
                {
                    "policy": name,
                    "shape": shape,
                    "n": n,
                    "keep": k,
                    "total_ms": _median_ms(whole, repeats, warmup, device),
                    "one_off": part_label,
                    "one_off_ms": _median_ms(part, repeats, warmup, device),
                    "rest_ms": _median_ms(loops[name], repeats, warmup, device),
                }
            )
    return rows


def topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, k).indices).values


def markdown(rows: list[dict]) -> str:
    lines = [
        "| policy | shape | N -> K | total ms | one-off part | one-off ms | greedy / score ms |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['shape']} | {r['n']} -> {r['keep']} | {r['total_ms']:.1f} | "
            f"{r['one_off']} | {r['one_off_ms']:.1f} | {r['rest_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every shape at every size instead of the default cases")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--big-repeats", type=int, default=1, help="repeats (and no warm-up) for N >= 4096")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="runs/selection_time.json", help="where to write the JSON results")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = [(s, n, k) for s in SHAPES for n, k in SIZES] if args.all else DEFAULT_CASES
    rows = []
    for shape, n, k in cases:
        big = n >= 4096
        repeats, warmup = (args.big_repeats, 0) if big else (args.repeats, args.warmup)
        before = len(rows)
        rows.extend(time_case(shape, n, k, repeats, warmup, device))
        print(markdown(rows[before:]).split("\n", 2)[-1], flush=True)
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rows": rows,
    }
    print()
    print(markdown(rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
