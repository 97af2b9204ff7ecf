import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from vtprune.patches import supported_model_types  # noqa: E402  (the one table of model types)

torch.set_num_threads(1)


def _no_weights_attention(*args, **kwargs):
    """An attention backend that never returns weights (policies must not need the model's attention weights)."""
    out, _ = sdpa_attention_forward(*args, **kwargs)
    return out, None


AttentionInterface.register("vtprune_noweights", _no_weights_attention)
AttentionMaskInterface.register("vtprune_noweights", sdpa_mask)


@pytest.fixture(params=supported_model_types())
def family(request):
    return request.param


# Markers by where a test lives (registered in pyproject.toml): `-m "not slow"` for a quick run, `-m gpu` on a GPU.
MARKED_FILES = {
    "gpu": {"test_gpu_backends.py", "test_cuda_kernel.py"},
    "lmms": {"test_lmms_eval.py", "test_lmms_accelerate.py"},
    "slow": {"test_lmms_eval.py", "test_lmms_accelerate.py", "test_sweep_ray.py", "test_toyvqa.py"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        for marker, files in MARKED_FILES.items():
            if name in files:
                item.add_marker(getattr(pytest.mark, marker))
