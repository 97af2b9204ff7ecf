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
