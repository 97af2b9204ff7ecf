"""`vtprune bench`: prefill time, selection time and KV-cache size per policy and budget.

Random-weight models with the real visual geometry (the demo's), one image
of the astronaut photo. Runs of the unpruned model and of each budget are
interleaved (round-robin over repeats, after a warm-up) so that drift in the
machine's load hits them alike; ratios are to the unpruned run measured in
the same process. Writes JSON and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from .. import api
from ..demo import demo_inputs, demo_model, photo
from ..measure import kv_cache_bytes
from ..patches import adapter_for
from ..tiny import FAMILIES


@torch.no_grad()
def _prefill_ms(model, batch) -> tuple[float, object]:
    start = time.perf_counter()
    out = model(**batch, use_cache=True, logits_to_keep=1)
    return (time.perf_counter() - start) * 1000.0, out


def bench_family(family: str, policy: str, budgets: list, repeats: int) -> list[dict]:
    model = demo_model(family)
    batch = demo_inputs(model, photo())
    configs = [None, *budgets]
    times: dict = {c: [] for c in configs}
    select: dict = {c: [] for c in configs}
    kv: dict = {}
    for rep in range(repeats + 1):
        for keep in configs:
            if keep is None:
                ms, out = _prefill_ms(model, batch)
            else:
                with api.pruned(model, policy, keep=keep):
                    ms, out = _prefill_ms(model, batch)
                    stages = api.report(model).to_dict()["samples"][0]["images"][0]["stages"]
                    select[keep].append(sum(s["ms"] for s in stages.values()))
            kv[keep] = kv_cache_bytes(out.cache)
            if rep > 0:  # the first round is warm-up
                times[keep].append(ms)
    base = statistics.median(times[None])
    n_visual = int(adapter_for(model).visual_token_mask(batch["input_ids"]).sum())
    seq = batch["input_ids"].shape[1]
    rows = []
    for keep in configs:
        med = statistics.median(times[keep])
        kept = n_visual if keep is None else min(keep, n_visual) if isinstance(keep, int) else round(n_visual * keep)
        rows.append(dict(
            family=family, policy="none" if keep is None else policy, keep="all" if keep is None else keep,
            visual_before=n_visual, visual_after=kept, seq_len=seq - n_visual + kept,
            prefill_ms=med, speedup=base / med, ideal_speedup=seq / (seq - n_visual + kept),
            flops_speedup=prefill_flops(model, seq) / prefill_flops(model, seq - n_visual + kept),
            selection_ms=statistics.median(select[keep]) if select[keep] else 0.0,
            kv_bytes=kv[keep], kv_ratio=kv[keep] / kv[None],
        ))
    return rows


def bench_compaction(length: int, kept: int, width: int, dtype=torch.float32, repeats: int = 20) -> dict:
    """The compaction op (`gather_seq`) against a plain copy of the same kept bytes."""
    from ..compaction import gather_seq, keep_index

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1, length, width, device=device).to(dtype)
    keep = torch.zeros(1, length, dtype=torch.bool, device=device)
    keep[0, torch.randperm(length, device=device)[:kept]] = True
    index = keep_index(keep)

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000.0)
        return statistics.median(times)

    gather = timed(lambda: gather_seq(x, index))
    copy = timed(lambda: x[:, :kept].clone())
    return dict(device=device, length=length, kept=kept, width=width, gather_ms=gather, copy_ms=copy,
                ratio=gather / copy)


def _layer_params(layer: torch.nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


def prefill_flops(model, seq_len: int) -> float:
    """Estimated prefill FLOPs: the vision tower (fixed) plus the decoder on `seq_len` tokens.

    Per layer: 2 x tokens x weights (matmuls) + 4 x tokens^2 x width
    (scores and weighted sum); the LM head runs on the last token only.
    """
    from ..patches import adapter_for

    adapter = adapter_for(model)
    text = adapter.text_config
    flops = 0.0
    for layer in adapter.decoder_layers:
        flops += 2 * seq_len * _layer_params(layer) + 4 * seq_len**2 * text.hidden_size
    flops += 2 * text.hidden_size * text.vocab_size
    vision = getattr(adapter.base, "vision_tower", None) or getattr(adapter.base, "visual", None)
    vcfg = model.config.vision_config
    patches = (vcfg.image_size // vcfg.patch_size) ** 2 + 1 if hasattr(vcfg, "image_size") else None
    if vision is not None and patches is not None:
        flops += 2 * patches * sum(p.numel() for p in vision.parameters()) + 4 * patches**2 * vcfg.hidden_size
    return flops


def markdown(rows: list[dict]) -> str:
    head = ("| family | policy | keep | visual | prefill ms | speedup | FLOPs ratio (est.) | of ideal | "
            "selection ms | selection / prefill | KV MB |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['policy']} | {r['keep']} | {r['visual_before']}->{r['visual_after']} | "
            f"{r['prefill_ms']:.1f} | {r['speedup']:.2f}x | {r['flops_speedup']:.2f}x | "
            f"{r['speedup'] / r['flops_speedup']:.0%} | {r['selection_ms']:.2f} | "
            f"{r['selection_ms'] / r['prefill_ms']:.1%} | {r['kv_bytes'] / 2**20:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune bench", description=__doc__)
    parser.add_argument("--policy", default="pooling")
    parser.add_argument("--keep", nargs="+", default=["64"])
    parser.add_argument("--families", nargs="+", default=["llava"], choices=FAMILIES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="bench.json")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice); use fewer than the "
                        "idle cores, oversubscribed threads make CPU timings meaningless")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [float(k) if "." in k else int(k) for k in args.keep]
    rows = [r for f in args.families for r in bench_family(f, args.policy, budgets, args.repeats)]
    with open(args.json, "w") as fh:
        json.dump({"threads": torch.get_num_threads(), "load_average": os.getloadavg(), "rows": rows}, fh, indent=1)
    print(markdown(rows))
    comp = [bench_compaction(n, k, 4096) for n, k in ((600, 88), (2900, 340))]
    print("\n| compaction | length -> kept | width | gather ms | plain copy ms | ratio |\n|---|---|---|---|---|---|")
    for c in comp:
        print(f"| {c['device']} | {c['length']} -> {c['kept']} | {c['width']} | {c['gather_ms']:.3f} | "
              f"{c['copy_ms']:.3f} | {c['ratio']:.2f}x |")
    with open(args.json) as fh:
        data = json.load(fh)
    data["compaction"] = comp
    with open(args.json, "w") as fh:
        json.dump(data, fh, indent=1)
    print(f"(torch threads: {torch.get_num_threads()}; JSON: {args.json})")
    return 0
