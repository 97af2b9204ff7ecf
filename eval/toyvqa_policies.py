"""Accuracy under pruning on the toyvqa task: every policy at a few budgets beside the unpruned model.

    python -m vtprune.eval.toyvqa_policies --model llava --keep 64 32 --n 300

``--model`` is a shipped arch name (``llava``, ``qwen2_5_vl``) or a saved
checkpoint folder. Policies are registry names; ``idpruner:received`` / ``idpruner:norm`` /
``idpruner:prompt`` pick IDPruner's training-free importance. Every run uses
the same test items; accuracy retained is relative to the unpruned run, and
agreement counts answers equal to the unpruned model's. ``--vit-layers 1 2``
adds every policy selecting inside the vision encoder after that many of its
blocks (rows ``NAME@vitK``). Writes JSON and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .. import api, toyvqa
from ..budget import parse_keep
from ..policies.base import policy_spec

DEFAULT_POLICIES = [
    "random",
    "pooling",
    "divprune",
    "mmtok",
    "idpruner:prompt",
    "idpruner:norm",
    "idpruner:received",
    "entropyprune",
    "fastv",
    "transprune",
    "hiprune",
    "visionzip",
    "scope",
    "vispruner",
    "prunesid",
    "holov",
    "cdpruner",
    "dart",
    "pdrop",
]


def run(
    model_ref: str, policies: list[str], budgets: list, n: int, batch_size: int, vit_layers: tuple[int, ...] = ()
) -> list[dict]:
    model, processor = toyvqa.load(model_ref)
    rows = []
    start = time.perf_counter()
    base = toyvqa.score(model, processor, n=n, batch_size=batch_size, return_predictions=True)
    rows.append(
        dict(
            policy="none",
            keep="all",
            overall=base["overall"],
            per_type=base["per_type"],
            retained=1.0,
            agree=1.0,
            seconds=time.perf_counter() - start,
        )
    )
    runs = [(spec, *policy_spec(spec)) for spec in policies]
    runs += [(f"{spec}@vit{k}", name, {**options, "vit_layer": k}) for spec, name, options in list(runs) for k in vit_layers]
    for spec, name, options in runs:
        for keep in budgets:
            start = time.perf_counter()
            with api.pruned(model, name, keep=keep, tokenizer=processor, **options):
                res = toyvqa.score(model, processor, n=n, batch_size=batch_size, return_predictions=True)
            pairs = list(zip(res["predictions"], base["predictions"]))
            agree = sum(a["prediction"] == b["prediction"] for a, b in pairs) / max(1, len(pairs))
            rows.append(
                dict(
                    policy=spec,
                    options=options,
                    keep=keep,
                    overall=res["overall"],
                    per_type=res["per_type"],
                    retained=res["overall"] / base["overall"] if base["overall"] else float("nan"),
                    agree=agree,
                    seconds=time.perf_counter() - start,
                )
            )
            print(f"{spec:<16} keep={keep!s:<5} acc={res['overall']:.3f} agree={agree:.3f}", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    types = sorted(rows[0]["per_type"])
    lines = ["| policy | keep | accuracy | retained | agreement | " + " | ".join(types) + " |", "|" + "---|" * (5 + len(types))]
    for r in rows:
        per = " | ".join(f"{r['per_type'][t]:.2f}" for t in types)
        lines.append(f"| {r['policy']} | {r['keep']} | {r['overall']:.3f} | {r['retained']:.1%} | {r['agree']:.1%} | {per} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtprune.eval.toyvqa_policies", description=__doc__)
    parser.add_argument("--model", default="llava")
    parser.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES)
    parser.add_argument("--keep", nargs="+", default=["64", "32"])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int)
    parser.add_argument(
        "--vit-layers",
        nargs="+",
        type=int,
        default=[],
        help="also run each policy with vit_layer=K (inside the vision encoder) for each K",
    )
    parser.add_argument("--json", default="toyvqa_policies.json")
    args = parser.parse_args(argv)
    from .outputs import file_problem, make_parent

    if problem := file_problem(args.json, "--json"):
        parser.error(problem)  # before scoring, not after
    make_parent(args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [parse_keep(k) for k in args.keep]
    rows = run(args.model, args.policies, budgets, args.n, args.batch_size, tuple(args.vit_layers))
    with open(args.json, "w") as fh:
        json.dump({"model": args.model, "n": args.n, "rows": rows}, fh, indent=1)
    print(markdown(rows))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
