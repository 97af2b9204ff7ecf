"""The KV cache across calls (issue 18): its lifetime, a second turn on a reused cache, chunked prefill, static caches."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from families.test_policies_models import POLICIES, make
from helpers import QWEN, gen_kwargs, inputs, mixed_specs, model_for, single_spec
from transformers import CompileConfig, DynamicCache, StaticCache

import vtprune
from vtprune.policies import DivPrune, Random
from vtprune.tiny import SampleSpec

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
    vtprune.wrap(model, make(policy, 3, family) if policy in POLICIES else LIFETIME_POLICIES[policy](3))
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


# --- a second turn on the first turn's cache ------------------------------------------------------------


def _two_turns(model, batch, family, n: int = 3):
    """Turn 1, then turn 2 (its answer and 5 new text tokens appended) given turn 1's cache; and turn 2 from scratch."""
    kw = gen_kwargs(n)
    first = model.generate(**batch, **kw, return_dict_in_generate=True)
    cache = getattr(first, "cache", None) or first.past_key_values
    rows, width = first.sequences.shape[0], batch["input_ids"].shape[1]
    new = torch.randint(3, 90, (rows, 5), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([first.sequences, new], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones(rows, ids.shape[1] - width, dtype=torch.long)], 1)
    extra = {}
    if family in QWEN:
        types = batch["mm_token_type_ids"]
        extra["mm_token_type_ids"] = torch.cat([types, types.new_zeros(rows, ids.shape[1] - width)], 1)
    reused = model.generate(input_ids=ids, attention_mask=mask, cache=cache, **extra, **kw)
    whole = model.generate(**dict(batch, input_ids=ids, attention_mask=mask, **extra), **kw)
    return reused, whole


@torch.no_grad()
@pytest.mark.parametrize(
    "policy",
    [
        lambda k: Random(keep=k),
        lambda k: DivPrune(keep=k),
        lambda k: Random(keep=k, at_layer=1),
    ],
    ids=["random", "divprune", "random_llm"],
)
def test_second_turn_on_a_reused_cache_equals_recomputing_both_turns(family, policy):
    """A pruned cache passed to the next turn's generate stands for every column of the turns before:
    generate feeds only the new tokens, and the answer is the one a fresh call on both turns gives."""
    model = model_for(family)
    batch = inputs(model, mixed_specs(family))
    unwrapped, _ = _two_turns(model, batch, family)
    vtprune.wrap(model, policy(1.0))
    at_full_budget, _ = _two_turns(model, batch, family)
    assert torch.equal(at_full_budget, unwrapped)
    vtprune.wrap(model, policy(3))
    reused, whole = _two_turns(model, batch, family)
    assert torch.equal(reused, whole)


# --- chunked prefill -----------------------------------------------------------------------------------


@torch.no_grad()
def test_chunked_prefill_of_a_visual_prompt_is_refused_at_the_call(family):
    """The chunks of a prefill are forwards of their own, none holding the whole prompt: refused before anything
    runs (no chunk ran unpruned, report() still describes the call before), whatever the budget."""
    model = model_for(family)
    batch = inputs(model, mixed_specs(family))
    text = inputs(model, [SampleSpec(question=20)])
    want_text = model.generate(**text, **gen_kwargs(3), prefill_chunk_size=8)
    for keep in (1.0, 3):
        vtprune.wrap(model, Random(keep=keep))
        want = model.generate(**batch, **gen_kwargs(3))
        before = vtprune.report(model).to_dict()
        calls = []
        handle = model.register_forward_pre_hook(lambda *_, seen=calls: seen.append(1))
        try:
            with pytest.raises(ValueError, match=r"prefill_chunk_size=8\) would split this prompt"):
                model.generate(**batch, **gen_kwargs(3), prefill_chunk_size=8)
            config = copy.deepcopy(model.generation_config)
            config.prefill_chunk_size = 8
            with pytest.raises(ValueError, match="prefill_chunk_size"):
                model.generate(**batch, **gen_kwargs(3), generation_config=config)
        finally:
            handle.remove()
        assert calls == [] and vtprune.report(model).to_dict() == before
        # one chunk is the whole prompt: pruned as without chunks; a text-only prompt has nothing to prune
        width = batch["input_ids"].shape[1]
        assert torch.equal(model.generate(**batch, **gen_kwargs(3), prefill_chunk_size=width), want)
        assert torch.equal(model.generate(**text, **gen_kwargs(3), prefill_chunk_size=8), want_text)


# --- static caches -------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize(
    "policy",
    [
        lambda k: Random(keep=k),
        lambda k: DivPrune(keep=k),
        lambda k: Random(keep=k, at_layer=1),
    ],
    ids=["random", "divprune", "random_llm"],
)
def test_static_cache_generates_what_the_dynamic_cache_does(family, policy):
    """cache_implementation="static" and a StaticCache passed in: the tokens of the dynamic cache; at full budget
    the unwrapped model's static-cache tokens."""
    model = model_for(family)
    batch = inputs(model, mixed_specs(family))
    kw = gen_kwargs(4)
    unwrapped = model.generate(**batch, **kw, cache_implementation="static")
    vtprune.wrap(model, policy(1.0))
    assert torch.equal(model.generate(**batch, **kw, cache_implementation="static"), unwrapped)
    vtprune.wrap(model, policy(3))
    dynamic = model.generate(**batch, **kw)
    assert torch.equal(model.generate(**batch, **kw, cache_implementation="static"), dynamic)
    cache = StaticCache(config=model.config, max_cache_len=batch["input_ids"].shape[1] + 8)
    assert torch.equal(model.generate(**batch, **kw, cache=cache), dynamic)


@torch.no_grad()
def test_pruned_prefill_fills_the_first_slots_of_a_static_cache(family):
    """Each layer holds the dynamic cache's keys and values in its first slots, zeros after them."""
    model = model_for(family)
    batch = inputs(model, mixed_specs(family))
    vtprune.wrap(model, Random(keep=3, at_layer=1))
    dynamic = model(**batch, cache=DynamicCache(config=model.config), use_cache=True).cache
    static = model(
        **batch, cache=StaticCache(config=model.config, max_cache_len=batch["input_ids"].shape[1] + 4), use_cache=True
    ).cache
    held = [j for j, layer in enumerate(dynamic.layers) if getattr(layer, "keys", None) is not None]
    assert held and min(dynamic.layers[j].keys.shape[2] for j in held) < batch["input_ids"].shape[1]  # pruned
    for j in held:
        n = dynamic.layers[j].keys.shape[2]
        assert int(static.layers[j].get_seq_length()) == n
        for name in ("keys", "values"):
            slots = getattr(static.layers[j], name)
            # the same tokens (attention over the preallocated width may round differently further up)
            torch.testing.assert_close(slots[:, :, :n], getattr(dynamic.layers[j], name), rtol=1e-5, atol=1e-6)
            assert not slots[:, :, n:].any()


@torch.no_grad()
def test_compiled_static_cache_generate_equals_dynamic():
    """generate(cache_implementation="static", compile_config=...) compiles the decode steps (vtprune's decode-step
    translation included): the dynamic cache's tokens (Qwen2.5-VL: M-RoPE positions, the dynamo backend alone)."""
    family = "qwen2_5_vl"
    model = model_for(family)
    batch = inputs(model, [single_spec(family)])
    vtprune.wrap(model, Random(keep=3, at_layer=1))
    kw = gen_kwargs(3)
    dynamic = model.generate(**batch, **kw)
    config = CompileConfig(backend="eager", mode="default")
    config._compile_all_devices = True  # compile on a CPU too
    torch._dynamo.reset()
    try:
        compiled = model.generate(**batch, **kw, cache_implementation="static", compile_config=config)
        assert hasattr(model, "_compiled_call")  # the decode steps ran compiled
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, dynamic)
