"""The CUDA compaction kernel and its loader.

The kernel is opt-in until a GPU run has checked it: with
``VTPRUNE_KERNEL=cuda`` in the environment, `load()` builds
``compaction.cu`` as a torch extension the first time it is needed on a
machine with a CUDA build of torch and a GPU (a few seconds, cached by
torch). By default (``VTPRUNE_KERNEL`` unset or ``torch``), and wherever the
extension cannot be built, it returns None: callers then use the torch
gather in `vtprune.compaction`, the reference implementation.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).with_name("compaction.cu")
ENV = "VTPRUNE_KERNEL"
CHOICES = ("torch", "cuda")


@lru_cache(maxsize=1)
def load():
    """The compiled extension module (with ``gather_seq(x, index)``), or None where it cannot be built."""
    choice = os.environ.get(ENV, "torch")
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r}: choose one of {', '.join(CHOICES)} (default torch)")
    if choice != "cuda":
        return None
    try:
        import torch

        if not torch.cuda.is_available() or torch.version.cuda is None:
            return None
        from torch.utils.cpp_extension import load as build

        return build(
            name="vtprune_compaction",
            sources=[str(SOURCE)],
            extra_cuda_cflags=["-O3", "-DVTPRUNE_TORCH_EXTENSION"],
            extra_cflags=["-O3", "-DVTPRUNE_TORCH_EXTENSION"],
            verbose=False,
        )
    except Exception as err:  # a missing toolchain must not break pruning
        warnings.warn(f"vtprune: CUDA compaction kernel unavailable ({err}); using the torch gather", stacklevel=2)
        return None
