"""`vtprune stability`: how much a policy's kept set and the answer move under tiny image perturbations.

    vtprune stability --model llava --policies divprune idpruner --keep 64 --n 8 --json out.json

For each of the first ``n`` toyvqa test items, the image is perturbed three
ways a user would not notice:

- ``noise``: Gaussian noise, sigma = 2/255 of the pixel range (seeded per item);
- ``shift``: the picture moved 1 pixel to the right (the first column repeated);
- ``jpeg``: saved and reloaded as JPEG at quality 90.

Per policy: the Jaccard overlap ``|A & B| / |A | B|`` between the kept set
of the original image and that of each perturbed copy (the report's kept
indices of the last stage, mean over items), the answer agreement (the
perturbed image's answer equals the original's, pruned), and the accuracy on
each version. The unpruned model's own agreement and accuracy under the same
perturbations are reported beside them: a perturbation that moves the
unpruned model (the 1-pixel shift moves the toy LLaVA's accuracy) says little
about the policy. ``random`` and ``pooling`` do not read the image, so their
Jaccard is 1 by construction (a check of the measurement).

``--model``: a toyvqa arch name (``llava``, ``qwen2_5_vl``: the shipped
checkpoints) or a saved toyvqa checkpoint folder; the items are toyvqa's
test split at the model's image size.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time

import numpy as np
import torch
from PIL import Image

from .. import api, toyvqa
from ..budget import parse_keep, validate_keep
from ..checks import BadValue, UserInputError
from ..policies.base import policy_spec
from .outputs import file_problem, make_parent

PERTURBATIONS = ("noise", "shift", "jpeg")
NOISE_SIGMA = 2.0 / 255.0
JPEG_QUALITY = 90
DEFAULT_POLICIES = [
    "random",
    "pooling",
    "divprune",
    "mmtok",
    "idpruner",
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


def perturb(image: Image.Image, kind: str, seed: int = 0) -> Image.Image:
    """``image`` with one of the :data:`PERTURBATIONS` applied (deterministic for a given ``seed``)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if kind == "noise":
        noise = np.random.default_rng(seed).normal(0.0, NOISE_SIGMA, pixels.shape).astype(np.float32)
        pixels = np.clip(pixels + noise, 0.0, 1.0)
    elif kind == "shift":
        pixels = np.concatenate([pixels[:, :1], pixels[:, :-1]], axis=1)
    elif kind == "jpeg":
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return decoded.convert("RGB")
    else:
        raise BadValue(f"unknown perturbation {kind!r}; choose from {PERTURBATIONS}")
    return Image.fromarray(np.round(pixels * 255.0).astype(np.uint8))


def jaccard(a, b) -> float:
    """``|a & b| / |a | b|`` of two index sets (1.0 when both are empty)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def _items(model, n: int):
    from ..toyvqa.models import IMAGE_SIZE

    size = IMAGE_SIZE[model.config.model_type]
    made = [toyvqa.make_item("test", i, size=size) for i in range(n)]
    return [m[0] for m in made], [m[1] for m in made]


def _answers_and_kept(model, processor, items, images, batch_size: int, pruned: bool):
    """Greedy answers per item and, when pruned, the last stage's kept indices of each item's image."""
    from ..toyvqa.scoring import predict

    answers, kept = [], []
    for start in range(0, len(items), batch_size):
        chunk = slice(start, start + batch_size)
        answers += predict(model, processor, items[chunk], images[chunk])
        if pruned:
            for sample in api.report(model).to_dict()["samples"]:
                stages = sample["images"][0]["stages"]
                kept.append(list(stages.values())[-1]["kept"])
    return answers, kept


def measure(
    model, processor, policies: list[str], keep, n: int = 8, batch_size: int = 16, perturbations: tuple[str, ...] = PERTURBATIONS
) -> dict:
    """Jaccard of kept sets, answer agreement and accuracy under each perturbation, per policy and unpruned."""
    items, images = _items(model, n)
    truth = [it.answer for it in items]
    versions = {"original": images}
    for kind in perturbations:
        versions[kind] = [perturb(img, kind, seed=i) for i, img in enumerate(images)]

    def accuracy(answers):
        return sum(a == t for a, t in zip(answers, truth)) / len(truth)

    def agreement(a, b):
        return sum(x == y for x, y in zip(a, b)) / len(a)

    base = {v: _answers_and_kept(model, processor, items, imgs, batch_size, pruned=False)[0] for v, imgs in versions.items()}
    out = {
        "n": n,
        "keep": keep,
        "perturbations": {
            "noise": f"gaussian sigma={NOISE_SIGMA:.5f} (2/255)",
            "shift": "1 pixel to the right",
            "jpeg": f"quality {JPEG_QUALITY}",
        },
        "unpruned": {
            "accuracy": {v: accuracy(a) for v, a in base.items()},
            "agreement": {k: agreement(base[k], base["original"]) for k in perturbations},
        },
        "policies": [],
    }
    for spec in policies:
        name, options = policy_spec(spec)
        start = time.perf_counter()
        with api.pruned(model, name, keep=keep, tokenizer=processor, **options):
            runs = {v: _answers_and_kept(model, processor, items, imgs, batch_size, pruned=True) for v, imgs in versions.items()}
        answers0, kept0 = runs["original"]
        out["policies"].append(
            {
                "policy": spec,
                "jaccard": {k: float(np.mean([jaccard(a, b) for a, b in zip(kept0, runs[k][1])])) for k in perturbations},
                "agreement": {k: agreement(runs[k][0], answers0) for k in perturbations},
                "agreement_with_unpruned": agreement(answers0, base["original"]),
                "accuracy": {v: accuracy(r[0]) for v, r in runs.items()},
                "kept_tokens": float(np.mean([len(k) for k in kept0])),
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
    return out


def markdown(result: dict) -> str:
    """The result as a markdown table: Jaccard, agreement, accuracy per perturbation; the unpruned row first."""
    kinds = list(result["unpruned"]["agreement"])
    head = (
        ["policy"]
        + [f"Jaccard {k}" for k in kinds]
        + [f"agree {k}" for k in kinds]
        + ["acc original"]
        + [f"acc {k}" for k in kinds]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    u = result["unpruned"]
    lines.append(
        "| none (unpruned) | "
        + " | ".join(["-"] * len(kinds))
        + " | "
        + " | ".join(f"{u['agreement'][k]:.2f}" for k in kinds)
        + " | "
        + " | ".join(f"{u['accuracy'][v]:.2f}" for v in ["original", *kinds])
        + " |"
    )
    for p in result["policies"]:
        lines.append(
            f"| {p['policy']} | "
            + " | ".join(f"{p['jaccard'][k]:.2f}" for k in kinds)
            + " | "
            + " | ".join(f"{p['agreement'][k]:.2f}" for k in kinds)
            + " | "
            + " | ".join(f"{p['accuracy'][v]:.2f}" for v in ["original", *kinds])
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vtprune stability", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llava", help="toyvqa arch name (llava, qwen2_5_vl) or checkpoint folder")
    parser.add_argument(
        "--policies",
        nargs="+",
        default=DEFAULT_POLICIES,
        help="registry names; idpruner:IMPORTANCE picks IDPruner-TF's importance",
    )
    parser.add_argument("--keep", default="64", help="tokens per image (int) or fraction (float); default 64")
    parser.add_argument("--n", type=int, default=8, help="toyvqa test items (default 8)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1; got {args.n}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..policies.base import unknown_policy

    if error := unknown_policy(args.policies, variants=True):
        parser.error(error)
    if args.json is not None and (problem := file_problem(args.json, "--json")):
        print(f"vtprune stability: {problem}", file=sys.stderr)  # before measuring: a bad path must not cost the finished results
        return 2
    if args.json is not None:
        make_parent(args.json)
    try:
        keep = validate_keep(parse_keep(args.keep))
        model, processor = toyvqa.load(args.model)
    except (UserInputError, OSError) as exc:
        print(f"vtprune stability: {exc}", file=sys.stderr)
        return 2
    result = {"model": args.model, **measure(model, processor, args.policies, keep, args.n, args.batch_size)}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    print(f"vtprune stability: model={args.model} keep={keep} n={args.n} (toyvqa test items)")
    print(markdown(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
