"""The public API: wrap, unwrap, pruned, report."""

from __future__ import annotations

import copy
import types
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .plan import build_plan
from .policies.base import Pipeline, Policy
from .report import Report
from .runtime import Runtime

_ATTR = "_vtprune_runtime"


def _runtime(model: nn.Module) -> Runtime | None:
    return model.__dict__.get(_ATTR)


def _attach(model: nn.Module, runtime: Runtime) -> None:
    """Install `runtime` on `model`; on failure nothing of it is left."""
    try:
        runtime.install()
    except BaseException:
        runtime.remove()
        raise
    model.__dict__[_ATTR] = runtime
    # copy.deepcopy looks __deepcopy__ up on the instance: a copy gets its own hooks, bound to itself
    model.__dict__["__deepcopy__"] = types.MethodType(_deepcopy_wrapped, model)
    # pickle (torch.save, multiprocessing) also looks __reduce_ex__ up on the instance: refuse clearly
    model.__dict__["__reduce_ex__"] = types.MethodType(_refuse_pickle, model)


def _detach(model: nn.Module) -> Runtime | None:
    runtime = model.__dict__.pop(_ATTR, None)
    model.__dict__.pop("__deepcopy__", None)
    model.__dict__.pop("__reduce_ex__", None)
    if runtime is not None:
        runtime.remove()
    return runtime


def _deepcopy_wrapped(model: nn.Module, memo: dict) -> nn.Module:
    """`copy.deepcopy` of a wrapped model: an independent model wrapped with the same policy.

    The bound forwards close over the original's modules, so they are not
    copied: the original is unwrapped for the copy (bit-exact), rewrapped
    after it, and the copy is wrapped with the same configuration.
    """
    runtime = _detach(model)
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


def wrap(model: nn.Module, policy: str | Policy | Pipeline, keep: int | float | None = None, *,
         positions: str = "original", tokenizer=None, **options) -> nn.Module:
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
    runtime = Runtime(build_plan(model, policy, keep, positions, options, tokenizer))
    previous = _detach(model)
    try:
        _attach(model, runtime)
    except BaseException:
        if previous is not None:
            _attach(model, previous)
        raise
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Remove every hook and bound method vtprune installed; the model behaves exactly as before."""
    _detach(model)
    return model


def is_wrapped(model: nn.Module) -> bool:
    return _runtime(model) is not None


@contextmanager
def pruned(model: nn.Module, policy: str | Policy | Pipeline, keep: int | float | None = None, *,
           positions: str = "original", tokenizer=None, **options) -> Iterator[nn.Module]:
    """Scoped `wrap`: the model is pruned inside the ``with`` block and restored after it.

    A policy the model was already wrapped with comes back afterwards.
    """
    runtime = Runtime(build_plan(model, policy, keep, positions, options, tokenizer))
    previous = _detach(model)
    try:
        _attach(model, runtime)
        yield model
    finally:
        _detach(model)
        if previous is not None:
            _attach(model, previous)


def report(model: nn.Module) -> Report:
    """The report of the model's last call (tokens per image and stage, kept indices, timing, the bound policy)."""
    runtime = _runtime(model)
    if runtime is None:
        raise ValueError(f"{type(model).__name__} is not wrapped by vtprune; call vtprune.wrap(model, ...) first")
    return runtime.report
