"""Measurements shared by the demo and the benchmark: prefill time, KV-cache bytes."""

from __future__ import annotations

import statistics
import time

import torch


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of a transformers Cache (every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def time_prefill(model, batch: dict, repeats: int = 3, warmup: int = 1) -> tuple[float, object]:
    """Median wall time (ms) of one prefill forward with a cache, and the last output."""
    out = None
    times = []
    for i in range(warmup + repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(**batch, use_cache=True, logits_to_keep=1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times), out
