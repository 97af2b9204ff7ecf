"""The KV cache across calls (issue 18): its lifetime, a second turn on a reused cache, chunked prefill, static caches."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import gen_kwargs, inputs, mixed_specs, model_for, single_spec
from test_policies_models import POLICIES

import vtprune
from vtprune.policies import Random

# every policy of the shared table, and random at both kinds of prune point
LIFETIME_POLICIES = dict(POLICIES, random=lambda k: Random(keep=k), random_llm=lambda k: Random(keep=k, at_layer=1))


def _cache_refs(model):
    """Weak references to the cache of every forward of ``model`` from now on (and the hook's handle)."""
    refs = []

    def grab(_module, _args, output):
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        if cache is not None:
            refs.append(weakref.ref(cache))

    return refs, model.register_forward_hook(grab)


def _live_tensors() -> tuple[int, int]:
    """(count, bytes) of the tensors the process holds, after a full collection."""
    gc.collect()
    count = size = 0
    for obj in gc.get_objects():
        if torch.is_tensor(obj):
            count += 1
            size += obj.untyped_storage().nbytes() if obj.device.type != "meta" else 0
    return count, size


# --- lifetime ----------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("policy", sorted(LIFETIME_POLICIES))
def test_no_cache_outlives_its_generate_call(family, policy):
    """The state a prefill leaves is kept with its cache, never keeping that cache alive itself."""
    model = model_for(family)
    batch = inputs(model, mixed_specs(family))
    vtprune.wrap(model, LIFETIME_POLICIES[policy](3))
    refs, handle = _cache_refs(model)
    try:
        for _ in range(3):
            model.generate(**batch, **gen_kwargs(2))
    finally:
        handle.remove()
    gc.collect()
    assert len(refs) == 3 * 2 and vtprune.is_wrapped(model)
    assert [r for r in refs if r() is not None] == []


@torch.no_grad()
def test_long_run_of_an_llm_stage_policy_keeps_live_tensors_flat():
    """200 generate calls keep no more tensors (nor bytes) alive than the first call left."""
    model = model_for("llava")
    batch = inputs(model, [single_spec("llava")])
    vtprune.wrap(model, Random(keep=3, at_layer=1))
    kw = gen_kwargs(1)
    model.generate(**batch, **kw)
    first = _live_tensors()
    for _ in range(199):
        model.generate(**batch, **kw)
    last = _live_tensors()
    assert last[0] <= first[0] and last[1] <= first[1], (first, last)
