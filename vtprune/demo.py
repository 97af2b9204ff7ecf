"""`vtprune demo`: every family on a real photo, unpruned and at a few budgets.

Models are random-weight, built from configs with the real visual geometry
(576 tokens for LLaVA-1.5, anyres crops for LLaVA-NeXT, dynamic resolution
for Qwen), so the table shows what pruning does to prefill time and the KV
cache; generated tokens of random weights are ids, not words.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np
import torch

from . import api
from .budget import parse_keep
from .measure import kv_cache_bytes, time_prefill
from .patches import family_spec
from .tiny import FAMILIES, IMAGE_TOKEN, VISION_END, VISION_START, Geometry, tiny_model

DEMO_GEOMETRY = Geometry(
    hidden=384, layers=6, heads=6, kv_heads=6, intermediate=1024, vision_hidden=64, vision_layers=2, image_size=336, patch=14
)
QWEN_PIXELS = 448 * 448
#: the model whose kept patches ``--png`` draws: LLaVA-1.5, one 336 px view of 24 x 24 patches (`save_png`'s grid)
PNG_FAMILY = "llava"


def photo() -> np.ndarray:
    """The astronaut photo shipped with scikit-image (512 x 512 RGB)."""
    from skimage import data

    return data.astronaut()


def demo_inputs(model, image: np.ndarray, question_tokens: int = 12, qwen_pixels: int = QWEN_PIXELS) -> dict:
    """Processor-equivalent inputs for one image and a short prompt (token ids are synthetic); Qwen families
    resize the image to ``qwen_pixels`` pixels (``min_pixels = max_pixels``)."""
    from .patches import adapter_for

    adapter = adapter_for(model)
    rng = np.random.default_rng(0)
    question = rng.integers(3, 90, question_tokens).tolist()
    prefix = [1, 5, 6, 7]
    pix, placeholders = adapter.spec.demo_image(model, adapter, image, qwen_pixels)
    ids = prefix + placeholders + question
    ids_t = torch.tensor([ids])
    out = {"input_ids": ids_t, "attention_mask": torch.ones(1, len(ids), dtype=torch.long), **pix}
    if adapter.mrope:
        out["mm_token_type_ids"] = (ids_t == IMAGE_TOKEN).int()
    return out


def demo_model(family: str):
    """The tiny model of `family` with the demo's geometry (the family spec's `demo_geometry` / `demo_config`:
    e.g. LLaVA-OneVision's 384 px SigLIP views of 27 x 27 = 729 tokens and its ``anyres_max_9`` cap); LLaVA-NeXT's
    grid pinpoints follow the 336 px views (336 x 672, 672 x 336, 672 x 672)."""
    spec = family_spec(family)
    model = tiny_model(family, dataclasses.replace(DEMO_GEOMETRY, **spec.demo_geometry))
    for name, value in spec.demo_config.items():
        setattr(model.config, name, value)
        setattr(model.model.config, name, value)
    return model


def run_family(
    family: str, policy: str, budgets: list, new_tokens: int, repeats: int, qwen_pixels: int = QWEN_PIXELS
) -> list[dict]:
    model = demo_model(family)
    batch = demo_inputs(model, photo(), qwen_pixels=qwen_pixels)
    gen_kw = dict(
        max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, suppress_tokens=[IMAGE_TOKEN, VISION_START, VISION_END]
    )
    rows = []
    base_ms, out = time_prefill(model, batch, repeats=repeats)
    base_kv = kv_cache_bytes(out.cache)
    with torch.no_grad():
        base_gen = model.generate(**batch, **gen_kw)[0, -new_tokens:].tolist()
    from .patches import adapter_for

    layouts = adapter_for(model).layouts(batch, batch["input_ids"])
    assert layouts is not None  # the demo inputs hold an image
    n_visual = layouts[0].images[0].num_tokens  # newlines excluded
    rows.append(
        dict(
            family=family,
            policy="none",
            keep="all",
            before=n_visual,
            after=n_visual,
            prefill_ms=base_ms,
            speedup=1.0,
            kv_mb=base_kv / 2**20,
            generated=base_gen,
            agree=1.0,
        )
    )
    for keep in budgets:
        with api.pruned(model, policy, keep=keep):
            ms, out = time_prefill(model, batch, repeats=repeats)
            kv = kv_cache_bytes(out.cache)
            image = api.report(model).to_dict()["samples"][0]["images"][0]
            stage_name, stage = list(image["stages"].items())[-1]
            with torch.no_grad():
                gen = model.generate(**batch, **gen_kw)[0, -new_tokens:].tolist()
        agree = sum(a == b for a, b in zip(gen, base_gen)) / new_tokens
        rows.append(
            dict(
                family=family,
                policy=policy,
                keep=keep,
                before=image["tokens"],
                after=stage["after"],
                prefill_ms=ms,
                speedup=base_ms / ms,
                kv_mb=kv / 2**20,
                generated=gen,
                agree=agree,
                kept=stage["kept"],
                stage=stage_name,
            )
        )
    return rows


def save_png(
    path: str, image: np.ndarray, kept: list[int], side: int = 24, policy: str = "pooling", stage: str = "projector"
) -> None:
    """The photo (resized to the model's view) with the kept patches bright, captioned as `vtprune show` does."""
    from PIL import Image

    from .eval.show import render

    view = np.asarray(Image.fromarray(image).resize((336, 336)))
    render(
        view,
        (side, side),
        {stage: {"before": side * side, "after": len(kept), "kept": kept}},
        f"vtprune demo: random-weight llava (LLaVA-1.5 geometry, 576 tokens) - policy {policy}, keep={len(kept)}",
        path,
        subtitle="random weights: the kept set shows the policy's mechanics, not a trained model's choice",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune demo", description=__doc__)
    parser.add_argument("--policy", default="pooling", help="policy name (default: pooling)")
    parser.add_argument(
        "--keep",
        nargs="+",
        default=["192", "64", "0.1"],
        help="budgets: ints are tokens per image, floats fractions (default: 192 64 0.1)",
    )
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--qwen-pixels",
        type=int,
        default=QWEN_PIXELS,
        help="pixels of the photo for Qwen families (default 448 x 448; a document page: 1280 x 1280)",
    )
    parser.add_argument("--png", help="save the photo with the LLaVA-1.5 kept patches (keep=64) highlighted")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    budgets = [parse_keep(k) for k in args.keep]
    from .policies.base import unknown_policy

    if error := unknown_policy([args.policy]):
        print(f"vtprune demo: {error}", file=sys.stderr)
        return 2
    print(f"vtprune demo: policy={args.policy}, photo=skimage astronaut, random-weight models with real geometry")
    print(
        "visual: patch tokens per image before->after (LLaVA-NeXT: 2880 = 5 views x 576, its newline tokens "
        "(48 for this photo) excluded: they are structure, always kept); agree: share of the generated ids equal to "
        "the unpruned "
        "model's (random weights: agreement is not a quality signal, see `vtprune sweep` on toyvqa for accuracy)"
    )
    print(f"{'family':<16} {'keep':>5} {'visual':>11} {'prefill ms':>10} {'speedup':>7} {'KV MB':>7} {'agree':>5}  generated ids")
    png_kept, png_stage = None, "projector"
    for family in args.families:
        for row in run_family(family, args.policy, budgets, args.new_tokens, args.repeats, args.qwen_pixels):
            print(
                f"{row['family']:<16} {str(row['keep']):>5} {row['before']:>5}->{row['after']:<5} "
                f"{row['prefill_ms']:>10.1f} {row['speedup']:>6.2f}x {row['kv_mb']:>7.2f} {row['agree']:>5.2f}  "
                f"{row['generated']}"
            )
            if family == PNG_FAMILY and row["keep"] == 64:
                png_kept, png_stage = row["kept"], row["stage"]
    if args.png:
        if png_kept is None:
            with api.pruned(demo_model(PNG_FAMILY), args.policy, keep=64) as model:
                batch = demo_inputs(model, photo())
                with torch.no_grad():
                    model(**batch)
                png_stage, png_kept = list(api.report(model).to_dict()["samples"][0]["images"][0]["stages"].items())[-1]
                png_kept = png_kept["kept"]
        save_png(args.png, photo(), png_kept, policy=args.policy, stage=png_stage)
        print(f"saved {args.png}")
    return 0
