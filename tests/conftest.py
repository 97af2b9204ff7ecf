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

ATTNS = ("eager", "sdpa", "vtprune_noweights")


@pytest.fixture(params=supported_model_types())
def family(request):
    return request.param
