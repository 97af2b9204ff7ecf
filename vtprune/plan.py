"""The bound plan: one policy configuration resolved against one model, at wrap.

`build_plan` does everything that can fail before the model is touched: it
finds the adapter, turns names and options into a policy, resolves every
policy against the model (`Policy.bind`: model_zoo.yaml defaults, depth and
layer checks) and derives what the runtime must capture. The policy object
the user gave is never changed; the `Plan` holds the resolved copies.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from torch import nn

from .checks import BadValue, as_user_error
from .patches import Adapter, adapter_for, supported_pixel_then_vit
from .policies.base import POSITION_MODES, Pipeline, Policy, Signals, check_decoder_layer, make_policy


@dataclass(frozen=True, eq=False)
class Plan:
    """A policy bound to one wrapped model: the resolved pipeline and what the runtime needs from the model.

    ``config`` is the configuration as the user gave it (a policy or a
    Pipeline); ``pipeline`` the same policies resolved for this model.
    ``prune_layers`` maps a decoder layer to the (index in the pipeline,
    policy) that prunes before it; a progressive policy (TransPrune) appears
    at several layers. ``signals[i]`` is what policy i reads from the model
    (`Policy.signals`); ``reads`` their union, what the runtime captures.
    """

    adapter: Adapter
    config: Policy | Pipeline
    pipeline: Pipeline
    positions: str
    tokenizer: Any
    prune_layers: dict[int, tuple[int, Policy]]
    signals: tuple[Signals, ...]
    reads: Signals

    @property
    def encoder_policy(self) -> Policy | None:
        """The policy that chooses which patches the vision tower encodes before its first block (PixelPrune), if any."""
        return next((p for p, s in zip(self.pipeline.policies, self.signals) if s.prunes_before_encoder), None)

    @property
    def inside_encoder_policy(self) -> Policy | None:
        """The policy that selects between two blocks of the vision tower (``vit_layer=k``), if any."""
        return next((p for p, s in zip(self.pipeline.policies, self.signals) if s.prunes_inside_encoder), None)

    @property
    def encoder_layer(self) -> int:
        """ViT blocks that run before `inside_encoder_policy` selects (0: none selects inside the tower)."""
        return next((s.encoder_prune[0] for s in self.signals if s.prunes_inside_encoder), 0)

    def sub_blocks(self) -> list[tuple[int, Policy, int]]:
        """(index in the pipeline, policy, decoder layer) of every sub-block observation."""
        return [(i, p, layer) for i, (p, s) in enumerate(zip(self.pipeline.policies, self.signals)) for layer in s.sub_blocks]

    def first_wrapped_layer(self) -> int | None:
        """The first decoder layer whose forward the runtime must see (None: no llm-stage work)."""
        if not self.prune_layers:
            return None
        return min(min(self.prune_layers), min(self.reads.decoder_inputs, default=10**9))

    def rebuild(self, model: nn.Module) -> Plan:
        """The same configuration bound to another model (a deep copy of this one)."""
        return build_plan(model, self.config, None, self.positions, {}, self.tokenizer)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data (what the report records)."""
        policies = self.pipeline.policies
        out = policies[0].to_dict() if len(policies) == 1 else self.pipeline.to_dict()
        return {**out, "positions": self.positions}


def build_plan(model: nn.Module, policy, keep, positions: str, options: dict, tokenizer=None) -> Plan:
    """Everything that can fail, before the model is touched: a ValueError / TypeError here is bad input."""
    try:
        return _build_plan(model, policy, keep, positions, options, tokenizer)
    except (ValueError, TypeError) as err:
        raise as_user_error(err).with_traceback(err.__traceback__) from None


def _build_plan(model: nn.Module, policy, keep, positions: str, options: dict, tokenizer=None) -> Plan:
    adapter = adapter_for(model)
    if tokenizer is not None:
        adapter.set_tokenizer(tokenizer)
    if keep is not None:
        options = {"keep": keep, **options}
    config = make_policy(policy, **options)
    pipeline = config if isinstance(config, Pipeline) else Pipeline([config])
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}; got {positions!r}")
    if positions == "compact" and adapter.mrope:
        raise ValueError(
            f"positions='compact' renumbers 1-D positions; {adapter.model_type} uses M-RoPE rows "
            "(temporal, height, width), so only positions='original' is defined for it"
        )
    bound = pipeline.bind(adapter)  # stage order checked again, now that per-model layers are known
    signals = tuple(p.signals() for p in bound.policies)
    reads = functools.reduce(Signals.union, signals, Signals())
    depth = adapter.num_layers
    for p, s in zip(bound.policies, signals):
        for at in s.prune_before:
            check_decoder_layer(p.describe(), "at_layer", at, depth)
    for p, s in zip(bound.policies, signals):
        for layer in s.decoder_layers_read():
            if not 0 <= layer < depth:
                raise ValueError(f"{p.describe()} reads decoder layer {layer}; the model has layers 0..{depth - 1}")
    attention = adapter.attention_layers()
    for p, s in zip(bound.policies, signals):
        for layer in s.decoder_attention:
            if layer not in attention:
                raise ValueError(
                    f"{p.describe()} reads the attention of decoder layer {layer}, a {adapter.layer_type(layer)} "
                    f"layer of this {adapter.model_type} model (no queries and keys to score); its layers with "
                    f"softmax attention are {list(attention)}: choose the policy's layers so that it reads one of them"
                )
    for p, s in zip(bound.policies, signals):
        if len(s.encoder_prune) > 1:
            raise BadValue(f"{p.describe()}: the vision tower is pruned at one point; got {s.encoder_prune}")
    before = [p.describe() for p, s in zip(bound.policies, signals) if s.prunes_before_encoder]
    inside = [p.describe() for p, s in zip(bound.policies, signals) if s.prunes_inside_encoder]
    for where, names in (("before", before), ("inside", inside)):
        if len(names) > 1:
            raise BadValue(f"only one policy of a Pipeline can prune {where} the vision encoder; got {names}")
    if before and inside and not adapter.pixel_then_vit:
        raise BadValue(
            f"{before[0]} then {inside[0]}: pruning before the vision encoder and again inside it is built for "
            f"{', '.join(supported_pixel_then_vit())}; not yet for {adapter.model_type} (use one of the two)"
        )
    for layer in reads.decoder_queries:
        adapter.query_module(layer)  # the adapter must know where the queries are (raises otherwise)
    return Plan(
        adapter=adapter,
        config=config,
        pipeline=bound,
        positions=positions,
        tokenizer=tokenizer,
        prune_layers={layer: (i, p) for i, (p, s) in enumerate(zip(bound.policies, signals)) for layer in s.prune_before},
        signals=signals,
        reads=reads,
    )
