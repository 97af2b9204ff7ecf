"""`vtprune calibrate-ecl`: find the entropy-collapse layer of a model (EntropyPrune's idea).

For a few inputs, the matrix entropy of the visual-token set is computed at
the input of every decoder layer: the hidden states of the image's tokens
``(n, D)``, centred over tokens, their ``n x n`` Gram matrix's eigenvalues
normalised to sum 1, entropy ``-sum(l ln l) / ln n``
(`vtprune.ops.entropy.matrix_entropy` with ``normalize="trace"``). The
proposed pruning layer K is where the averaged curve drops most sharply
(the largest ``E[k-1] - E[k]``, k >= 1). The released EntropyPrune code
fixes K (2 for LLaVA, 1 for Qwen) instead; model_zoo.yaml stores the
reference values.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch

from .checks import BadValue
from .ops.entropy import matrix_entropy
from .patches import adapter_for, supported_model_types


@torch.no_grad()
def entropy_curve(model, batch: dict) -> list[float]:
    """Matrix entropy of the visual-token set at the input of each decoder layer (and after the last).

    Averaged over every image of the batch; index k is the input of layer k.
    """
    adapter = adapter_for(model)
    out = model(**batch, output_hidden_states=True, use_cache=False)
    states = out.hidden_states
    layouts = adapter.layouts({**batch, **{k: v for k, v in batch.items() if k in adapter.grid_keys}}, states[0])
    if layouts is None:
        raise BadValue("calibrate-ecl needs inputs with images; the batch holds no visual tokens")
    curve = []
    for hidden in states:
        values = [
            float(matrix_entropy(hidden[b, img.positions][None], normalize="trace")[0])
            for b, sample in enumerate(layouts)
            for img in sample.images
            if img.num_tokens >= 2
        ]
        curve.append(float(np.mean(values)))
    return curve


def propose_collapse_layer(curve: list[float]) -> int:
    """The layer K whose input shows the sharpest entropy drop (ties: the earliest)."""
    drops = [curve[k - 1] - curve[k] for k in range(1, len(curve) - 1)]
    if not drops:
        raise BadValue(f"the curve needs at least 3 points to propose a layer; got {len(curve)}")
    return 1 + int(np.argmax(drops))


def _photos() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]


def _model_and_batches(args) -> tuple[Any, list[dict], str]:
    if args.model:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.model, local_files_only=True).eval()
        processor = AutoProcessor.from_pretrained(args.model, local_files_only=True)
        token = getattr(processor, "image_token", "<image>")
        batches = []
        for image in _photos()[: args.n]:
            enc = processor(text=[f"{token}\nDescribe the image."], images=[image], return_tensors="pt")
            batches.append(dict(enc))
        return model, batches, args.model
    from .demo import demo_inputs, demo_model

    model = demo_model(args.tiny)
    return model, [demo_inputs(model, image) for image in _photos()[: args.n]], f"random-weight {args.tiny}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune calibrate-ecl", description=__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="local model directory (loaded offline with its processor)")
    source.add_argument(
        "--tiny",
        default="llava",
        choices=supported_model_types(),
        help="a random-weight model of this family with the demo geometry (default: llava)",
    )
    parser.add_argument("--n", type=int, default=2, help="number of photos (1-4, default 2)")
    parser.add_argument("--json", help="append the result as one JSON row to this file")
    parser.add_argument("--png", help="save the entropy curve as a PNG plot")
    args = parser.parse_args(argv)
    if not 1 <= args.n <= 4:
        parser.error(f"--n must be in 1..4; got {args.n}")
    model, batches, label = _model_and_batches(args)
    curves = np.array([entropy_curve(model, b) for b in batches])
    curve = curves.mean(0).tolist()
    layer = propose_collapse_layer(curve)
    drops = [curve[k - 1] - curve[k] for k in range(1, len(curve) - 1)]
    row = {
        "model": label,
        "model_type": model.config.model_type,
        "inputs": len(batches),
        "entropy": [round(v, 6) for v in curve],
        "proposed_at_layer": layer,
        "collapses": max(drops) > 0,
    }
    print(json.dumps(row))
    if max(drops) <= 0:
        print(
            f"vtprune calibrate-ecl: warning: the entropy never drops on these inputs (it rises or stays at every "
            f"layer), so there is no collapse layer; K = {layer} is only the smallest rise. Keep the reference K "
            "from model_zoo.yaml (EntropyPrune: 2 for LLaVA, 1 for Qwen).",
            file=sys.stderr,
        )
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(range(len(curve)), curve, marker="o")
        ax.axvline(layer, color="red", linestyle="--", label=f"proposed K = {layer}")
        ax.set_xlabel("decoder layer (input of)")
        ax.set_ylabel("matrix entropy of visual tokens")
        ax.set_title(label)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=100)
        print(f"saved {args.png}")
    return 0
