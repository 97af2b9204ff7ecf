"""`vtprune show IMAGE --model PATH --policy P --keep K [--question Q]`: which patches a policy keeps, as a PNG.

One panel per pruning stage of the report (``vision``, ``projector``,
``llm@K``...), each the image as the model sees it (resized or cropped by
its processor) with the kept patches bright and the pruned ones dimmed; the
caption names the model, the policy and budget, the stage and the visual
tokens before and after it, and the question with the pruned model's answer.

``--model``: a toyvqa arch name (``llava``, ``qwen2_5_vl``) or a checkpoint
folder of the LLaVA-1.5 or Qwen2/2.5-VL families (a toyvqa folder, or any HF
checkpoint with a chat template). The kept indices are the report's: positions
in the image's own token grid, raster order (``vtprune.report(model).to_dict()``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import api, toyvqa
from ..checks import BadValue, UserInputError


def render(view: np.ndarray, grid: tuple[int, int], stages: dict[str, dict], title: str, path: str | Path,
           subtitle: str = "") -> None:
    """Save ``view`` (H x W x 3 uint8) once per stage with that stage's ``kept`` cells of ``grid`` highlighted.

    ``stages``: ``{name: {"before", "after", "kept"}}`` as in the report; every
    panel is captioned with the stage and its token counts, the figure with
    ``title`` (model, policy, budget) and ``subtitle``.
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
        ax.set_title(f"stage {name}: kept {stage['after']} of {stage['before']} tokens", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    wrap = int(width_in * 11)
    fig.suptitle("\n".join(textwrap.wrap(title, wrap) + textwrap.wrap(subtitle, wrap)), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _view_and_grid(model, processor, inputs: dict, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
    """The picture the model sees and its token grid (rows, cols)."""
    from ..patches import ADAPTERS

    family = model.config.model_type
    if family in ADAPTERS and ADAPTERS[family].spec.drawn:
        return ADAPTERS[family].spec.view_and_grid(model, processor, inputs, image)
    drawn = [t for t, adapter in ADAPTERS.items() if adapter.spec.drawn]
    raise BadValue(f"vtprune show draws {', '.join(drawn[:-1])} and {drawn[-1]} models; got {family!r} "
                     "(LLaVA-NeXT's several views are not drawn yet)")


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


def show(image_path: str | Path, model_ref: str, policy: str, keep, out: str | Path, question: str,
         max_new_tokens: int = 8, **options) -> dict:
    """Prune one image with ``policy``, answer ``question``, and save the kept patches per stage to ``out``."""
    model, processor, build = _load(model_ref)
    with Image.open(image_path) as img:
        image = img.convert("RGB")
    inputs = dict(processor(images=[image], text=[build(question)], return_tensors="pt"))
    with api.pruned(model, policy, keep=keep, tokenizer=processor, **options), torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        image_report = api.report(model).to_dict()["samples"][0]["images"][0]
    answer = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    view, grid = _view_and_grid(model, processor, inputs, image)
    stages = image_report["stages"]
    options_text = "".join(f" {k}={v}" for k, v in options.items())
    from ..zoo import checkpoint_for

    name = checkpoint_for(model.config) or model.config.model_type
    title = f"model {Path(str(model_ref)).name} ({name}) - policy {policy}, keep={keep}{options_text}"
    render(view, grid, stages, title, out, subtitle=f"Q: {question}   A (pruned): {answer!r}")
    return {"image": str(image_path), "model": str(model_ref), "policy": policy, "keep": keep, "answer": answer,
            "grid": list(grid), "stages": {k: {"before": v["before"], "after": v["after"]} for k, v in stages.items()},
            "png": str(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune show", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", help="an image file")
    parser.add_argument("--model", default="llava", help="toyvqa arch name or checkpoint folder (default: llava)")
    parser.add_argument("--policy", default="idpruner")
    parser.add_argument("--keep", default="64", help="tokens per image (int) or fraction (float)")
    parser.add_argument("--question", default="what color is the circle ?")
    parser.add_argument("--out", default="kept.png", help="PNG to write (default kept.png)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    from ..budget import parse_keep, validate_keep
    from ..policies.base import unknown_policy
    from .outputs import file_problem, make_parent

    if error := unknown_policy([args.policy]):
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
        result = show(args.image, args.model, args.policy, keep, args.out, args.question, args.max_new_tokens)
    except (UserInputError, OSError) as exc:
        print(f"vtprune show: {exc}", file=sys.stderr)
        return 2
    print(f"saved {result['png']}: {result['model']} {result['policy']} keep={keep}, stages "
          + ", ".join(f"{k} {v['before']}->{v['after']}" for k, v in result["stages"].items())
          + f"; answer {result['answer']!r}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
