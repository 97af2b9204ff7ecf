"""`vtprune show IMAGE --model PATH --policy P --keep K [--question Q]`: which patches a policy keeps, as a PNG.

One panel per pruning stage of the report (``vision``, ``projector``,
``llm@K``...), each the image as the model sees it (resized or cropped by
its processor) with the kept patches bright and the pruned ones dimmed; the
caption names the model, the policy and budget, the stage and the visual
tokens before and after it, and the question with the pruned model's answer.

``--policy pixelprune`` (no budget; ``--tau``) draws the merge units it
kept before the vision encoder bright and those it dropped (equal to their
prediction from the neighbours) dimmed and hatched; ``pixelprune+NAME`` is a
Pipeline, NAME at ``--keep`` on what pixelprune kept. ``--vit-layer K``
lets the (first budgeted) policy select inside the vision encoder after
its K-th block.

``--model``: a toyvqa arch name (``llava``, ``qwen2_5_vl``) or a checkpoint
folder of the LLaVA-1.5 or Qwen2/2.5-VL families (a toyvqa folder, or any HF
checkpoint with a chat template). The kept indices are the report's: positions
in the image's own token grid, raster order (``vtprune.report(model).to_dict()``).

``--video N`` (video policies: evs, vidcom2, fastvid, dycoke): a strip of
frames instead. The video is the image panned, a window moving right by
``--shift`` pixels per frame (as ``vtprune.eval.video_bench``), N frames,
read by the demo's random-weight model of ``--model`` (``qwen2_5_vl``,
``qwen2_vl``: 448 px, a panel per temporal slot of two frames, its first
frame drawn; ``llava_onevision``: 384 px, a panel per frame on the 14 x 14
pooled grid). Kept cells are bright, merged rows (FastVID) outlined in cyan;
each panel says its frame's kept count. What a method keeps depends on its
features, which random weights still tie to the pixels (changes, repeats),
not on anything a trained model would answer.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image

from .. import api, toyvqa
from ..checks import BadValue, UserInputError


def render(
    view: np.ndarray,
    grid: tuple[int, int],
    stages: dict[str, dict],
    title: str,
    path: str | Path,
    subtitle: str = "",
    dropped_stage: str | None = None,
) -> None:
    """Save ``view`` (H x W x 3 uint8) once per stage with that stage's ``kept`` cells of ``grid`` highlighted.

    ``stages``: ``{name: {"before", "after", "kept"}}`` as in the report; every
    panel is captioned with the stage and its token counts, the figure with
    ``title`` (model, policy, budget) and ``subtitle``. In the panel of
    ``dropped_stage`` (the stage PixelPrune acted at) the dropped cells are
    also hatched in red and the caption counts them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = grid
    height, width = view.shape[:2]
    import textwrap

    width_in = max(4.2 * len(stages), 6.5)
    fig, axes = plt.subplots(1, len(stages), figsize=(width_in, 5.2), squeeze=False)
    for ax, (name, stage) in zip(axes[0], stages.items()):
        mask = np.zeros(rows * cols, dtype=bool)
        mask[stage["kept"]] = True
        cell = np.kron(mask.reshape(rows, cols), np.ones((math.ceil(height / rows), math.ceil(width / cols)), bool))
        cell = cell[:height, :width]
        shown = np.where(cell[..., None], view.astype(np.float32), view.astype(np.float32) * 0.2 + 20)
        ax.imshow(shown.clip(0, 255).astype(np.uint8))
        ax.contour(cell, levels=[0.5], colors=["yellow"], linewidths=0.6)
        caption = f"stage {name}: kept {stage['after']} of {stage['before']} tokens"
        if name == dropped_stage:
            dropped = ~cell
            ax.contourf(dropped, levels=[0.5, 1.5], colors="none", hatches=["////"])
            ax.imshow(np.ma.masked_where(~dropped, dropped), cmap="autumn", alpha=0.25, vmin=0, vmax=1)
            caption = f"stage {name}: pixelprune dropped {stage['before'] - stage['after']} of {stage['before']} units (hatched)"
        ax.set_title(caption, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    wrap = int(width_in * 11)
    fig.suptitle("\n".join(textwrap.wrap(title, wrap) + textwrap.wrap(subtitle, wrap)), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_video(
    frames: list[np.ndarray], grid: tuple[int, int], stage: dict, title: str, path: str | Path, columns: int = 8
) -> None:
    """Save a strip of a video's frames with one stage's kept cells bright (merged rows outlined in cyan).

    ``frames``: one picture (H x W x 3 uint8) per frame of the video as the
    policy sees it (a Qwen temporal slot: its first input frame); ``grid``:
    (rows, cols) of each frame's tokens; ``stage``: the report's video stage
    (``kept``: flat indices t * P + cell; optional ``merged``, ``frames``).
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = grid
    per = rows * cols
    t = len(frames)
    kept = np.zeros(t * per, dtype=bool)
    kept[stage["kept"]] = True
    merged = np.zeros(t * per, dtype=bool)
    merged[stage.get("merged", [])] = True
    ncols = min(columns, t)
    nrows = math.ceil(t / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.1 * ncols, 2.3 * nrows + 0.8), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= t:
            ax.axis("off")
            continue
        view = frames[k]
        height, width = view.shape[:2]
        block = np.ones((math.ceil(height / rows), math.ceil(width / cols)), bool)
        cell = np.kron(kept[k * per : (k + 1) * per].reshape(rows, cols), block)[:height, :width]
        shown = np.where(cell[..., None], view.astype(np.float32), view.astype(np.float32) * 0.2 + 20)
        ax.imshow(shown.clip(0, 255).astype(np.uint8))
        ax.contour(cell, levels=[0.5], colors=["yellow"], linewidths=0.4)
        mixed = np.kron(merged[k * per : (k + 1) * per].reshape(rows, cols), block)[:height, :width]
        if mixed.any():
            ax.contour(mixed, levels=[0.5], colors=["cyan"], linewidths=0.6)
        count = int(kept[k * per : (k + 1) * per].sum())
        ax.set_title(
            f"frame {k}: {count}/{per}" + (f", {int(merged[k * per : (k + 1) * per].sum())} merged" if mixed.any() else ""),
            fontsize=7,
        )
    caption = f"{title} - kept {stage['after']} of {stage['before']} video tokens"
    fig.suptitle("\n".join(textwrap.wrap(caption, int(2.1 * ncols * 12))), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def show_video(
    image_path: str | Path, family: str, policy: str, keep, out: str | Path, frames: int = 16, shift: int = 4, **options
) -> dict:
    """Prune a panning video made from one image with ``policy`` on the demo's ``family`` model; save the strip."""
    from ..demo import demo_model
    from ..patches import family_spec, supported_video_demo
    from .video_bench import pan

    if family not in supported_video_demo():
        raise BadValue(f"vtprune show --video draws the demo models {', '.join(supported_video_demo())}; got {family!r}")
    spec = family_spec(family)
    per_slot = spec.frames_per_slot
    if frames % per_slot:
        raise BadValue(f"--video {frames}: {family}'s video slots hold {per_slot} frames each; give an even number of frames")
    model = demo_model(family)
    with Image.open(image_path) as img:
        source = np.asarray(img.convert("RGB"))
    pictures = pan(frames=frames, side=spec.demo_video_side(model), shift=shift, image=source)
    inputs = spec.demo_video(model, pictures)
    with api.pruned(model, policy, keep=keep, **options), torch.no_grad():
        model(**inputs)
        video = api.report(model).to_dict()["samples"][0]["images"][0]
    stage = video["stages"]["projector"]
    shown = pictures[0::per_slot]
    per = video["tokens"] // len(shown)
    side_tokens = math.isqrt(per)
    title = f"{family} (demo, random weights) - policy {policy}, keep={keep}" + "".join(f" {k}={v}" for k, v in options.items())
    render_video(shown, (side_tokens, side_tokens), stage, title, out)
    return {
        "image": str(image_path),
        "model": family,
        "policy": policy,
        "keep": keep,
        "frames": stage["frames"],
        "stages": {"projector": {"before": stage["before"], "after": stage["after"]}},
        "merged": len(stage.get("merged", [])),
        "png": str(out),
    }


def _view_and_grid(model, processor, inputs: dict, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
    """The picture the model sees and its token grid (rows, cols)."""
    from ..patches import ADAPTERS

    family = model.config.model_type
    if family in ADAPTERS and ADAPTERS[family].spec.drawn:
        return ADAPTERS[family].spec.view_and_grid(model, processor, inputs, image)
    drawn = [t for t, adapter in ADAPTERS.items() if adapter.spec.drawn]
    raise BadValue(
        f"vtprune show draws {', '.join(drawn[:-1])} and {drawn[-1]} models; got {family!r} "
        "(LLaVA-NeXT's several views are not drawn yet)"
    )


def _load(model_ref: str):
    """(model, processor, prompt builder) of a toyvqa arch / folder or an HF checkpoint with a chat template."""
    path = toyvqa.checkpoint_path(model_ref) if model_ref in toyvqa.ARCHS else Path(model_ref)
    try:
        from ..toyvqa.models import arch_of

        arch_of(path)
        toy = (path / "metrics.json").is_file() or model_ref in toyvqa.ARCHS
    except (OSError, ValueError, KeyError):
        toy = False
    if toy:
        from ..toyvqa.vocab import prompt

        model, processor = toyvqa.load(path)
        return model, processor, lambda q: prompt(model.config.model_type, q)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(model_ref)).eval()
    processor = AutoProcessor.from_pretrained(str(model_ref))

    def chat(question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)

    return model, processor, chat


def shown_policy(policy: str, keep, tau: float | None = None, vit_layer: int | None = None, **options):
    """The policy ``show`` runs: a name, or ``pixelprune+NAME`` (a Pipeline); pixelprune takes ``tau``, not
    ``keep``; ``vit_layer`` goes to the first budgeted policy."""
    from ..policies.base import Pipeline, Policy, make_policy

    made: list[Policy | Pipeline] = []
    for name in policy.split("+"):
        if name == "pixelprune":
            made.append(make_policy(name, **({} if tau is None else {"tau": tau})))
            continue
        extra = dict(options)
        if vit_layer is not None and not any(getattr(p, "vit_layer", None) for p in made):
            extra["vit_layer"] = vit_layer
        made.append(make_policy(name, keep=keep, **extra))
    return made[0] if len(made) == 1 else Pipeline(cast(list[Policy], made))  # each name is one policy


def show(
    image_path: str | Path,
    model_ref: str,
    policy: str,
    keep,
    out: str | Path,
    question: str,
    max_new_tokens: int = 8,
    tau: float | None = None,
    vit_layer: int | None = None,
    **options,
) -> dict:
    """Prune one image with ``policy``, answer ``question``, and save the kept patches per stage to ``out``."""
    model, processor, build = _load(model_ref)
    with Image.open(image_path) as img:
        image = img.convert("RGB")
    inputs = dict(processor(images=[image], text=[build(question)], return_tensors="pt"))
    chosen = shown_policy(policy, keep, tau, vit_layer, **options)
    with api.pruned(model, chosen, tokenizer=processor), torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        image_report = api.report(model).to_dict()["samples"][0]["images"][0]
    answer = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    view, grid = _view_and_grid(model, processor, inputs, image)
    stages = image_report["stages"]
    given = {
        **options,
        **({"tau": tau} if tau is not None else {}),
        **({"vit_layer": vit_layer} if vit_layer is not None else {}),
    }
    options_text = "".join(f" {k}={v}" for k, v in given.items())
    from ..zoo import checkpoint_for

    name = checkpoint_for(model.config) or model.config.model_type
    budget = "" if policy == "pixelprune" else f", keep={keep}"
    title = f"model {Path(str(model_ref)).name} ({name}) - policy {policy}{budget}{options_text}"
    dropped = "vision" if policy.split("+")[0] == "pixelprune" else None
    render(view, grid, stages, title, out, subtitle=f"Q: {question}   A (pruned): {answer!r}", dropped_stage=dropped)
    return {
        "image": str(image_path),
        "model": str(model_ref),
        "policy": policy,
        "keep": keep,
        "answer": answer,
        "grid": list(grid),
        "stages": {k: {"before": v["before"], "after": v["after"]} for k, v in stages.items()},
        "png": str(out),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vtprune show", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("image", help="an image file")
    parser.add_argument("--model", default="llava", help="toyvqa arch name or checkpoint folder (default: llava)")
    parser.add_argument("--policy", default="idpruner")
    parser.add_argument("--keep", default="64", help="tokens per image (int) or fraction (float)")
    parser.add_argument("--question", default="what color is the circle ?")
    parser.add_argument("--out", default="kept.png", help="PNG to write (default kept.png)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument(
        "--video",
        type=int,
        metavar="N",
        help="draw a video policy on N frames of the image panned "
        "(--model: a family whose demo builds videos: patches.supported_video_demo())",
    )
    parser.add_argument("--shift", type=int, default=4, help="--video: pixels the window moves per frame (default 4)")
    parser.add_argument(
        "--tau",
        type=float,
        default=None,
        help="pixelprune's largest pixel difference still counted as a match (default 0: exact)",
    )
    parser.add_argument(
        "--vit-layer", type=int, default=None, help="select inside the vision encoder after this many of its blocks (vit_layer)"
    )
    args = parser.parse_args(argv)
    from ..budget import parse_keep, validate_keep
    from ..policies.base import unknown_policy
    from .outputs import file_problem, make_parent

    if error := unknown_policy(args.policy.split("+")):
        parser.error(error)
    if not Path(args.image).is_file():
        print(f"vtprune show: image {args.image!r} is not a file", file=sys.stderr)
        return 2
    if problem := file_problem(args.out, "--out"):
        print(f"vtprune show: {problem}", file=sys.stderr)  # before the model runs
        return 2
    make_parent(args.out)
    try:
        keep = validate_keep(parse_keep(args.keep))
        if args.video is not None:
            if args.video < 1 or args.shift < 0:
                raise BadValue(f"--video must be >= 1 and --shift >= 0; got {args.video} and {args.shift}")
            result = show_video(args.image, args.model, args.policy, keep, args.out, args.video, args.shift)
            print(
                f"saved {result['png']}: {result['model']} {result['policy']} keep={keep}, video "
                f"{result['stages']['projector']['before']}->{result['stages']['projector']['after']} tokens, "
                f"per frame {result['frames']}" + (f", {result['merged']} merged" if result["merged"] else "")
            )
            return 0
        result = show(
            args.image,
            args.model,
            args.policy,
            keep,
            args.out,
            args.question,
            args.max_new_tokens,
            tau=args.tau,
            vit_layer=args.vit_layer,
        )
    except (UserInputError, OSError) as exc:
        print(f"vtprune show: {exc}", file=sys.stderr)
        return 2
    print(
        f"saved {result['png']}: {result['model']} {result['policy']} keep={keep}, stages "
        + ", ".join(f"{k} {v['before']}->{v['after']}" for k, v in result["stages"].items())
        + f"; answer {result['answer']!r}"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
