"""On a GPU: every policy selects alike and gives matching logits under eager, SDPA and FlashAttention-2.

Skipped without CUDA (CI never has one); `python -m vtprune.eval.bench --suite gpu` runs it on a GPU
machine. fp32 compares eager with SDPA exactly on the keep sets; FlashAttention-2 (only where the
`flash_attn` package is installed) runs in bf16 against SDPA in bf16.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from families.test_policies_models import POLICIES
from helpers import inputs, mixed_specs, model_for

import vtprune

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


def _run(family: str, attn: str, policy: str, dtype: torch.dtype):
    model = model_for(family, attn).to("cuda", dtype)
    batch = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in inputs(model, mixed_specs(family)).items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    with vtprune.pruned(model, POLICIES[policy](3)):
        logits = model(**batch).logits[:, -1].float().cpu()  # the last position: real in every sample
        samples = vtprune.report(model).to_dict()["samples"]
    picks = [[{k: v["kept"] for k, v in i["stages"].items()} for i in s["images"]] for s in samples]
    return picks, logits


@torch.no_grad()
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_sdpa_equals_eager_on_the_gpu(family, policy):
    eager_picks, eager_logits = _run(family, "eager", policy, torch.float32)
    sdpa_picks, sdpa_logits = _run(family, "sdpa", policy, torch.float32)
    assert sdpa_picks == eager_picks
    torch.testing.assert_close(sdpa_logits, eager_logits, rtol=1e-3, atol=1e-4)


@torch.no_grad()
@pytest.mark.skipif(not HAS_FLASH, reason="flash_attn is not installed")
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_flash_attention_2_equals_sdpa(family, policy):
    sdpa_picks, sdpa_logits = _run(family, "sdpa", policy, torch.bfloat16)
    flash_picks, flash_logits = _run(family, "flash_attention_2", policy, torch.bfloat16)
    assert flash_picks == sdpa_picks
    torch.testing.assert_close(flash_logits, sdpa_logits, rtol=5e-2, atol=5e-2)
