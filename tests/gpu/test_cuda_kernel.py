"""The CUDA compaction kernel: compiles with plain nvcc here; on a GPU it equals the torch path bit for bit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from importlib import resources

import pytest
import torch

from vtprune.compaction import compact_batch, gather_seq, keep_index


def _source():
    return resources.files("vtprune.cuda") / "compaction.cu"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("define", [None, "VTPRUNE_STANDALONE_TEST"])
def test_kernel_compiles_with_nvcc(tmp_path, define):
    with resources.as_file(_source()) as src:
        cmd = ["nvcc", "-c", str(src), "-o", str(tmp_path / "compaction.o")]
        if define:
            cmd = ["nvcc", f"-D{define}", str(src), "-o", str(tmp_path / "compaction_test")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.skipif(
    os.environ.get("VTPRUNE_TEST_EXTENSION_BUILD") != "1", reason="opt-in (about 2 minutes): VTPRUNE_TEST_EXTENSION_BUILD=1"
)
def test_torch_extension_compiles_against_this_torch(tmp_path):
    # The extension needs only torch/extension.h (no CUDA headers of torch), so a CPU build of torch checks it.
    from torch.utils.cpp_extension import include_paths

    with resources.as_file(_source()) as src:
        cmd = [
            "nvcc",
            "-std=c++17",
            "-DVTPRUNE_TORCH_EXTENSION",
            "-DTORCH_EXTENSION_NAME=vtprune_compaction",
            *(f"-I{p}" for p in include_paths()),
            f"-I{sysconfig.get_paths()['include']}",
            "-c",
            str(src),
            "-o",
            str(tmp_path / "ext.o"),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


def test_kernel_loader_falls_back_without_a_gpu(monkeypatch):
    from vtprune.cuda import load

    monkeypatch.setenv("VTPRUNE_KERNEL", "cuda")
    load.cache_clear()
    if not torch.cuda.is_available():
        assert load() is None
    load.cache_clear()


def test_kernel_is_opt_in(monkeypatch):
    """Where CUDA is present the torch path stays the default: the kernel is built only with VTPRUNE_KERNEL=cuda."""
    from torch.utils import cpp_extension

    from vtprune.cuda import load

    built = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: built.append(kwargs) or "extension")
    for value in (None, "torch"):
        if value is None:
            monkeypatch.delenv("VTPRUNE_KERNEL", raising=False)
        else:
            monkeypatch.setenv("VTPRUNE_KERNEL", value)
        load.cache_clear()
        assert load() is None and not built
    monkeypatch.setenv("VTPRUNE_KERNEL", "cuda")
    load.cache_clear()
    assert load() == "extension" and built[0]["name"] == "vtprune_compaction"
    monkeypatch.setenv("VTPRUNE_KERNEL", "cdua")
    load.cache_clear()
    with pytest.raises(ValueError, match=r"VTPRUNE_KERNEL='cdua': choose one of torch, cuda"):
        load()
    load.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, width", [(torch.float32, 64), (torch.bfloat16, 4096), (torch.float16, 3)])
def test_kernel_equals_torch_gather(dtype, width, monkeypatch):
    from vtprune.cuda import load

    monkeypatch.setenv("VTPRUNE_KERNEL", "cuda")
    load.cache_clear()
    kernel = load()
    assert kernel is not None
    torch.manual_seed(0)
    x = torch.randn(3, 50, width, device="cuda").to(dtype)
    keep = torch.rand(3, 50, device="cuda") > 0.6
    index = keep_index(keep, pad_left=True)
    want = gather_seq(x.cpu(), index.cpu())
    assert torch.equal(gather_seq(x, index).cpu(), want)
    positions = torch.arange(3 * 3 * 50, device="cuda").view(3, 3, 50)
    out, mask, pos = compact_batch(x, index, positions)
    want_out, want_mask, want_pos = compact_batch(x.cpu(), index.cpu(), positions.cpu())
    assert torch.equal(out.cpu(), want_out)
    assert torch.equal(mask.cpu(), want_mask)
    assert torch.equal(pos.cpu(), want_pos)
    out, mask, pos = compact_batch(x, index, positions[0])
    assert torch.equal(pos.cpu(), want_pos[0])
