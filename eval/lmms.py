"""`vtprune eval`: lmms-eval 0.7.3 in-process on a model pruned by vtprune.

    vtprune eval --model_args pretrained=PATH,policy=idpruner,keep=64 --tasks toyvqa --limit 100

The checkpoint's family (``config.model_type``) picks lmms-eval's own HF
wrapper: ``llava_hf`` for LLaVA-1.5 and LLaVA-NeXT, ``qwen2_vl``,
``qwen2_5_vl``. That wrapper loads the model as lmms-eval always does; its HF
model is then wrapped by :func:`vtprune.wrap` and the wrapper instance is
handed to lmms-eval's evaluator. ``--model_args`` carries both: the wrapper's
own arguments (``pretrained``, ``dtype``, ``attn_implementation``,
``device_map``, ...), and ``policy``, ``keep``, ``positions`` plus any other
key, which goes to the policy (``importance=norm``, ``at_layer=2``, ...).
Without ``policy`` (or with ``policy=none``) the model runs unpruned.

Written to ``--output_path``: ``results.json`` (lmms-eval's results, plus a
``vtprune`` summary), ``samples_TASK.jsonl`` (every item's response) and
``vtprune_report.json`` (each prefill's time and, per image and stage, the
visual tokens before and after pruning).

lmms-eval logs failures and carries on (its own CLI then exits 0); this
runner exits 1 when the evaluator raises, when lmms-eval logged an error
(e.g. a failed ``generate``, which lmms-eval answers with an empty string),
or when a task has no samples or no finite metric.

Network: the runner leaves the user's environment alone, so on a networked
machine ``pretrained=llava-hf/llava-1.5-7b-hf`` downloads the checkpoint and
lmms-eval's tasks download their data. ``--offline`` sets ``HF_HUB_OFFLINE``,
``HF_DATASETS_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` to 1 (then ``pretrained``
must be a local folder or already cached); variables the user set are kept
either way. Local tasks (``toyvqa``): their data is exported into ``--cache_dir``
and reused only while its content hashes match the export's manifest (else
exported again); their task YAML is written for each run into a private
temporary folder, so no file in the cache is ever imported by lmms-eval.

Several GPUs, data parallel as lmms-eval does (one process per GPU, each
with the whole model; lmms-eval shards the documents by rank and gathers the
results, the vtprune report is gathered on rank 0, each prefill tagged with
its rank)::

    accelerate launch --num_processes 8 -m vtprune.cli eval --model_args ... --tasks ...

On CPUs the same path runs over gloo, tested with 2 processes (accelerate's
``--cpu`` flag starts a single process unless MPI is set up; its
torch.distributed launcher with ``ACCELERATE_USE_CPU`` gives one per rank)::

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m vtprune.cli eval ... --device cpu

``--model vtprune`` in lmms-eval's own CLI is the same model
(:mod:`vtprune.eval.lmms_plugin`), without the checks and the report.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .. import api
from ..checks import BadType, BadValue
from ..measure import synchronize
from ..patches import ADAPTERS
from ..policies.base import make_policy

#: lmms-eval's HF wrapper for each supported ``config.model_type``.
FAMILIES = {t: adapter.lmms_model for t, adapter in ADAPTERS.items()}
PRUNE_KEYS = ("policy", "keep", "positions")
INSTALL_HINT = (
    "lmms-eval is not installed; install it without its dependencies (they would replace torch), "
    "from the vtprune clone:\n  pip install '.[eval]' && pip install --no-deps lmms-eval==0.7.3"
)
#: What lmms-eval's wrapper of each name (``FAMILIES``' values) needs beyond the ``[eval]`` extra, as each adapter
#: declares it (``lmms_needs``: its Qwen wrappers all go through qwen_vl_utils, which imports torchvision).
WRAPPER_NEEDS = {adapter.lmms_model: adapter.lmms_needs for adapter in ADAPTERS.values() if adapter.lmms_needs}


class EvalFailed(RuntimeError):
    """The evaluation ran but did not produce trustworthy results."""


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline() -> None:
    """Hub and dataset downloads off (``--offline``); a variable the user already set keeps its value.

    Called only when asked: without it the runner respects the environment as
    it is, so a networked machine downloads checkpoints and task data.
    """
    for name in OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")


def parse_model_args(model_args: str | dict) -> dict:
    """``key=value,...`` as lmms-eval parses it (numbers and booleans converted)."""
    if isinstance(model_args, dict):
        return dict(model_args)
    from lmms_eval.utils import simple_parse_args_string

    return simple_parse_args_string(model_args)


def _wrapper_class(model_type: str, force_simple: bool, require_imports: bool = True):
    """lmms-eval's wrapper class for ``model_type``; with ``require_imports``, a clear error first when the
    packages it needs to run (not to import: lmms-eval imports them optionally) are missing."""
    if model_type not in FAMILIES:
        raise BadValue(f"model_type {model_type!r} has no lmms-eval runner here; supported: {', '.join(FAMILIES)}")
    needs = WRAPPER_NEEDS.get(FAMILIES[model_type], ()) if require_imports else ()
    missing = [name for name in needs if not _importable(name)]
    if missing:
        from vtprune.doctor import torchvision_advice, torchvision_problem

        problem = torchvision_problem() if "torchvision" in missing else None
        raise ImportError(
            f"lmms-eval's {FAMILIES[model_type]} wrapper (model_type {model_type!r}) needs {', '.join(missing)}, "
            "which cannot be imported here. "
            + (
                problem
                if problem
                else "Install qwen-vl-utils (pip install qwen-vl-utils) and a torchvision that matches your torch. "
                + torchvision_advice()
            )
            + " LLaVA families need neither."
        )
    from lmms_eval.models import get_model

    return get_model(FAMILIES[model_type], force_simple=force_simple)


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # torchvision beside a mismatched torch raises RuntimeError, not ImportError
        return False
    return True


def load_model(model_args: str | dict, *, batch_size: int = 1, device: str = "cpu", force_simple: bool = False):
    """lmms-eval's own wrapper for the checkpoint's family, and the pruning arguments split off ``model_args``.

    Returns ``(lm, prune)`` where ``prune`` holds ``policy``, ``keep``,
    ``positions`` and the policy's options (every key the wrapper does not take).
    """
    args = parse_model_args(model_args)
    if "pretrained" not in args:
        raise BadValue(f"model_args needs pretrained=PATH (a checkpoint folder or hub id); got {sorted(args)}")
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(str(args["pretrained"])).model_type
    cls = _wrapper_class(model_type, force_simple)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    prune = {k: args.pop(k) for k in list(args) if k in PRUNE_KEYS or k not in accepted}
    _check_policy(prune, f"lmms-eval's {cls.__name__} takes {sorted(accepted)}")
    args = {"batch_size": batch_size, "device": device, **args}
    if (
        "device_map" in accepted
        and "device_map" not in args
        and (int(os.environ.get("WORLD_SIZE", "1")) == 1 or str(device) == "cpu")
    ):
        # llava_hf's default device_map="" is refused by transformers 5.x; under several GPU
        # processes it must stay "" (the wrapper then places each rank on its own GPU). CPU
        # processes (accelerate launch --cpu, gloo) each hold the whole model on the CPU; the
        # evaluator shards the documents by rank either way.
        args["device_map"] = device
    return cls(**args), prune


def _check_policy(prune: dict, wrapper_args: str) -> None:
    """Argument errors before the model loads (the policy object is built again, bound, by ``wrap``)."""
    policy, keep, options = split_policy(prune)
    if policy == "none":
        return
    try:
        make_policy(policy, **({"keep": keep} if keep is not None else {}), **options)
    except TypeError:  # an unknown option: perhaps a misspelt argument of the wrapper
        unknown = sorted(set(options) - set(policy_options(policy)))
        raise BadType(
            f"policy {policy!r} has no option {', '.join(unknown) or sorted(options)}; its options: "
            f"{', '.join(policy_options(policy))}. Keys of model_args go to the policy unless "
            f"{wrapper_args}"
        ) from None


def policy_options(policy: str) -> list[str]:
    """The options a registry policy takes (its dataclass init fields; class-level constants excluded)."""
    import dataclasses

    from ..policies.base import _REGISTRY

    return sorted(f.name for f in dataclasses.fields(_REGISTRY[policy]) if f.init and f.name != "keep")


def processor_of(lm):
    """The HF processor lmms-eval's wrapper feeds the model with (the tokenizer if it has none)."""
    for name in ("processor", "_image_processor"):
        if getattr(lm, name, None) is not None:
            return getattr(lm, name)
    return lm.tokenizer


def describe(prune: dict) -> str:
    """``policy`` with its budget and options, e.g. ``idpruner keep=64 importance=norm`` (``none`` if unpruned)."""
    policy = prune.get("policy", "none")
    return " ".join([str(policy)] + [f"{k}={v}" for k, v in prune.items() if k != "policy"]) if policy != "none" else "none"


def split_policy(prune: dict) -> tuple[str, int | float | None, dict]:
    """``(policy, keep, options)`` from the pruning arguments; ``policy`` is ``none`` when absent."""
    options = dict(prune)
    policy = options.pop("policy", "none")
    keep = options.pop("keep", None)
    if policy == "none" and (options or keep is not None):
        raise BadValue(f"model_args {sorted(prune)} need a policy (policy=NAME); without one the model runs unpruned")
    return policy, keep, options


@contextlib.contextmanager
def pruned(lm, prune: dict) -> Iterator[PrefillLog]:
    """``lm``'s HF model pruned as ``prune`` says (unpruned for ``policy=none``), with a :class:`PrefillLog` attached."""
    policy, keep, options = split_policy(prune)
    model = lm.model
    scope: contextlib.AbstractContextManager[Any]
    if policy == "none":
        scope = contextlib.nullcontext(model)
    else:
        scope = api.pruned(model, policy, keep, tokenizer=processor_of(lm), **options)
    with scope:
        log = PrefillLog(model, describe(prune))
        try:
            yield log
        finally:
            log.close()


class PrefillLog:
    """Each prefill of a model while lmms-eval runs it: wall time and vtprune's report (visual tokens per stage).

    A forward with more than one new token is a prefill (lmms-eval's HF
    wrappers decode one token per step); decode steps are not recorded. Each
    record holds the wall ms and the batch size of that prefill.
    """

    def __init__(self, model: torch.nn.Module, policy: str) -> None:
        self.model, self.policy = model, policy
        self.records: list[dict] = []
        self._start: float | None = None
        self._batch = 1
        self._hooks = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _before(self, module, args, kwargs) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is not None and tokens.shape[1] > 1:
            self._batch = int(tokens.shape[0])
            synchronize()
            self._start = time.perf_counter()

    def _after(self, module, args, kwargs, output) -> None:
        if self._start is None:
            return
        synchronize()
        record: dict[str, Any] = {"ms": round((time.perf_counter() - self._start) * 1000.0, 3), "batch": self._batch}
        self._start = None
        if api.is_wrapped(self.model):
            samples = api.report(self.model).to_dict()["samples"]
            record["images"] = [
                {name: {k: st[k] for k in ("before", "after", "ms")} for name, st in image["stages"].items()}
                for sample in samples
                for image in sample["images"]
            ]
        self.records.append(record)

    def gathered(self) -> list[dict]:
        """Every rank's records, each tagged with its ``rank`` (on a single process, this one's)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return [{**r, "rank": 0} for r in self.records]
        parts: list[list[dict]] = [[] for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(parts, self.records)
        return [{**r, "rank": rank} for rank, part in enumerate(parts) for r in part]

    def summary(self, records: list[dict] | None = None) -> dict:
        """Means over prefills and images: visual tokens before/after (first and last stage), per stage, times."""
        records = self.gathered() if records is None else records
        out: dict = {"policy": self.policy, "prefills": len(records)}
        if records:
            out["prefill_ms"] = round(statistics.fmean(r["ms"] for r in records), 3)
            # the median per batch size: what the sweep's "prefill ms, batch B" columns show
            sizes = sorted({r.get("batch", 1) for r in records})
            out["prefill_ms_median_by_batch"] = {
                str(b): round(statistics.median(r["ms"] for r in records if r.get("batch", 1) == b), 3) for b in sizes
            }
        images = [image for r in records for image in r.get("images", [])]
        if images:
            out["images"] = len(images)
            stages: dict[str, dict[str, list]] = {}
            for image in images:
                for name, st in image.items():
                    for key in ("before", "after", "ms"):
                        stages.setdefault(name, {}).setdefault(key, []).append(st[key])
            out["stages"] = {name: {k: round(statistics.fmean(v), 3) for k, v in vals.items()} for name, vals in stages.items()}
            staged = [list(image.values()) for image in images if image]
            if staged:
                out["visual_tokens_before"] = round(statistics.fmean(s[0]["before"] for s in staged), 3)
                out["visual_tokens_after"] = round(statistics.fmean(s[-1]["after"] for s in staged), 3)
        return out


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _check(results: dict | None, tasks: list[str], errors: list[str]) -> None:
    if errors:
        shown = "\n  ".join(errors[:5])
        raise EvalFailed(f"lmms-eval logged {len(errors)} error(s) during the evaluation:\n  {shown}")
    if results is None:
        raise EvalFailed("lmms-eval returned no results")
    scores = results.get("results", {})
    for task in tasks:
        if task not in scores and task not in results.get("groups", {}):
            raise EvalFailed(f"task {task!r} is missing from the results (got {sorted(scores)})")
    for task, n in results.get("n-samples", {}).items():
        if not n.get("effective"):
            raise EvalFailed(f"task {task!r} evaluated no samples")
    for task, metrics in scores.items():
        values = [v for k, v in metrics.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
        if not any(math.isfinite(v) for v in values):
            raise EvalFailed(f"task {task!r} has no finite metric: {metrics}")


def run(
    lm,
    log: PrefillLog,
    tasks: list[str],
    *,
    limit: float | None = None,
    output_path: str | Path | None = None,
    gen_kwargs: str | None = None,
    include_path: list[str] | None = None,
    cache_dir: str | Path | None = None,
    verbosity: str = "WARNING",
) -> tuple[dict, dict]:
    """Evaluate ``lm`` (lmms-eval model instance, possibly pruned) on ``tasks``; check and write the results.

    Returns ``(results, samples)``: lmms-eval's results dict with a
    ``vtprune`` summary added, and the per-item samples per task. Raises
    :class:`EvalFailed` when the evaluation did not really succeed.
    """
    from .tasks import TOYVQA_N, prepare

    n_local = int(limit) if limit is not None and limit >= 1 else TOYVQA_N
    size = _toyvqa_image_size(lm.model.config)
    # the local tasks' YAML in a private folder of this run (the shared cache holds only verified data)
    with tempfile.TemporaryDirectory(prefix="vtprune-tasks-") as own:
        include = prepare(tasks, n=n_local, image_size=size, cache_dir=cache_dir, include_dir=own)
        return _evaluate(lm, log, tasks, include + list(include_path or []), limit, output_path, gen_kwargs, verbosity)


def _evaluate(
    lm, log: PrefillLog, tasks: list[str], include: list[str], limit, output_path, gen_kwargs, verbosity: str
) -> tuple[dict, dict]:
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager
    from loguru import logger

    # lmms-eval's index of its own tasks takes seconds to build: only when a task is not found without it.
    task_manager = TaskManager(verbosity, include_path=include or None, include_defaults=False)
    if not all(t in task_manager.all_tasks for t in tasks):
        task_manager = TaskManager(verbosity, include_path=include or None)
    errors: list[str] = []
    sink = logger.add(lambda message: errors.append(message.record["message"]), level="ERROR")
    # evaluate() ends with lm.clean(), which deletes the wrapper's modules; put them back so that
    # one loaded model serves several runs (the sweep). The pruning context holds them anyway.
    modules = {k: v for k, v in vars(lm).items() if isinstance(v, torch.nn.Module)}
    try:
        results = evaluator.simple_evaluate(
            model=lm,
            tasks=tasks,
            limit=limit,
            batch_size=lm.batch_size,
            log_samples=True,
            bootstrap_iters=0,
            gen_kwargs=gen_kwargs,
            task_manager=task_manager,
            verbosity=verbosity,
            process_docs_parallel=1,
        )
    except Exception as exc:
        cause = _cause(exc)
        raise EvalFailed(f"lmms-eval raised {type(cause).__name__}: {cause}") from exc
    finally:
        logger.remove(sink)
        for name, module in modules.items():
            setattr(lm, name, module)
    records = log.gathered()
    if getattr(lm, "rank", 0) != 0:
        return {}, {}
    _check(results, tasks, errors)
    samples = results.pop("samples", {})
    results["vtprune"] = log.summary(records)
    if output_path is not None:
        write(Path(output_path), results, samples, records, results["vtprune"])
    return results, samples


def _cause(exc: BaseException) -> BaseException:
    """The error inside a tenacity RetryError (lmms-eval retries dataset loading and scoring)."""
    last = getattr(exc, "last_attempt", None)
    if last is not None and last.exception() is not None:
        return last.exception()
    return exc


def _toyvqa_image_size(config) -> int:
    """The toyvqa image size for a checkpoint of ``config``'s family (the LLaVA toy model's without one)."""
    from vtprune.toyvqa.models import IMAGE_SIZE

    return IMAGE_SIZE.get(getattr(config, "model_type", None) or "", IMAGE_SIZE["llava"])


def write(out: Path, results: dict, samples: dict, records: list[dict], summary: dict) -> None:
    """``results.json``, ``samples_TASK.jsonl`` and ``vtprune_report.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    for task, rows in samples.items():
        with (out / f"samples_{task}.jsonl").open("w") as fh:
            for row in rows:
                fh.write(json.dumps(row, default=_json_default) + "\n")
    # {"summary": {...}, "prefills": [...]}, one prefill a line
    lines = ",\n".join("  " + json.dumps(r) for r in records)
    (out / "vtprune_report.json").write_text(f'{{"summary": {json.dumps(summary, indent=2)},\n "prefills": [\n{lines}\n]}}\n')


def _print_include_path(args) -> int:
    from .tasks import LOCAL_TASKS, TOYVQA_N, prepare

    tasks = [t.strip() for t in args.print_include_path.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in LOCAL_TASKS]
    if unknown or not tasks:
        print(
            f"vtprune eval: --print-include-path takes local tasks ({', '.join(LOCAL_TASKS)}); got {tasks}. "
            "lmms-eval's own tasks need no include path.",
            file=sys.stderr,
        )
        return 2
    n = int(args.limit) if args.limit is not None and args.limit >= 1 else TOYVQA_N
    pretrained = parse_model_args(args.model_args).get("pretrained") if args.model_args else None
    config = None  # the LLaVA toy model's size unless --model_args pretrained=PATH names a checkpoint
    if pretrained is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(pretrained))
    size = _toyvqa_image_size(config)
    for folder in prepare(tasks, n=n, image_size=size, cache_dir=args.cache_dir):
        print(folder)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vtprune eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model_args", help="pretrained=PATH[,policy=NAME,keep=N|F,positions=original|compact,OPTION=VALUE,...]")
    parser.add_argument("--tasks", help="comma-separated lmms-eval task names (local: toyvqa)")
    parser.add_argument(
        "--print-include-path",
        metavar="TASKS",
        dest="print_include_path",
        help="export the local tasks among TASKS (e.g. toyvqa) and print the folder that "
        "lmms-eval's --include_path takes, then exit",
    )
    parser.add_argument("--limit", type=float, help="first N items per task (N < 1: that fraction)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_path", default="runs/eval", help="folder for results.json and the vtprune report")
    parser.add_argument("--gen_kwargs", help="generation settings over the tasks' own, e.g. max_new_tokens=16")
    parser.add_argument("--include_path", action="append", help="extra folder of lmms-eval task YAMLs")
    parser.add_argument("--cache_dir", help="where local task data is exported (default $VTPRUNE_CACHE or ~/.cache/vtprune)")
    parser.add_argument("--force_simple", action="store_true", help="lmms-eval's 'simple' wrapper instead of the chat one")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--verbosity", default="WARNING")
    parser.add_argument(
        "--offline",
        action="store_true",
        help="no downloads: set HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE=1 (default: the environment as it is)",
    )
    args = parser.parse_args(argv)
    if args.print_include_path is not None:
        return _print_include_path(args)
    if not args.model_args or not args.tasks:
        parser.error("--model_args and --tasks are required (or --print-include-path TASKS)")
    from .outputs import folder_problem

    for value, option in ((args.output_path, "--output_path"), (args.cache_dir, "--cache_dir")):
        if value is not None and (problem := folder_problem(value, option)):
            print(f"vtprune eval: {problem}", file=sys.stderr)  # before the model loads, not after it ran
            return 2
    if args.offline:
        offline()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        print(f"vtprune eval: {INSTALL_HINT}", file=sys.stderr)
        return 1
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        lm, prune = load_model(args.model_args, batch_size=args.batch_size, device=args.device, force_simple=args.force_simple)
        with pruned(lm, prune) as log:
            results, _ = run(
                lm,
                log,
                tasks,
                limit=args.limit,
                output_path=args.output_path,
                gen_kwargs=args.gen_kwargs,
                include_path=args.include_path,
                cache_dir=args.cache_dir,
                verbosity=args.verbosity,
            )
    except (EvalFailed, ValueError, TypeError, OSError, ImportError) as exc:
        print(f"vtprune eval: FAILED: {exc}", file=sys.stderr)
        return 1
    if results:
        from lmms_eval.utils import make_table

        print(make_table(results))
        print(f"vtprune: {json.dumps(results['vtprune'])}")
        print(f"results, samples and the vtprune report in {args.output_path}")
    return 0
