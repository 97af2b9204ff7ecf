"""Prefill speedup of the video policies on a panning video, random weights, real video geometry.

The video: the astronaut photo shipped with scikit-image, a window
panning right across it, one frame per step. Qwen2.5-VL: 16 frames at
448 x 448 (8 temporal slots of 16 x 16 merged tokens, 2,048 tokens);
LLaVA-OneVision: 16 frames at 384 x 384 (16 x 196 pooled tokens, 3,136).
The demo's random-weight models (LLM 6 x 384 unless told otherwise) time,
round-robin after a warm-up, the unpruned prefill (the forward only, not the wrapping) and each policy and
budget's prefill, with the policy's own selection time from the report.

    python -m vtprune.eval.video_bench                              # evs, vidcom2, dycoke at 0.25 and 0.10
    python -m vtprune.eval.video_bench --families qwen2_5_vl --keep 0.25 --json runs/video_bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch

from .. import api
from ..budget import parse_keep
from ..checks import BadValue
from ..demo import demo_model, photo
from ..measure import median, timed
from ..patches import family_spec, supported_video_demo

FRAMES = 16


def pan(frames: int = FRAMES, side: int = 448, shift: int = 4, image: np.ndarray | None = None) -> list[np.ndarray]:
    """``frames`` square views of ``image`` (default: the photo), each ``shift`` pixels right of the one before
    (then resized)."""
    from PIL import Image

    image = photo() if image is None else image
    if shift * (frames - 1) >= min(image.shape[:2]):
        raise BadValue(
            f"a pan of {frames} frames moving {shift} px needs an image wider than "
            f"{shift * (frames - 1)} px; got {image.shape[1]} x {image.shape[0]}"
        )
    window = min(image.shape[:2]) - shift * (frames - 1)
    views = [image[:window, k * shift : k * shift + window] for k in range(frames)]
    return [np.asarray(Image.fromarray(v).resize((side, side), Image.Resampling.BICUBIC)) for v in views]


def bench_family(family: str, policies: list[str], budgets: list, repeats: int, warmup: int) -> list[dict]:
    model = demo_model(family)
    spec = family_spec(family)
    frames = pan(side=spec.demo_video_side(model))
    inputs = spec.demo_video(model, frames)

    def prefill():
        with torch.no_grad():
            return model(**inputs, use_cache=True, logits_to_keep=1)

    counts: dict[tuple[str, Any], tuple[int, int]] = {}
    selection: dict[str, list[float]] = {}

    def wrapped(policy, keep):
        def run():
            with api.pruned(model, policy, keep=keep):  # wrapping is not part of a prefill: only the forward is timed
                ms, _ = timed(prefill)
                stage = api.report(model).to_dict()["samples"][0]["images"][0]["stages"]["projector"]
            counts[(policy, keep)] = (stage["before"], stage["after"])
            return ms, stage["ms"]

        return run

    runs = {"unpruned": lambda: (timed(prefill)[0], 0.0), **{f"{p} {k}": wrapped(p, k) for p in policies for k in budgets}}
    times: dict = {name: [] for name in runs}
    for rnd in range(warmup + repeats):  # round-robin, so that load drift hits every configuration alike
        for name, run in runs.items():
            ms, sel = run()
            if rnd >= warmup:
                times[name].append(ms)
                selection.setdefault(name, []).append(sel)
    full = median(times["unpruned"])
    rows = []
    for p in policies:
        for k in budgets:
            ms = median(times[f"{p} {k}"])
            before, after = counts[(p, k)]
            rows.append(
                dict(
                    family=family,
                    policy=p,
                    keep=k,
                    tokens_before=before,
                    tokens_after=after,
                    prefill_unpruned_ms=full,
                    prefill_ms=ms,
                    speedup=full / ms,
                    selection_ms=median(selection[f"{p} {k}"]),
                )
            )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| family | policy | keep | video tokens | prefill unpruned ms | prefill ms | speedup | selection ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['policy']} | {r['keep']} | {r['tokens_before']} -> {r['tokens_after']} | "
            f"{r['prefill_unpruned_ms']:.0f} | {r['prefill_ms']:.0f} | {r['speedup']:.2f}x | "
            f"{r['selection_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtprune.eval.video_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=["qwen2_5_vl", "llava_onevision"], choices=supported_video_demo())
    parser.add_argument("--policies", nargs="+", default=["evs", "vidcom2", "dycoke"])
    parser.add_argument("--keep", nargs="+", default=["0.25", "0.1"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    budgets = [parse_keep(k) for k in args.keep]
    rows = [r for f in args.families for r in bench_family(f, args.policies, budgets, args.repeats, args.warmup)]
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
