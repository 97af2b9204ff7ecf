"""Measurements shared by the demo, the benchmark and the selection-time script.

One timing helper for the project (`timed`: CUDA synchronised before and
after, so a GPU run times the work, not the launch), interleaved repeats
(`interleaved`), the peak memory of a call (`peak_bytes`), prefill time
and KV-cache bytes.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def synchronize() -> None:
    """Wait for queued CUDA work (a no-op without a GPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall time (ms) of one call of `fn`, synchronised on CUDA before and after, and its result."""
    synchronize()
    start = time.perf_counter()
    out = fn()
    synchronize()
    return (time.perf_counter() - start) * 1000.0, out


def interleaved(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Times (ms) of every function of `fns`, run round-robin `warmup + repeats` times (warm-up rounds dropped).

    Round-robin order makes drift in the machine's load hit every function
    alike, so ratios of medians taken in one process stay meaningful on a
    shared machine.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rnd in range(warmup + repeats):
        for name, fn in fns.items():
            ms, _ = timed(fn)
            if rnd >= warmup:
                times[name].append(ms)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages allocated inside the mode and still alive, with their maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self.live:
                    self.live[key] = size
                    self.current += size
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(t, self._free, key)
        return out


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes that one call of `fn` allocates on top of what already exists.

    CUDA: the caching allocator's peak (exact). CPU: the storages created by
    aten ops inside the call and alive at once (a tracking dispatch mode;
    scratch space inside one kernel is not seen), measured the same way for
    every function compared.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    tracker = _LiveBytes()
    with tracker:
        fn()
    return tracker.peak


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of a transformers Cache (every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def cache_bytes_by_kind(cache) -> dict[str, int]:
    """Bytes a transformers Cache holds, per kind of layer state.

    ``"kv"``: keys and values of the attention layers (what `kv_cache_bytes`
    counts); ``"linear_state"``: the convolution and recurrent states of
    linear-attention layers (Qwen3.5's Gated DeltaNet), whose size does not
    depend on the sequence length, so pruning leaves them as they are.
    """
    linear = 0
    for layer in getattr(cache, "layers", []):
        for name in ("conv_states", "recurrent_states"):
            for t in (getattr(layer, name, None) or {}).values():
                if isinstance(t, torch.Tensor):
                    linear += t.numel() * t.element_size()
    return {"kv": kv_cache_bytes(cache), "linear_state": linear}


@torch.no_grad()
def time_prefill(model, batch: dict, repeats: int = 3, warmup: int = 1) -> tuple[float, Any]:
    """Median wall time (ms) of one prefill forward with a cache, and the last output."""
    out = None
    times = []
    for i in range(warmup + repeats):
        ms, out = timed(lambda: model(**batch, use_cache=True, logits_to_keep=1))
        if i >= warmup:
            times.append(ms)
    return statistics.median(times), out
