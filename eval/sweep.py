"""`vtprune sweep sweep.yaml`: an ablation grid of models x policies x budgets x tasks.

One JSON row per run in ``out/results.jsonl``; a rerun skips rows already
there (resumable). Every model also gets its unpruned run, and ``random``
and ``pooling`` are added at every budget (the baselines every comparison
needs). Afterwards: ``summary.md`` (accuracy, retained, agreement, prefill
time per run) and two PNG plots (accuracy retained vs tokens kept and vs
prefill time).

Tasks:

- ``toyvqa``: the offline scorer (:func:`vtprune.toyvqa.score`) on the
  first ``n`` test items; prefill time is the median of a batch of 8.
- ``lmms:NAME``: lmms-eval task NAME run through ``vtprune eval`` (lmms-eval's
  own wrapper for the model's family, first ``n`` items; ``lmms:toyvqa`` is
  the same toyvqa items as an lmms-eval task). Accuracy is the task's first
  metric; prefill time is the mean over the evaluation's prefills (batch 1).
  Each run also leaves lmms-eval's results, samples and the vtprune report in
  ``out/lmms/MODEL/TASK/POLICY-KEEP/``.

Models are toyvqa arch names (the shipped checkpoints) or checkpoint folders.
Example ``sweep.yaml``::

    out: runs/sweep
    models: [llava]
    policies: [divprune, mmtok, "idpruner:prompt", fastv]
    budgets: [64, 32]
    tasks: [toyvqa, "lmms:toyvqa"]
    n: 200
    model_args: ""                    # optional, more lmms-eval wrapper args (dtype=bfloat16,...)
    device: cpu                       # optional, for lmms tasks
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


LMMS = "lmms:"


def _grid(cfg: dict) -> list[tuple[str, str, str, object]]:
    policies = list(dict.fromkeys([*BASELINES, *cfg.get("policies", [])]))
    runs = []
    for model in cfg["models"]:
        for task in cfg.get("tasks", ["toyvqa"]):
            if task != "toyvqa" and not (task.startswith(LMMS) and task[len(LMMS):]):
                raise ValueError(f"unknown task {task!r}; use toyvqa (offline scorer) or lmms:NAME (an lmms-eval task, "
                                 "e.g. lmms:toyvqa)")
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


def _policy_args(policy: str, keep) -> dict:
    """``name:variant`` (IDPruner's importance) as the runner's pruning arguments."""
    name, _, variant = policy.partition(":")
    if name == "none":
        return {}
    return {"policy": name, "keep": keep, **({"importance": variant} if variant else {})}


def run_lmms(lm, task: str, policy: str, keep, n: int, base: dict | None, out: Path, cache_dir=None) -> dict:
    """One run of lmms-eval task ``task`` through the ``vtprune eval`` runner; the same row fields as :func:`run_one`."""
    from . import lmms

    start = time.perf_counter()
    with lmms.pruned(lm, _policy_args(policy, keep)) as log:
        results, samples = lmms.run(lm, log, [task], limit=n, output_path=out, cache_dir=cache_dir)
    metrics = {k.split(",")[0]: v for k, v in results["results"][task].items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    primary = results["configs"][task]["metric_list"][0]["metric"]
    summary = results["vtprune"]
    kept = summary.get("visual_tokens_after")
    row = dict(policy=policy, keep=keep, kept_tokens=int(kept) if kept is not None and kept == int(kept) else kept,
               accuracy=metrics[primary], metric=primary, metrics=metrics, prefill_ms=summary["prefill_ms"],
               seconds=time.perf_counter() - start)
    predictions = [{"doc_id": s["doc_id"], "prediction": str(s["filtered_resps"][0]).strip().lower()}
                   for s in sorted(samples[task], key=lambda s: s["doc_id"])]
    if base is not None:
        pairs = list(zip(predictions, base["predictions"]))
        row["agreement"] = sum(a["prediction"] == b["prediction"] for a, b in pairs) / max(1, len(pairs))
        row["retained"] = row["accuracy"] / base["accuracy"] if base["accuracy"] else None
    row["predictions"] = predictions
    return row


def _checkpoint(model_ref: str) -> Path:
    return toyvqa.checkpoint_path(model_ref) if model_ref in toyvqa.ARCHS else Path(model_ref)


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
    loaded: dict[tuple[str, str], object] = {}
    from tqdm import tqdm

    for model_ref, task, policy, keep in tqdm(runs, desc="sweep", unit="run"):
        key = (model_ref, task, policy, str(keep), n)
        if key in done:
            continue
        kind = "lmms" if task.startswith(LMMS) else "toyvqa"
        if (model_ref, kind) not in loaded:  # one model in memory at a time
            if kind == "lmms":
                from .lmms import load_model, offline

                offline()
                model_args = ",".join(a for a in (f"pretrained={_checkpoint(model_ref)}", cfg.get("model_args")) if a)
                loaded = {(model_ref, kind): load_model(model_args, device=cfg.get("device", "cpu"))[0]}
            else:
                loaded = {(model_ref, kind): toyvqa.load(model_ref)}
        base = done.get((model_ref, task, "none", "all", n))
        if policy != "none" and base is None:
            raise RuntimeError("the unpruned run of each model comes first in the grid")
        base_view = None if base is None else {"accuracy": base["accuracy"], "predictions": base["predictions"]}
        if kind == "lmms":
            run_dir = out / "lmms" / Path(model_ref).name / task[len(LMMS):] / f"{policy.replace(':', '-')}-{keep}"
            row = run_lmms(loaded[(model_ref, kind)], task[len(LMMS):], policy, keep, n, base_view, run_dir,
                           cfg.get("cache_dir"))
        else:
            model, processor = loaded[(model_ref, kind)]
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

    # one line per policy, and per model and task when the grid has several
    several = len({(r["model"], r["task"]) for r in rows}) > 1
    lines = dict.fromkeys((r["model"], r["task"], r["policy"]) for r in rows if r["policy"] != "none")
    for x_key, label, name in (("kept_tokens", "visual tokens kept per image", "retained_vs_tokens.png"),
                               ("prefill_ms", "prefill ms (toyvqa: batch of 8; lmms: mean, batch 1)", "retained_vs_prefill.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for model, task, policy in lines:
            pts = sorted((r[x_key], r["retained"]) for r in rows
                         if (r["model"], r["task"], r["policy"]) == (model, task, policy) and r.get("retained") is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label=f"{Path(model).name}/{task}/{policy}" if several else policy)
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
