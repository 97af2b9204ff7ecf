"""`vtprune sweep sweep.yaml`: an ablation grid of models x policies x budgets x tasks.

One JSON row per run in ``out/results.jsonl``; a rerun skips rows already
there (resumable). Every model also gets its unpruned run, and ``random``
and ``pooling`` are added at every budget (the baselines every comparison
needs). Afterwards: ``summary.md`` (accuracy, retained, agreement, prefill
time per run) and two PNG plots (accuracy retained vs tokens kept and vs
prefill time).

Tasks today: ``toyvqa`` (offline, the shipped or a saved toy model).
Example ``sweep.yaml``::

    out: runs/sweep
    models: [llava]                   # toyvqa arch names or checkpoint folders
    policies: [divprune, mmtok, "idpruner:prompt", fastv]
    budgets: [64, 32]
    tasks: [toyvqa]
    n: 200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from .. import api, toyvqa
from ..measure import time_prefill

BASELINES = ("random", "pooling")


def _key(row: dict) -> tuple:
    return (row["model"], row["task"], row["policy"], str(row["keep"]), row["n"])


def _grid(cfg: dict) -> list[tuple[str, str, str, object]]:
    policies = list(dict.fromkeys([*BASELINES, *cfg.get("policies", [])]))
    runs = []
    for model in cfg["models"]:
        for task in cfg.get("tasks", ["toyvqa"]):
            if task != "toyvqa":
                raise ValueError(f"unknown task {task!r}; available offline: toyvqa")
            runs.append((model, task, "none", "all"))
            runs += [(model, task, p, k) for p in policies for k in cfg["budgets"]]
    return runs


def _prefill_batch(model, processor, size: int = 8) -> dict:
    from ..toyvqa.models import IMAGE_SIZE
    from ..toyvqa.questions import make_item
    from ..toyvqa.vocab import prompt

    arch = model.config.model_type
    made = [make_item("test", i, size=IMAGE_SIZE[arch]) for i in range(size)]
    texts = [prompt(arch, m[0].question) for m in made]
    return dict(processor(images=[m[1] for m in made], text=texts, padding=True, return_tensors="pt"))


def run_one(model, processor, policy: str, keep, n: int, base: dict | None) -> dict:
    name, _, variant = policy.partition(":")
    options = {"importance": variant} if variant else {}
    batch = _prefill_batch(model, processor)
    start = time.perf_counter()
    if policy == "none":
        prefill_ms, _ = time_prefill(model, batch, repeats=3)
        res = toyvqa.score(model, processor, n=n, return_predictions=True)
        kept = None
    else:
        with api.pruned(model, name, keep=keep, tokenizer=processor, **options):
            prefill_ms, _ = time_prefill(model, batch, repeats=3)
            stages = api.report(model).to_dict()["samples"][0]["images"][0]["stages"]
            kept = list(stages.values())[-1]["after"]
            res = toyvqa.score(model, processor, n=n, return_predictions=True)
    row = dict(policy=policy, keep=keep, kept_tokens=kept, accuracy=res["overall"], per_type=res["per_type"],
               prefill_ms=prefill_ms, seconds=time.perf_counter() - start)
    if base is not None:
        pairs = list(zip(res["predictions"], base["predictions"]))
        row["agreement"] = sum(a["prediction"] == b["prediction"] for a, b in pairs) / max(1, len(pairs))
        row["retained"] = res["overall"] / base["accuracy"] if base["accuracy"] else None
    row["predictions"] = res["predictions"]
    return row


def sweep(cfg: dict) -> list[dict]:
    out = Path(cfg.get("out", "runs/sweep"))
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {}
    if results.exists():
        for line in results.read_text().splitlines():
            row = json.loads(line)
            done[_key(row)] = row
    n = int(cfg.get("n", 200))
    runs = _grid(cfg)
    loaded: dict[str, tuple] = {}
    from tqdm import tqdm

    for model_ref, task, policy, keep in tqdm(runs, desc="sweep", unit="run"):
        key = (model_ref, task, policy, str(keep), n)
        if key in done:
            continue
        if model_ref not in loaded:
            loaded = {model_ref: toyvqa.load(model_ref)}
        model, processor = loaded[model_ref]
        base = done.get((model_ref, task, "none", "all", n))
        if policy != "none" and base is None:
            raise RuntimeError("the unpruned run of each model comes first in the grid")
        base_view = None if base is None else {"accuracy": base["accuracy"], "predictions": base["predictions"]}
        row = run_one(model, processor, policy, keep, n, base_view)
        row.update(model=model_ref, task=task, n=n)
        with results.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        done[key] = row
    rows = [done[(m, t, p, str(k), n)] for m, t, p, k in runs]
    write_summary(rows, out)
    return rows


def write_summary(rows: list[dict], out: Path) -> None:
    lines = ["| model | task | policy | keep | kept | accuracy | retained | agreement | prefill ms |",
             "|" + "---|" * 9]
    for r in rows:
        retained = f"{r['retained']:.1%}" if r.get("retained") is not None else "-"
        agree = f"{r['agreement']:.1%}" if "agreement" in r else "-"
        lines.append(f"| {r['model']} | {r['task']} | {r['policy']} | {r['keep']} | {r['kept_tokens'] or 'all'} | "
                     f"{r['accuracy']:.3f} | {retained} | {agree} | {r['prefill_ms']:.1f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for x_key, label, name in (("kept_tokens", "visual tokens kept per image", "retained_vs_tokens.png"),
                               ("prefill_ms", "prefill ms (batch of 8)", "retained_vs_prefill.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for policy in dict.fromkeys(r["policy"] for r in rows if r["policy"] != "none"):
            pts = sorted((r[x_key], r["retained"]) for r in rows if r["policy"] == policy and r.get("retained") is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        ax.axhline(1.0, color="grey", linestyle=":")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy retained (vs unpruned)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="sweep YAML")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(Path(args.config).read_text())
    for key in ("models", "budgets"):
        if not cfg.get(key):
            raise SystemExit(f"sweep config {args.config}: '{key}' is required")
    cfg["budgets"] = [validate(b) for b in cfg["budgets"]]
    rows = sweep(cfg)
    print((Path(cfg.get("out", "runs/sweep")) / "summary.md").read_text())
    print(f"{len(rows)} runs; results, summary and plots in {cfg.get('out', 'runs/sweep')}")
    return 0


def validate(keep):
    from ..budget import validate_keep

    return validate_keep(keep)
