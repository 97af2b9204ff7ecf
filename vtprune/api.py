"""The public API: wrap, unwrap, pruned, report."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .patches import adapter_for
from .policies.base import POSITION_MODES, Pipeline, Policy, make_policy
from .report import Report
from .runtime import Runtime

_ATTR = "_vtprune_runtime"


def _runtime(model: nn.Module) -> Runtime | None:
    return model.__dict__.get(_ATTR)


def _build(model: nn.Module, policy, keep, positions: str, options: dict, tokenizer=None) -> Runtime:
    """Everything that can fail, before the model is touched."""
    adapter = adapter_for(model)
    if tokenizer is not None:
        adapter.set_tokenizer(tokenizer)
    if keep is not None:
        options = {"keep": keep, **options}
    policy = make_policy(policy, **options)
    pipeline = policy if isinstance(policy, Pipeline) else Pipeline([policy])
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}; got {positions!r}")
    if positions == "compact" and adapter.mrope:
        raise ValueError(
            f"positions='compact' renumbers 1-D positions; {adapter.model_type} uses M-RoPE rows "
            "(temporal, height, width), so only positions='original' is defined for it"
        )
    for p in pipeline.policies:
        p.bind(adapter)
    pipeline = Pipeline(pipeline.policies)  # stage order again, now that per-model layers are known
    depth = adapter.num_layers
    for p in pipeline.llm():
        for at in p.prune_layers():
            if not 1 <= at < depth:
                raise ValueError(
                    f"{p.describe()}: at_layer={at} is outside this model's decoder (layers 0..{depth - 1}); "
                    f"allowed: 1..{depth - 1}"
                )
    for p in pipeline.policies:
        for layer in (*p.layer_inputs_needed(), *p.sub_block_layers()):
            if not 0 <= layer < depth:
                raise ValueError(f"{p.describe()} reads decoder layer {layer}; the model has layers 0..{depth - 1}")
    return Runtime(adapter, pipeline, positions)


def wrap(model: nn.Module, policy: str | Policy | Pipeline, keep: int | float | None = None, *,
         positions: str = "original", tokenizer=None, **options) -> nn.Module:
    """Prune visual tokens of `model` in prefill with `policy`; returns the same model object.

    ``keep``: tokens per image (int) or a fraction of each image's tokens (float
    in (0, 1]). ``positions``: ``"original"`` (kept tokens keep their position
    ids) or ``"compact"`` (renumbered, 1-D RoPE models only). ``tokenizer`` (or
    the processor) lets text-conditioned policies see only the user's question,
    without the chat template's assistant prefix. Other options go to the
    policy. Wrapping a wrapped model replaces its policy. Invalid input raises
    before anything is changed.
    """
    runtime = _build(model, policy, keep, positions, options, tokenizer)
    unwrap(model)
    try:
        runtime.install()
    except BaseException:
        runtime.remove()
        raise
    model.__dict__[_ATTR] = runtime
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Remove every hook and bound method vtprune installed; the model behaves exactly as before."""
    runtime = model.__dict__.pop(_ATTR, None)
    if runtime is not None:
        runtime.remove()
    return model


def is_wrapped(model: nn.Module) -> bool:
    return _runtime(model) is not None


@contextmanager
def pruned(model: nn.Module, policy: str | Policy | Pipeline, keep: int | float | None = None, *,
           positions: str = "original", tokenizer=None, **options) -> Iterator[nn.Module]:
    """Scoped `wrap`: the model is pruned inside the ``with`` block and restored after it.

    A policy the model was already wrapped with comes back afterwards.
    """
    previous = _runtime(model)
    runtime = _build(model, policy, keep, positions, options, tokenizer)
    if previous is not None:
        previous.remove()
        del model.__dict__[_ATTR]
    try:
        runtime.install()
        model.__dict__[_ATTR] = runtime
        yield model
    finally:
        unwrap(model)
        runtime.remove()
        if previous is not None:
            previous.install()
            model.__dict__[_ATTR] = previous


def report(model: nn.Module) -> Report:
    """The report of the model's last prefill (tokens per image and stage, kept indices, timing)."""
    runtime = _runtime(model)
    if runtime is None:
        raise ValueError(f"{type(model).__name__} is not wrapped by vtprune; call vtprune.wrap(model, ...) first")
    return runtime.report
