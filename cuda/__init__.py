"""The CUDA compaction kernel and its loader.

`load()` builds ``compaction.cu`` as a torch extension the first time it is
needed on a machine with a CUDA build of torch and a GPU (a few seconds,
cached by torch), and returns None everywhere else: callers then use the
torch gather in `vtprune.compaction`, the reference implementation.
Set ``VTPRUNE_NO_CUDA_KERNEL=1`` to force the torch path.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).with_name("compaction.cu")


@lru_cache(maxsize=1)
def load():
    """The compiled extension module (with ``gather_seq(x, index)``), or None where it cannot be built."""
    if os.environ.get("VTPRUNE_NO_CUDA_KERNEL") == "1":
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
