"""The GPU checks in one command, one JSON: kernel and backend tests, the compaction kernel, the bench.

Run on a machine with a CUDA GPU (CI never does):

    python -m vtprune.eval.bench --suite gpu --json gpu.json      # or: python -m vtprune.eval.gpu_suite

1. pytest on the CUDA kernel tests (the extension built and checked bit for bit
   against the torch path), the compaction tests, and the SDPA / eager /
   FlashAttention-2 equality tests of every policy (`tests/gpu/test_gpu_backends.py`);
2. the compaction op at 7B width, batch 8, fp32 / bf16: the CUDA kernel, the
   torch path and a plain copy of the output bytes;
3. `selection_time` on the GPU (576 -> 64, 2880 -> 320, 8192 -> 819);
4. `bench` on the GPU (batch 1, 8, 32; `random` at 64 and `idpruner` at 64),
   with a mid-size LLM (8 x 1024) so that prefill dominates.

Each part's result (or its error) goes into the JSON; a failing part does not stop the others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/gpu/test_cuda_kernel.py", "tests/core/test_compaction.py", "tests/gpu/test_gpu_backends.py"]


def run_tests() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", *TESTS, f"--junitxml={report}", "-p", "no:cacheprovider"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        summary = {"returncode": done.returncode, "tail": done.stdout[-4000:] + done.stderr[-2000:]}
        if report.exists():
            import xml.etree.ElementTree as ET

            suite = ET.parse(report).getroot()
            suite = suite if suite.tag == "testsuite" else suite[0]
            summary.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
            summary["failed"] = [
                f"{c.get('classname')}::{c.get('name')}"
                for c in suite.iter("testcase")
                if c.find("failure") is not None or c.find("error") is not None
            ]
    return summary


def compaction() -> list[dict]:
    """The compaction op at 7B width, batch 8, unequal keeps: the kernel, the torch path, a plain copy."""
    return [_compaction(dtype) for dtype in (torch.float32, torch.bfloat16)]


def _compaction(dtype: torch.dtype) -> dict:
    import vtprune.compaction as comp
    from vtprune.cuda import load
    from vtprune.measure import interleaved, median

    kernel = load()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 640, 4096, generator=g).to("cuda", dtype)
    keep = torch.zeros(8, 640, dtype=torch.bool)
    for b in range(8):
        keep[b, torch.randperm(640, generator=g)[: 64 + 40 * b]] = True
    index = comp.keep_index(keep.cuda())
    positions = torch.arange(640, device="cuda").expand(3, 8, 640).contiguous()  # M-RoPE-shaped ids
    src = x.reshape(-1, 4096)[: index.numel()]

    def torch_batch():  # compact_batch's torch path: rows, mask, positions
        return comp._gather_rows(x, index), (index >= 0).long(), comp.gather_seq(positions, index, dim=-1)

    fns = {
        "torch path (rows)": lambda: comp._gather_rows(x, index),
        "torch path (batch)": torch_batch,
        "plain copy": lambda: src.clone(),
    }
    if kernel is not None:
        fns["cuda kernel (rows)"] = lambda: comp.gather_seq(x, index)
        fns["cuda kernel (batch, one launch)"] = lambda: comp.compact_batch(x, index, positions)
    t = interleaved(fns, 50, 5)
    row: dict[str, Any] = {"dtype": str(dtype), "rows_out": index.numel(), **{f"{k} ms": median(v) for k, v in t.items()}}
    copy = row["plain copy ms"]
    row["torch path / copy"] = row["torch path (rows) ms"] / copy
    if kernel is not None:
        row["kernel / copy"] = row["cuda kernel (rows) ms"] / copy
        want = torch_batch()
        got = comp.compact_batch(x, index, positions)
        row["kernel equal to torch path"] = all(a is not None and bool(torch.equal(a, b)) for a, b in zip(got, want))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="gpu.json")
    parser.add_argument("--skip", nargs="*", default=[], choices=["tests", "compaction", "selection", "bench"])
    args = parser.parse_args(argv)
    from .outputs import file_problem, make_parent

    if problem := file_problem(args.json, "--json"):  # before the GPU time is spent, not after
        print(f"vtprune gpu suite: {problem}", file=sys.stderr)
        return 2
    make_parent(args.json)
    if not torch.cuda.is_available():
        print("vtprune gpu suite: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    # the suite checks the opt-in CUDA kernel (VTPRUNE_KERNEL=cuda) beside the default torch path
    os.environ["VTPRUNE_KERNEL"] = "cuda"
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    tmp = Path(tempfile.mkdtemp())

    def part(name, fn):
        if name in args.skip:
            return
        start = time.perf_counter()
        try:
            result[name] = fn()
        except Exception:  # one broken part must not lose the others' numbers
            result[name] = {"error": traceback.format_exc()[-4000:]}
        result[f"{name}_s"] = time.perf_counter() - start
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"[gpu suite] {name}: {result[f'{name}_s']:.0f} s", flush=True)

    def selection():
        from .selection_time import main as sel

        return sel(
            ["--device", "cuda", "--repeats", "20", "--warmup", "3", "--big-repeats", "5", "--json", str(tmp / "sel.json")]
        )

    def bench():
        from .bench import main as bench_main

        rows = {}
        for policy in ("random", "idpruner"):
            bench_main(
                [
                    "--device",
                    "cuda",
                    "--policy",
                    policy,
                    "--keep",
                    "64",
                    "--llm-layers",
                    "8",
                    "--llm-hidden",
                    "1024",
                    "--repeats",
                    "10",
                    "--warmup",
                    "3",
                    "--json",
                    str(tmp / f"bench_{policy}.json"),
                ]
            )
            rows[policy] = json.loads((tmp / f"bench_{policy}.json").read_text())
        return rows

    part("tests", run_tests)
    part("compaction", compaction)
    part("selection", selection)
    part("bench", bench)
    print(f"wrote {args.json}")
    failed = result.get("tests", {}).get("failures", 0) or result.get("tests", {}).get("errors", 0)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
