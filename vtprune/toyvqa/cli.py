"""``python -m vtprune.toyvqa {train,score,export,ship}`` (wired as ``vtprune toyvqa ...``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vtprune.toyvqa import train as train_mod


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the toyvqa command line."""
    parser = argparse.ArgumentParser(prog="vtprune toyvqa", description="Synthetic VQA task and toy VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    train_mod.add_arguments(sub.add_parser("train", help="train a toy VLM (resumes from OUT's newest checkpoint)"))
    p = sub.add_parser("score", help="accuracy per question type of a toy VLM")
    p.add_argument(
        "--model",
        required=True,
        help="'llava', 'qwen2_5_vl' (shipped) or a saved model folder",
    )
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json-out", type=Path, help="also write the result (with predictions) here")
    p = sub.add_parser("export", help="write a split as JSONL + PNG files (for lmms-eval)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument(
        "--size",
        type=int,
        default=336,
        help="image side in px (336 LLaVA, 448 Qwen2.5-VL)",
    )
    p = sub.add_parser("ship", help="copy RUN/best into the package if it beats the shipped model")
    p.add_argument(
        "--run",
        required=True,
        type=Path,
        help="a training output folder, e.g. runs/toyvqa/llava",
    )
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--force", action="store_true")
    return parser


def format_table(result: dict) -> str:
    """A short plain-text table of a score result."""
    rows = [("overall", result["overall"])] + list(result["per_type"].items())
    rows += [(f"exist/{k}", v) for k, v in result.get("exist_by_negative", {}).items()]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'type':<{width}}  accuracy   ({result['split']}, n={result['n']})"]
    lines += [f"{k:<{width}}  {v:8.4f}" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return train_mod.train(args)
    if args.command == "score":
        import torch

        from vtprune.toyvqa import load, score

        if args.threads:
            torch.set_num_threads(args.threads)
        model, processor = load(args.model)
        result = score(
            model,
            processor,
            n=args.n,
            split=args.split,
            batch_size=args.batch_size,
            return_predictions=True,
        )
        predictions = result.pop("predictions")
        if args.json_out:
            args.json_out.write_text(json.dumps({**result, "predictions": predictions}, indent=1))
        print(json.dumps(result))
        print(format_table(result))
        return 0
    if args.command == "ship":
        from vtprune.toyvqa.ship import ship

        print(json.dumps(ship(args.run, n=args.n, force=args.force), indent=1))
        return 0
    from vtprune.toyvqa.export import export

    path = export(args.out, n=args.n, split=args.split, size=args.size)
    print(f"wrote {args.n} items to {path}")
    return 0
