"""`vtprune doctor`: the core invariants on tiny models of every family, with the installed transformers and torch.

Run it after upgrading transformers or torch. For each supported family it
builds a small random-weight model from a config (nothing is downloaded)
and checks, against the unwrapped model:

- ``identity``: wrapped at full budget (``random``, keep=1.0), a batch of
  unequal samples gives the unwrapped logits at every attended position;
- ``hand-pruned``: a projector-stage prune (``random``, 5 tokens) gives the
  logits of the unwrapped language model run on the hand-gathered inputs
  (the kept visual rows and every text row, at their original positions);
- ``cache``: after an llm-stage prune (``random``, 3 tokens at layer 1),
  cached ``generate`` produces the tokens of ``generate(use_cache=False)``;
- ``batch``: with ``divprune`` at half the tokens, each sample's last
  logits in a padded batch equal those of the sample run alone.

It prints the versions, then one PASS/FAIL line per family (the failing
checks named, with their error), and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import torch

TOL = 1e-4


def versions() -> dict[str, str]:
    """The versions that decide whether vtprune works: Python, torch, transformers, torchvision, lmms-eval."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "torchvision", "lmms_eval", "vtprune"):
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def torchvision_problem() -> str | None:
    """Why the installed torchvision cannot be used beside this torch, with what fixes it; None when it imports.

    transformers imports torchvision whenever it is installed, so a build made
    for another torch breaks every model import. Tried in a subprocess: a
    failed import leaves half-registered operators behind in this one.
    """
    try:
        installed = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return None
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or ["(no message)"])[-1]
    return f"torchvision {installed} does not import beside torch {torch.__version__} ({last}). " + torchvision_advice()


def torchvision_advice() -> str:
    """How to install the torchvision that matches the installed torch, without replacing that torch."""
    major_minor = torch.__version__.split("+")[0].split(".")[:2]
    matching = f"0.{int(major_minor[1]) + 15}" if major_minor[0] == "2" else None
    build = torch.__version__.partition("+")[2]
    which = f"torchvision {matching}.x" if matching else "the torchvision release made for your torch"
    return (
        f"Install {which} (torch 2.N pairs with torchvision 0.(N+15)) from the same source as your torch "
        f"({'a +' + build + ' build' if build else 'the same build'}), with --no-deps so that pip keeps your torch, "
        "or uninstall torchvision if nothing of yours needs it. Check with: "
        'python -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)"'
    )


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    if not diff <= TOL:
        raise AssertionError(f"{what}: max difference {diff:.2e} > {TOL:g}")


@torch.no_grad()
def check_identity(family: str) -> None:
    import vtprune
    from vtprune.tiny import make_inputs, mixed_specs, tiny_model

    model = tiny_model(family)
    batch = make_inputs(model, mixed_specs(family))
    ref = model(**batch).logits
    vtprune.wrap(model, "random", keep=1.0)
    out = model(**batch).logits
    vtprune.unwrap(model)
    valid = batch["attention_mask"].bool()
    if out.shape != ref.shape:
        raise AssertionError(f"logits shape {tuple(out.shape)} != unwrapped {tuple(ref.shape)}")
    _close(out[valid], ref[valid], "logits at keep=1.0 vs unwrapped")


@torch.no_grad()
def check_hand_pruned(family: str) -> None:
    import vtprune
    from vtprune.tiny import IMAGE_TOKEN, VIDEO_TOKEN, make_inputs, patch_positions, single_spec, tiny_model

    model = tiny_model(family)
    batch = make_inputs(model, [single_spec(family)])
    seen: dict = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda _m, _a, kwargs: seen.update(kwargs), with_kwargs=True)
    model(**batch)
    handle.remove()
    embeds = seen["inputs_embeds"]
    positions = seen.get("position_ids")
    if positions is None:
        positions = torch.arange(embeds.shape[1]).unsqueeze(0)

    vtprune.wrap(model, "random", keep=5, seed=11)
    pruned = model(**batch, use_cache=False).logits
    kept = vtprune.report(model).to_dict()["samples"][0]["images"][0]["stages"]["projector"]["kept"]
    vtprune.unwrap(model)

    ids = batch["input_ids"][0]
    visual = torch.nonzero((ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)).flatten()
    patch = patch_positions(model, batch)
    keep = torch.ones(embeds.shape[1], dtype=torch.bool)
    keep[patch] = False
    keep[patch[kept]] = True
    keep[visual[~torch.isin(visual, patch)]] = True  # newline rows stay
    seq = torch.nonzero(keep).flatten()
    extra = {}
    if seen.get("visual_pos_masks") is not None:  # DeepStack rows of the kept visual positions
        mask = seen["visual_pos_masks"]
        extra = dict(
            visual_pos_masks=mask[:, seq],
            deepstack_visual_embeds=[rows[keep[mask[0]]] for rows in seen["deepstack_visual_embeds"]],
        )
    out = model.model.language_model(
        inputs_embeds=embeds[:, seq],
        position_ids=positions[..., seq],
        attention_mask=torch.ones(1, seq.numel(), dtype=torch.long),
        use_cache=False,
        **extra,
    )
    if len(kept) != 5:
        raise AssertionError(f"kept {len(kept)} tokens, asked for 5")
    _close(pruned, model.lm_head(out.last_hidden_state), "pruned logits vs the hand-pruned language model")


@torch.no_grad()
def check_cache(family: str) -> None:
    import vtprune
    from vtprune.tiny import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START, make_inputs, mixed_specs, tiny_model

    model = tiny_model(family)
    batch = make_inputs(model, mixed_specs(family))
    kwargs = dict(
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
        suppress_tokens=[IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END],
    )
    vtprune.wrap(model, vtprune.policies.Random(keep=3, at_layer=1, seed=3))
    try:
        cached = model.generate(**batch, **kwargs)
        recomputed = model.generate(**batch, use_cache=False, **kwargs)
    finally:
        vtprune.unwrap(model)
    if not torch.equal(cached, recomputed):
        rows = [b for b in range(cached.shape[0]) if not torch.equal(cached[b], recomputed[b])]
        raise AssertionError(f"cached generate != generate(use_cache=False) in samples {rows}")


@torch.no_grad()
def check_batch(family: str) -> None:
    import vtprune
    from vtprune.tiny import make_inputs, mixed_specs, sample_alone, tiny_model

    model = tiny_model(family)
    batch = make_inputs(model, mixed_specs(family))
    vtprune.wrap(model, "divprune", keep=0.5)
    try:
        together = model(**batch).logits[:, -1]
        for b in range(batch["input_ids"].shape[0]):
            alone = model(**sample_alone(batch, b, family)).logits[:, -1]
            _close(together[b : b + 1], alone, f"sample {b}: batched vs alone")
    finally:
        vtprune.unwrap(model)


CHECKS: dict[str, Callable[[str], None]] = {
    "identity": check_identity,
    "hand-pruned": check_hand_pruned,
    "cache": check_cache,
    "batch": check_batch,
}


def run(families: list[str], out=None) -> dict[str, dict[str, str | None]]:
    """Every check on every family: ``{family: {check: None (passed) or the error}}``, printed as it goes
    (to ``out``, standard output by default)."""
    out = sys.stdout if out is None else out
    results: dict[str, dict[str, str | None]] = {}
    for family in families:
        start = time.perf_counter()
        errors: dict[str, str | None] = {}
        for name, check in CHECKS.items():
            try:
                check(family)
                errors[name] = None
            except Exception as exc:  # a self-check reports every failure, whatever raised it
                errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                if "VTPRUNE_DEBUG" in os.environ:
                    traceback.print_exc()
        results[family] = errors
        failed = [n for n, e in errors.items() if e is not None]
        line = f"{'PASS' if not failed else 'FAIL'}  {family:<15} {', '.join(CHECKS)}  ({time.perf_counter() - start:.1f} s)"
        if failed:
            line += "".join(f"\n      {n}: {errors[n]}" for n in failed)
        print(line, file=out, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    from .patches import supported_model_types

    families = supported_model_types()
    parser = argparse.ArgumentParser(prog="vtprune doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--families",
        nargs="+",
        default=families,
        metavar="FAMILY",
        help=f"families to check (default: all of {', '.join(families)})",
    )
    args = parser.parse_args(argv)
    unknown = [f for f in args.families if f not in families]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(families)}")
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    for key, value in versions().items():
        print(f"{key:<13} {value}")
    problem = torchvision_problem()
    if problem:  # transformers cannot import its vision models: every family would fail the same way
        print(f"FAIL  torchvision: {problem}")
        return 1
    start = time.perf_counter()
    results = run(args.families)
    failed = [f for f, errors in results.items() if any(e is not None for e in errors.values())]
    total = len(results)
    print(
        f"{total - len(failed)}/{total} families pass in {time.perf_counter() - start:.0f} s"
        + (f"; failing: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
