"""Copy a trained run's best model into the package (``vtprune/toyvqa/checkpoints/ARCH``).

The shipped folder holds the ``save_pretrained`` model (safetensors), the
processor files, the run's training log (and those of the runs it was
initialised from, ``training_log.initN.jsonl``) and a ``metrics.json`` with
the test accuracy per question type. A run replaces the shipped model only if it
scores higher on the test slice (or with ``force``).
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from pathlib import Path


def training_seconds(log: Path, up_to_step: int | None = None) -> float:
    """Wall time spent training, from the log's timestamps (restart gaps left out),
    counting records up to ``up_to_step`` when given."""
    times = []
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if "time" in record and (up_to_step is None or record.get("step", 0) <= up_to_step):
            times.append(record["time"])
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return float(sum(g for g in gaps if 0 < g < 300))


def lineage(run: Path) -> list[tuple[Path, int | None]]:
    """The runs that trained ``run/best``: ``run`` itself, then the run whose
    ``best/`` it was started from with ``--init`` (and so on), each with the
    step its contribution ends at (None for ``run``: all of it)."""
    chain: list[tuple[Path, int | None]] = [(run, None)]
    while True:
        args = chain[-1][0] / "args.json"
        init = json.loads(args.read_text()).get("init", "None") if args.is_file() else "None"
        parent = Path(init).parent
        if init == "None" or Path(init).name != "best" or not (parent / "log.jsonl").is_file():
            return chain
        val = Path(init) / "val.json"
        chain.append((parent, json.loads(val.read_text()).get("step") if val.is_file() else None))


def ship(run: str | Path, n: int = 500, force: bool = False) -> dict:
    """Score ``RUN/best`` on ``n`` test items and ship it if it beats the shipped model."""
    from vtprune.toyvqa import checkpoint_path, load, score
    from vtprune.toyvqa.models import arch_of, save_processor

    run = Path(run)
    best = run / "best"
    arch = arch_of(best)
    model, processor = load(best)
    result = score(model, processor, n=n, split="test")
    dest = checkpoint_path(arch)
    shipped = dest / "metrics.json"
    if shipped.is_file() and not force:
        old = json.loads(shipped.read_text())
        if old["test"]["overall"] >= result["overall"]:
            return {
                "shipped": False,
                "reason": f"shipped model scores {old['test']['overall']} >= {result['overall']}",
                "test": result,
            }
    val = json.loads((best / "val.json").read_text()) if (best / "val.json").is_file() else {}
    chain = lineage(run)
    n_params = sum(p.numel() for p in model.parameters())
    metrics = {
        "arch": arch,
        "test": result,
        "validation": val,
        "step": val.get("step"),
        "parameters": n_params,
        "training_seconds": round(sum(training_seconds(r / "log.jsonl", upto) for r, upto in chain)),
        "train_args": json.loads((run / "args.json").read_text()) if (run / "args.json").is_file() else {},
    }
    if len(chain) > 1:
        metrics["initialised_from"] = [
            {"run": r.name, "step": upto, "train_args": json.loads((r / "args.json").read_text())} for r, upto in chain[1:]
        ]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        staged = Path(tmp) / arch
        model.save_pretrained(staged)
        save_processor(processor, staged)
        shutil.copy(run / "log.jsonl", staged / "training_log.jsonl")
        for depth, (r, _) in enumerate(chain[1:], start=1):
            shutil.copy(r / "log.jsonl", staged / f"training_log.init{depth}.jsonl")
        (staged / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        for f in staged.iterdir():
            f.chmod(0o644)
        shutil.move(str(staged), dest)
    size = sum(f.stat().st_size for f in dest.iterdir())
    return {"shipped": True, "path": str(dest), "bytes": size, "test": result}
