"""`vtprune sweep sweep.yaml`: an ablation grid of models x policies x budgets x tasks.

The whole YAML is checked before the first run (:func:`check_config`: every
problem listed, one a line; duplicates run once). One JSON row per run in
``out/results.jsonl``; a rerun skips rows already there (resumable; a row
cut off half-written, e.g. by a killed job, or a line that is no row, is
dropped with a warning and run again, nothing else is lost). Every model
also gets its unpruned run, and ``random`` and ``pooling`` are added at
every budget (the baselines every comparison needs). Afterwards
``summary.md`` has four tables:

- runs: accuracy, retained (vs the unpruned run of the same model and
  task), agreement (answers equal to the unpruned ones), visual tokens, and
  prefill time with one definition per column: ``prefill ms b1`` is the
  median wall time of one batch-1 prefill over the evaluated items (toyvqa:
  the first 8 items, each timed alone; lmms: every prefill of the
  evaluation, lmms-eval's wrapper at ``batch_size: 1``), ``prefill ms b8`` the
  median of 3 prefills of one batch of 8 toyvqa items (lmms: the evaluation's
  batch-8 prefills when ``batch_size: 8``). Both include the policy's selection.
- retained per task family: OCR apart from the rest, as it is the
  most fragile (toyvqa: per question type, ``reading`` is its OCR).
- the papers' reported retention (model_zoo.yaml, for the checkpoint the
  loaded config matches) beside ours, averaged over the sweep's tasks.
- selection stability (``stability: N``): Jaccard of kept sets under noise,
  a 1-pixel shift and JPEG-90 on N toyvqa items (:mod:`vtprune.eval.stability`).

and two PNG plots, one panel per (model, task): accuracy retained vs
visual tokens kept (with the papers' points where model_zoo.yaml has them)
and vs prefill time (batch 1), the unpruned run as a star.

Tasks:

- ``toyvqa``: the offline scorer (:func:`vtprune.toyvqa.score`, batch 16)
  on the first ``n`` test items.
- ``lmms:NAME``: lmms-eval task NAME run through ``vtprune eval`` (lmms-eval's
  own wrapper for the model's family, first ``n`` items, all when ``n`` is
  null; ``lmms:toyvqa`` is the same toyvqa items as an lmms-eval task). Accuracy
  is the task's first metric. Each run also leaves lmms-eval's results,
  samples and the vtprune report in ``out/lmms/MODEL/TASK/POLICY-KEEP/``.

Models are toyvqa arch names (the shipped checkpoints), checkpoint folders
or hub ids (downloaded unless ``offline: true``). Example ``sweep.yaml``
(shipped grids for the papers' protocols: ``eval/configs/``)::

    out: runs/sweep
    models: [llava]
    policies: [divprune, mmtok, "idpruner:prompt", fastv]
    budgets: [64, 32]
    tasks: [toyvqa, "lmms:toyvqa"]
    n: 200
    stability: 8                      # optional: Jaccard column on 8 toyvqa items
    timed_items: 8                    # optional: toyvqa items timed at batch 1, and the size of the timed batch
    model_args: ""                    # optional, more lmms-eval wrapper args (dtype=bfloat16,...)
    batch_size: 1                     # optional, lmms-eval's batch size (it moves lmms-eval scores)
    device: cpu                       # optional, for lmms tasks
    offline: false                    # optional: true sets HF_*_OFFLINE=1 (default: the environment)

``--backend ray`` runs the grid on a Ray cluster (``ray.init(address=...)``
from ``--ray-address``, default: a local instance): the unpruned runs first,
then every other run as one Ray task (one GPU each when ``device`` is cuda,
``ray_gpus_per_run`` to change it), each worker loading the model it needs;
the driver writes every row into the same resumable JSONL.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

from .. import api, toyvqa
from ..checks import BadValue
from ..measure import time_prefill
from ..policies.base import policy_spec
from .sweep_config import LMMS, SETTINGS, TIMED_ITEMS, SweepConfig, SweepConfigError, check_config  # noqa: F401

BASELINES = ("random", "pooling")
PERTURBATIONS = ("noise", "shift", "jpeg")

#: lmms-eval task name prefix -> task family (OCR reported on its own).
FAMILIES = {
    "textvqa": "ocr",
    "docvqa": "ocr",
    "chartqa": "ocr",
    "ocrbench": "ocr",
    "infovqa": "ocr",
    "ocrvqa": "ocr",
    "pope": "hallucination",
    "mme": "perception",
    "mmbench": "multiple-choice",
    "scienceqa": "multiple-choice",
    "seedbench": "multiple-choice",
    "mmmu": "multiple-choice",
    "ai2d": "multiple-choice",
    "mmstar": "multiple-choice",
    "realworldqa": "multiple-choice",
    "gqa": "open vqa",
    "vqav2": "open vqa",
    "vizwiz": "open vqa",
    "ok_vqa": "open vqa",
}
TOY_TYPES = ("color", "exist", "count", "position", "reading")


def family_of(task: str) -> str:
    """The task family of an lmms-eval task name (``other`` when unknown)."""
    name = task[len(LMMS) :] if task.startswith(LMMS) else task
    for prefix, family in FAMILIES.items():
        if name.startswith(prefix):
            return family
    return "other"


ROW_KEYS = ("model", "task", "policy", "keep", "n")  # what identifies a row (a run of the grid)


def _key(row: dict) -> tuple:
    return (row["model"], row["task"], row["policy"], str(row["keep"]), row["n"])


def _grid(cfg: SweepConfig) -> list[tuple[str, str, str, object]]:
    policies = list(dict.fromkeys([*BASELINES, *cfg.policies]))  # a listed baseline runs once
    runs: list[tuple[str, str, str, object]] = []
    for model in cfg.models:
        for task in cfg.tasks:
            runs.append((model, task, "none", "all"))
            runs += [(model, task, p, k) for p in policies for k in cfg.budgets]
    return runs


def read_results(path: Path, keys: tuple[str, ...] = ()) -> list[dict]:
    """The rows of a results file; lines that are no row are dropped with a warning.

    A row is a JSON object with every one of ``keys`` (the sweep: ``ROW_KEYS``);
    a row cut off by a killed run, ``null``, ``{}``, a list or a number is not.
    The file is rewritten without them (atomically), so those runs are redone
    and every complete row is kept.
    """
    if not path.exists():
        return []
    rows, bad = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        if not isinstance(row, dict) or not all(k in row for k in keys):  # null, a list, a number, {} for the sweep
            bad.append(number)
            continue
        if isinstance(row.get("prefill_ms"), (int, float)):  # rows written before the per-batch columns
            row["prefill_ms_old_definition"] = row.pop("prefill_ms")
        rows.append(row)
    if bad:
        warnings.warn(
            f"{path}: line(s) {bad} are not complete JSON rows (a run cut off while writing, or a line "
            f"that is not a row: a JSON object with {', '.join(keys) or 'fields'}); dropped, their "
            "runs are redone",
            stacklevel=2,
        )
        staging = path.with_suffix(".jsonl.tmp")
        staging.write_text("".join(json.dumps(r) + "\n" for r in rows))
        staging.replace(path)
    return rows


def _prefill_items(model, processor, size: int = TIMED_ITEMS) -> tuple[list[dict], dict]:
    """The first ``size`` toyvqa test items as ``size`` batch-1 inputs and as one batch."""
    from ..toyvqa.models import IMAGE_SIZE
    from ..toyvqa.questions import make_item
    from ..toyvqa.vocab import prompt

    arch = model.config.model_type
    made = [make_item("test", i, size=IMAGE_SIZE[arch]) for i in range(size)]
    images, texts = [m[1] for m in made], [prompt(arch, m[0].question) for m in made]
    singles = [dict(processor(images=[im], text=[t], return_tensors="pt")) for im, t in zip(images, texts)]
    return singles, dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))


def _time_toyvqa(model, processor, size: int = TIMED_ITEMS) -> dict[str, float]:
    """``{"1": median over 8 items of one batch-1 prefill, "8": median of 3 prefills of a batch of 8}`` (8: ``size``)."""
    singles, batch = _prefill_items(model, processor, size)
    b1 = statistics.median(time_prefill(model, b, repeats=1, warmup=1 if i == 0 else 0)[0] for i, b in enumerate(singles))
    b8, _ = time_prefill(model, batch, repeats=3)
    return {"1": round(b1, 3), str(size): round(b8, 3)}


def _compare(row: dict, base: dict | None) -> None:
    if base is None:
        return
    pairs = list(zip(row["predictions"], base["predictions"]))
    row["agreement"] = sum(a["prediction"] == b["prediction"] for a, b in pairs) / max(1, len(pairs))
    row["retained"] = row["accuracy"] / base["accuracy"] if base["accuracy"] else None
    parts = row.get("per_type") or row.get("metrics") or {}
    base_parts = base.get("per_type") or base.get("metrics") or {}
    row["retained_per_type"] = {
        t: parts[t] / base_parts[t] for t in TOY_TYPES if t in parts and t in base_parts and _finite(parts[t]) and base_parts[t]
    }


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def run_one(
    model, processor, policy: str, keep, n: int, base: dict | None, stability: int = 0, timed_items: int = TIMED_ITEMS
) -> dict:
    """One toyvqa run: accuracy (batch 16), prefill times at batch 1 and 8, optionally selection stability."""
    from ..zoo import checkpoint_for

    name, options = policy_spec(policy)
    start = time.perf_counter()
    row = dict(policy=policy, keep=keep, checkpoint=checkpoint_for(model.config))
    if policy == "none":
        row["prefill_ms"] = _time_toyvqa(model, processor, timed_items)
        res = toyvqa.score(model, processor, n=n, return_predictions=True)
        row.update(kept_tokens=None, visual_tokens=None)
    else:
        with api.pruned(model, name, keep=keep, tokenizer=processor, **options):
            row["prefill_ms"] = _time_toyvqa(model, processor, timed_items)
            image = api.report(model).to_dict()["samples"][0]["images"][0]
            row.update(kept_tokens=list(image["stages"].values())[-1]["after"], visual_tokens=image["tokens"])
            res = toyvqa.score(model, processor, n=n, return_predictions=True)
        if stability:
            from .stability import measure

            stab = measure(model, processor, [policy], keep, n=stability)
            row["stability"] = {
                "n": stability,
                "jaccard": stab["policies"][0]["jaccard"],
                "agreement": stab["policies"][0]["agreement"],
            }
    row.update(
        accuracy=res["overall"],
        per_type=res["per_type"],
        batch_size=16,
        seconds=time.perf_counter() - start,
        predictions=res["predictions"],
    )
    _compare(row, base)
    return row


def _policy_args(policy: str, keep) -> dict:
    """``name:variant`` (IDPruner's importance) as the runner's pruning arguments."""
    name, options = policy_spec(policy)
    if name == "none":
        return {}
    return {"policy": name, "keep": keep, **options}


def run_lmms(
    lm, task: str, policy: str, keep, n: int | None, base: dict | None, out: Path, cache_dir=None, gen_kwargs: str | None = None
) -> dict:
    """One run of lmms-eval task ``task`` through the ``vtprune eval`` runner; the same row fields as :func:`run_one`."""
    from ..zoo import checkpoint_for
    from . import lmms

    start = time.perf_counter()
    with lmms.pruned(lm, _policy_args(policy, keep)) as log:
        results, samples = lmms.run(lm, log, [task], limit=n, output_path=out, cache_dir=cache_dir, gen_kwargs=gen_kwargs)
    metrics = {
        k.split(",")[0]: v
        for k, v in results["results"][task].items()
        if "," in k and "_stderr" not in k and isinstance(v, (int, float))
    }
    primary = results["configs"][task]["metric_list"][0]["metric"]
    summary = results["vtprune"]
    kept = summary.get("visual_tokens_after")
    before = summary.get("visual_tokens_before")
    row = dict(
        policy=policy,
        keep=keep,
        checkpoint=checkpoint_for(lm.model.config),
        kept_tokens=int(kept) if kept is not None and kept == int(kept) else kept,
        visual_tokens=before,
        accuracy=metrics[primary],
        metric=primary,
        metrics=metrics,
        prefill_ms=summary.get("prefill_ms_median_by_batch", {}),
        batch_size=lm.batch_size,
        seconds=time.perf_counter() - start,
    )
    row["predictions"] = [
        {"doc_id": s["doc_id"], "prediction": str(s["filtered_resps"][0]).strip().lower()}
        for s in sorted(samples[task], key=lambda s: s["doc_id"])
    ]
    _compare(row, base)
    return row


def _checkpoint(model_ref: str) -> str:
    return str(toyvqa.checkpoint_path(model_ref)) if model_ref in toyvqa.ARCHS else model_ref


class Runner:
    """Runs grid entries, keeping one model in memory at a time (the local backend, and each Ray worker)."""

    def __init__(self, cfg: SweepConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.loaded: dict[tuple[str, str], object] = {}

    def model(self, model_ref: str, kind: str):
        if (model_ref, kind) not in self.loaded:
            self.loaded = {}  # free the previous model first
            if kind == "lmms":
                from .lmms import load_model

                model_args = ",".join(a for a in (f"pretrained={_checkpoint(model_ref)}", self.cfg.model_args) if a)
                self.loaded[(model_ref, kind)] = load_model(model_args, batch_size=self.cfg.batch_size, device=self.cfg.device)[0]
            else:
                self.loaded[(model_ref, kind)] = toyvqa.load(model_ref)
        return self.loaded[(model_ref, kind)]

    def __call__(self, run: tuple, base: dict | None) -> dict:
        model_ref, task, policy, keep = run
        n = self.cfg.n
        kind = "lmms" if task.startswith(LMMS) else "toyvqa"
        loaded = self.model(model_ref, kind)
        if kind == "lmms":
            run_dir = self.out / "lmms" / Path(model_ref).name / task[len(LMMS) :] / f"{policy.replace(':', '-')}-{keep}"
            row = run_lmms(loaded, task[len(LMMS) :], policy, keep, n, base, run_dir, self.cfg.cache_dir, self.cfg.gen_kwargs)
        else:
            model, processor = loaded
            row = run_one(
                model, processor, policy, keep, n if n is not None else toyvqa_n(), base, self.cfg.stability, self.cfg.timed_items
            )
        row.update(model=model_ref, task=task, n=n)
        return row


def toyvqa_n() -> int:
    from .tasks import TOYVQA_N

    return TOYVQA_N


def _base_view(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {k: row[k] for k in ("accuracy", "predictions", "per_type", "metrics") if k in row}


def _append(results: Path, row: dict) -> None:
    with results.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


def sweep(
    cfg: SweepConfig | dict,
    backend: str = "local",
    ray_address: str | None = None,
    ray_workers: int | None = None,
    source: str = "(given as a dict)",
) -> list[dict]:
    """Run the grid of ``cfg`` (checked whole first: :func:`check_config`), resuming from ``out/results.jsonl``."""
    if not isinstance(cfg, SweepConfig):
        cfg = check_config(cfg, source, backend)
    elif backend not in ("local", "ray"):
        raise BadValue(f"unknown backend {backend!r}; choose local or ray")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.offline:
        from .lmms import offline

        offline()
    results = out / "results.jsonl"
    done = {_key(row): row for row in read_results(results, ROW_KEYS)}
    n = cfg.n
    runs = _grid(cfg)
    todo = [r for r in runs if (r[0], r[1], r[2], str(r[3]), n) not in done]
    if backend == "ray":
        _sweep_ray(cfg, todo, done, results, ray_address, ray_workers)
    elif backend == "local":
        from tqdm import tqdm

        runner = Runner(cfg)
        for run in tqdm(todo, desc="sweep", unit="run"):
            model_ref, task, policy, keep = run
            base = done.get((model_ref, task, "none", "all", n))
            if policy != "none" and base is None:
                raise RuntimeError("the unpruned run of each model comes first in the grid")
            row = runner(run, _base_view(base))
            _append(results, row)
            done[_key(row)] = row
    else:
        raise BadValue(f"unknown backend {backend!r}; choose local or ray")
    rows = [done[(m, t, p, str(k), n)] for m, t, p, k in runs]
    write_summary(rows, out)
    return rows


def _sweep_ray(
    cfg: SweepConfig, todo: list[tuple], done: dict, results: Path, address: str | None, workers: int | None = None
) -> None:
    """The grid on a Ray cluster: unpruned runs first (their answers are the reference), then the rest."""
    if not todo:
        return
    try:
        import ray
    except ImportError:
        raise SystemExit("vtprune sweep --backend ray needs Ray: pip install 'vtprune[ray]'") from None
    from tqdm import tqdm

    started = not ray.is_initialized()
    if started:
        # workers import this very vtprune (a source checkout may shadow an installed copy)
        import os

        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        ray.init(
            address=address,
            num_cpus=workers if address is None else None,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
    # one GPU per run on a GPU cluster (each run holds its whole model), none for CPU runs
    gpus = cfg.gpus_per_run
    remote = ray.remote(num_gpus=gpus, num_cpus=1)(_ray_run)
    n = cfg.n
    try:
        for phase in ([r for r in todo if r[2] == "none"], [r for r in todo if r[2] != "none"]):
            pending = {}
            for run in phase:
                base = None if run[2] == "none" else _base_view(done[(run[0], run[1], "none", "all", n)])
                pending[remote.remote(cfg, run, base)] = run
            with tqdm(total=len(pending), desc="sweep (ray)", unit="run") as bar:
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    pending.pop(ready[0])
                    row = ray.get(ready[0])
                    _append(results, row)
                    done[_key(row)] = row
                    bar.update()
    finally:
        if started:
            ray.shutdown()


_WORKER_RUNNER: Runner | None = None


def _ray_run(cfg: SweepConfig, run: tuple, base: dict | None) -> dict:
    """One grid entry in a Ray worker; the worker keeps its last model loaded for the next task."""
    global _WORKER_RUNNER
    torch.set_num_threads(cfg.threads)
    if _WORKER_RUNNER is None or _WORKER_RUNNER.cfg != cfg:
        _WORKER_RUNNER = Runner(cfg)
    return _WORKER_RUNNER(run, base)


# ---------------------------------------------------------------- summary


def _pct(value) -> str:
    return f"{value:.1%}" if value is not None else "-"


def paper_point(checkpoint: str | None, policy: str, keep) -> tuple[float, str] | None:
    """The papers' reported retention (fraction) and its source for a zoo checkpoint, policy and budget."""
    if checkpoint is None:
        return None
    from ..zoo import zoo

    entry = zoo().get("checkpoints", {}).get(checkpoint, {}).get("paper_results", {}).get(policy_spec(policy)[0])
    retained = (entry or {}).get("retained")
    if not isinstance(retained, dict):
        return None
    for budget, value in retained.items():
        if (
            isinstance(keep, (int, float))
            and math.isclose(float(budget), float(keep))
            and isinstance(budget, int) == isinstance(keep, int)
        ):
            return value / 100.0, entry.get("source", "")
    return None


def _families(row: dict) -> dict[str, float]:
    """Retained per task family for one row: the task's family, or toyvqa's question types (reading = OCR)."""
    if row.get("retained") is None:
        return {}
    name = row["task"][len(LMMS) :] if row["task"].startswith(LMMS) else row["task"]
    if name == "toyvqa":
        return {("ocr (toy reading)" if t == "reading" else f"toy {t}"): v for t, v in row.get("retained_per_type", {}).items()}
    return {family_of(name): row["retained"]}


def _prefill_columns(rows: list[dict]) -> list[str]:
    return sorted({b for r in rows for b in r.get("prefill_ms", {})}, key=int)


def write_summary(rows: list[dict], out: Path) -> None:
    batches = _prefill_columns(rows)
    stability = any("stability" in r for r in rows)
    head = ["model", "task", "policy", "keep", "kept", "accuracy", "retained", "agreement"]
    head += [f"prefill ms b{b}" for b in batches]
    head += ["Jaccard noise/shift/jpeg"] if stability else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            Path(r["model"]).name,
            r["task"],
            r["policy"],
            str(r["keep"]),
            str(r["kept_tokens"] or "all"),
            f"{r['accuracy']:.3f}",
            _pct(r.get("retained")),
            _pct(r.get("agreement")),
        ]
        cells += [f"{r['prefill_ms'][b]:.1f}" if b in r.get("prefill_ms", {}) else "-" for b in batches]
        if stability:
            j = r.get("stability", {}).get("jaccard")
            cells.append("/".join(f"{j[k]:.2f}" for k in PERTURBATIONS) if j else "-")
        lines.append("| " + " | ".join(cells) + " |")
    text = [
        "# Sweep summary",
        "",
        "prefill ms bB: median wall time of one prefill of B items (policy selection included); "
        "b1 over the evaluated items (toyvqa: the first 8), toyvqa b8: one batch of 8, 3 repeats. "
        "Accuracy: toyvqa scorer at batch 16" + (f"; lmms-eval at batch {_lmms_batch(rows)}" if _lmms_batch(rows) else "") + ".",
        "",
        *lines,
    ]
    text += ["", "## Accuracy retained per task family (OCR apart)", "", *_family_table(rows)]
    text += ["", "## Beside the papers (model_zoo.yaml)", "", *_paper_table(rows)]
    (out / "summary.md").write_text("\n".join(text) + "\n")
    _plots(rows, out)


def _lmms_batch(rows: list[dict]) -> str:
    sizes = sorted({r["batch_size"] for r in rows if r["task"].startswith(LMMS) and "batch_size" in r})
    return ", ".join(map(str, sizes))


def _family_table(rows: list[dict]) -> list[str]:
    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        for family, value in _families(r).items():
            groups.setdefault((r["model"], r["policy"], str(r["keep"])), {}).setdefault(family, []).append(value)
    families = sorted({f for g in groups.values() for f in g}, key=lambda f: (f.startswith("ocr"), f))
    if not families:
        return ["(no pruned runs)"]
    lines = ["| model | policy | keep | " + " | ".join(families) + " |", "|" + "---|" * (3 + len(families))]
    for (model, policy, keep), fam in groups.items():
        cells = [_pct(statistics.fmean(fam[f])) if f in fam else "-" for f in families]
        lines.append(f"| {Path(model).name} | {policy} | {keep} | " + " | ".join(cells) + " |")
    return lines


def _paper_table(rows: list[dict]) -> list[str]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("retained") is not None:
            groups.setdefault((r["model"], r.get("checkpoint"), r["policy"], r["keep"]), []).append(r)
    lines = [
        "| model | zoo checkpoint | policy | keep | ours: mean retained (tasks) | paper | paper's source |",
        "|" + "---|" * 7,
    ]
    for (model, checkpoint, policy, keep), group in groups.items():
        paper = paper_point(checkpoint, policy, keep)
        ours = statistics.fmean(r["retained"] for r in group)
        tasks = ", ".join(r["task"] for r in group)
        lines.append(
            f"| {Path(model).name} | {checkpoint or '-'} | {policy} | {keep} | {ours:.1%} ({tasks}) | "
            f"{_pct(paper[0]) if paper else '-'} | {paper[1] if paper else 'none in model_zoo.yaml'} |"
        )
    return lines


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")
LINESTYLES = ("-", "--", "-.", ":")


def _plots(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["model"], r["task"]) for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows if r["policy"] != "none"))
    colors = plt.get_cmap("tab10")
    style = {
        p: dict(
            color=colors(i % 10),
            marker=MARKERS[i % len(MARKERS)],
            linestyle=LINESTYLES[i % len(LINESTYLES)],
            markersize=9 - 4 * (i % 2) + 1,
            markerfacecolor="none" if i % 2 else colors(i % 10),
        )
        for i, p in enumerate(policies)
    }
    first = next((b for b in ("1", "8") if any(b in r.get("prefill_ms", {}) for r in rows)), None)
    for x_name, label, fname in (
        ("tokens", "visual tokens kept per image", "retained_vs_tokens.png"),
        ("prefill", f"prefill ms (batch {first}, median; selection included)", "retained_vs_prefill.png"),
    ):
        cols = min(len(panels), 2)
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.6 * nrows), squeeze=False)
        for ax, (model, task) in zip(axes.flat, panels):
            mine = [r for r in rows if (r["model"], r["task"]) == (model, task)]
            base = next((r for r in mine if r["policy"] == "none"), None)
            full = max((r.get("visual_tokens") or 0 for r in mine), default=0) or None

            def x_of(r, x_name=x_name, full=full):
                if x_name == "tokens":
                    return full if r["policy"] == "none" else r.get("kept_tokens")
                return r.get("prefill_ms", {}).get(first)

            for policy in policies:
                # joined in budget order (not x order: prefill times need not fall with the budget)
                pts = [
                    (x_of(r), r["retained"])
                    for r in sorted(
                        (r for r in mine if r["policy"] == policy and r.get("retained") is not None and x_of(r) is not None),
                        key=lambda r: r.get("kept_tokens") or 0,
                    )
                ]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=policy, alpha=0.85, **style[policy])
                if x_name == "tokens":  # the papers' points for this checkpoint
                    paper = [
                        (r.get("kept_tokens"), paper_point(r.get("checkpoint"), policy, r["keep"]))
                        for r in mine
                        if r["policy"] == policy
                    ]
                    paper_xy = sorted((x, p[0]) for x, p in paper if p and x is not None)
                    if paper_xy:
                        ax.plot(
                            [p[0] for p in paper_xy],
                            [p[1] for p in paper_xy],
                            linestyle="none",
                            markersize=13,
                            marker=style[policy]["marker"],
                            color=style[policy]["color"],
                            markerfacecolor="none",
                            markeredgewidth=2,
                            label=f"{policy}, paper",
                        )
            if base is not None and x_of(base) is not None:
                ax.plot(
                    [x_of(base)],
                    [1.0],
                    marker="*",
                    markersize=16,
                    color="black",
                    linestyle="none",
                    label=f"unpruned (acc {base['accuracy']:.3f})",
                )
            ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
            checkpoint = next((r.get("checkpoint") for r in mine if r.get("checkpoint")), None)
            ax.set_title(f"{Path(model).name}" + (f" ({checkpoint})" if checkpoint else "") + f" - {task}", fontsize=10)
            ax.set_xlabel(label)
            ax.set_ylabel("accuracy retained (vs unpruned)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="lower right", ncol=2 if len(policies) > 6 else 1)
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        fig.suptitle("accuracy retained vs " + ("visual tokens kept" if x_name == "tokens" else "prefill time"))
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vtprune sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="sweep YAML")
    parser.add_argument("--threads", type=int, help="torch threads (per Ray worker with --backend ray)")
    parser.add_argument(
        "--backend", choices=("local", "ray"), default="local", help="local (default): one process; ray: one Ray task per run"
    )
    parser.add_argument("--ray-address", help="Ray cluster address (default: start a local instance)")
    parser.add_argument("--ray-workers", type=int, help="CPUs (= concurrent runs) of the local Ray instance")
    parser.add_argument("--offline", action="store_true", help="no downloads (sets HF_*_OFFLINE=1)")
    args = parser.parse_args(argv)
    try:
        cfg = yaml.safe_load(Path(args.config).read_text())
    except (OSError, yaml.YAMLError) as exc:
        print(f"vtprune sweep: cannot read {args.config}: {exc}", file=sys.stderr)
        return 2
    if isinstance(cfg, dict):  # the command line's settings are checked with the file's
        if args.offline:
            cfg["offline"] = True
        if args.threads is not None:
            cfg["threads"] = args.threads
    cfg = check_config(cfg, args.config, args.backend)  # every problem at once, before the first run
    if args.ray_workers is not None and args.ray_workers < 1:
        raise SweepConfigError(args.config, [f"--ray-workers must be >= 1; got {args.ray_workers}"])
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = sweep(cfg, backend=args.backend, ray_address=args.ray_address, ray_workers=args.ray_workers, source=args.config)
    out = Path(cfg.out)
    print((out / "summary.md").read_text())
    print(f"{len(rows)} runs; results, summary and plots in {out}")
    return 0


def validate(keep):
    from ..budget import validate_keep

    return validate_keep(keep)
