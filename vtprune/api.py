"""The public API: wrap, unwrap, pruned, report."""

from __future__ import annotations

import copy
import threading
import types
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .checks import BadValue
from .plan import build_plan
from .policies.base import Pipeline, Policy
from .reporting import Report
from .runtime import Runtime, masks_for_generate

_ATTR = "_vtprune_runtime"
_SWAP = threading.RLock()  # one change of a model's current runtime at a time
#: a pruned() block's runtime -> the runtime it replaced; and the blocks that have ended
_SCOPE_PREVIOUS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SCOPE_ENDED: weakref.WeakSet = weakref.WeakSet()


def _runtime(model: nn.Module) -> Runtime | None:
    return model.__dict__.get(_ATTR)


def _attach(model: nn.Module, runtime: Runtime) -> None:
    """Install `runtime` on `model`; on failure nothing of it is left."""
    runtime.activate()
    model.__dict__[_ATTR] = runtime
    # copy.deepcopy looks __deepcopy__ up on the instance: a copy gets its own hooks, bound to itself
    model.__dict__["__deepcopy__"] = types.MethodType(_deepcopy_wrapped, model)
    # pickle (torch.save, multiprocessing) also looks __reduce_ex__ up on the instance: refuse clearly
    model.__dict__["__reduce_ex__"] = types.MethodType(_refuse_pickle, model)
    # generate builds a static cache's masks ahead of the forward: keep the 2-D mask the runtime translates
    model.__dict__["create_masks_for_generate"] = types.MethodType(masks_for_generate, model)


def _detach(model: nn.Module) -> Runtime | None:
    return _swap(model, None)


def _swap(model: nn.Module, runtime: Runtime | None) -> Runtime | None:
    """Make `runtime` (None: none) what calls beginning from now on run under; returns the one it replaces.

    The new runtime is installed before the previous one retires (a failed
    install leaves the previous in place); a retired runtime keeps its hooks
    until the calls it serves, on other threads, have ended.
    """
    with _SWAP:
        previous = _runtime(model)
        if runtime is not None:
            _attach(model, runtime)
        else:
            for attr in (_ATTR, "__deepcopy__", "__reduce_ex__", "create_masks_for_generate"):
                model.__dict__.pop(attr, None)
        if previous is not None and previous is not runtime:
            previous.retire()
    return previous


def _deepcopy_wrapped(model: nn.Module, memo: dict) -> nn.Module:
    """`copy.deepcopy` of a wrapped model: an independent model wrapped with the same policy.

    The bound forwards close over the original's modules, so they are not
    copied: the original is unwrapped for the copy (bit-exact), rewrapped
    after it, and the copy is wrapped with the same configuration.
    """
    runtime = _detach(model)
    assert runtime is not None  # called on wrapped models only
    try:
        clone = copy.deepcopy(model, memo)
    finally:
        _attach(model, runtime)
    _attach(clone, Runtime(runtime.plan.rebuild(clone)))
    return clone


def _refuse_pickle(model: nn.Module, _protocol: int):
    """Pickling a wrapped model would save vtprune's hooks (closures over the runtime): refuse, naming the way out."""
    runtime = _runtime(model)
    policy = runtime.plan.pipeline.describe() if runtime is not None else "a vtprune policy"
    raise TypeError(
        f"vtprune: this {type(model).__name__} is wrapped ({policy}) and a wrapped model cannot be pickled "
        "(torch.save(model), pickle, copy.copy, multiprocessing): its hooks are bound to this process. Save "
        "model.state_dict() or save_pretrained(), or call vtprune.unwrap(model) first and wrap again after loading"
    )


def wrap(
    model: nn.Module,
    policy: str | Policy | Pipeline,
    keep: int | float | None = None,
    *,
    positions: str = "original",
    tokenizer=None,
    **options,
) -> nn.Module:
    """Prune visual tokens of `model` in prefill with `policy`; returns the same model object.

    ``keep``: tokens per image (int) or a fraction of each image's tokens (float
    in (0, 1]). ``positions``: ``"original"`` (kept tokens keep their position
    ids) or ``"compact"`` (renumbered, 1-D RoPE models only). ``tokenizer`` (or
    the processor) lets text-conditioned policies see only the user's question,
    without the chat template's assistant prefix. Other options go to the
    policy. The policy object is a configuration: wrapping binds a resolved
    copy to this model and never changes it, so one object can wrap several
    models. Wrapping a wrapped model replaces its policy; invalid input raises
    before anything is changed, and a failed re-wrap keeps the previous policy.
    """
    _swap(model, Runtime(build_plan(model, policy, keep, positions, options, tokenizer)))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Remove every hook and bound method vtprune installed; the model behaves exactly as before."""
    _detach(model)
    return model


def is_wrapped(model: nn.Module) -> bool:
    return _runtime(model) is not None


@contextmanager
def pruned(
    model: nn.Module,
    policy: str | Policy | Pipeline,
    keep: int | float | None = None,
    *,
    positions: str = "original",
    tokenizer=None,
    **options,
) -> Iterator[nn.Module]:
    """Scoped `wrap`: the model is pruned inside the ``with`` block and restored after it.

    A policy the model was already wrapped with comes back afterwards. The
    model is one object: calls that begin inside the block on any thread are
    pruned, and a call runs to its end under the policy it began with. If the
    model was re-wrapped or unwrapped inside the block, that change stands;
    blocks that overlap on several threads restore the policy in force before
    the first of them once the last ends.
    """
    runtime = Runtime(build_plan(model, policy, keep, positions, options, tokenizer))
    _SCOPE_PREVIOUS[runtime] = _swap(model, runtime)
    try:
        yield model
    finally:
        with _SWAP:
            _SCOPE_ENDED.add(runtime)
            if _runtime(model) is runtime:
                back = _SCOPE_PREVIOUS.get(runtime)
                while back is not None and back in _SCOPE_ENDED:  # a block that ended while this one ran
                    back = _SCOPE_PREVIOUS.get(back)
                _swap(model, back)


def report(model: nn.Module) -> Report:
    """The report of the model's last call (tokens per image and stage, kept indices, timing, the bound policy)."""
    runtime = _runtime(model)
    if runtime is None:
        raise BadValue(f"{type(model).__name__} is not wrapped by vtprune; call vtprune.wrap(model, ...) first")
    return runtime.report
