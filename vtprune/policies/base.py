"""The policy interface, the Pipeline that chains policies, and the registry.

A policy is a small frozen dataclass: an immutable configuration (hashable,
comparable, `to_dict()` for reports) that declares where it acts (``stage``)
and turns a `StageContext` into a keep set per image. `bind` resolves it
against one model (per-model defaults from model_zoo.yaml, checks against the
model's depth) into a new, resolved policy; the object the user made is never
changed, so one policy object can be wrapped onto several models. The common case is a
score: implement `score` and the base class keeps the top ``k`` (ties go to
the lowest index). Greedy methods override `select_image`, methods that pool
one selection over all images of a sample override `select_sample`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..budget import resolve_budget, validate_keep
from ..checks import check_int
from ..context import StageContext
from ..ops.select import topk_indices

STAGES = ("vision", "projector", "llm")
POSITION_MODES = ("original", "compact")


def probe_depth(adapter, who: str) -> int:
    """Number of the adapter's ViT layers, or a ValueError naming `who` when its ViT attention probe is missing."""
    try:
        return len(adapter.vision_layers())
    except NotImplementedError as err:
        raise ValueError(f"{who} needs the ViT attention probe: {err}") from None


@dataclass
class Selection:
    """Kept tokens of one image: indices into its alive tokens, optionally new features.

    ``values`` (``(k, D)``, same order as ``indices``) replace the kept tokens'
    features, for policies that merge or pool (Pooling, VisionZip).
    """

    indices: torch.Tensor
    values: torch.Tensor | None = None


@dataclass(frozen=True)
class Policy:
    """Base of every pruning policy: an immutable configuration.

    Subclasses are ``@dataclass(frozen=True)``; `__post_init__` may normalise
    fields with `_set`. Fields listed in ``zoo_fields`` mean "the model's
    default" when None: `bind` fills them from model_zoo.yaml (family, then a
    matching ``checkpoints:`` entry) and `resolve` checks the result against
    the model, both into a new object.

    Parameters:
        keep: tokens per image (int >= 1) or fraction of each image's tokens
            (float in (0, 1]).
    """

    keep: int | float = 64

    name: ClassVar[str] = "policy"
    stage: ClassVar[str] = "projector"
    rounding: ClassVar[str] = "round"
    #: decoder layers whose input hidden states the policy reads (llm stage)
    needs_layer_inputs: ClassVar[tuple[int, ...]] = ()
    #: the positions the policy's reference implementation uses
    reference_positions: ClassVar[str] = "original"
    #: fields whose None is resolved from model_zoo.yaml by `bind` (the same way for every policy)
    zoo_fields: ClassVar[tuple[str, ...]] = ()
    #: True for policies that read each image's whole grid: they must come first in a Pipeline
    needs_whole_grid: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self._set("keep", validate_keep(self.keep))

    def _set(self, name: str, value: Any) -> None:
        """Normalise a field while the frozen object is being built."""
        object.__setattr__(self, name, value)

    @property
    def at(self) -> int | None:
        """Decoder layer the sequence is pruned before (llm stage), else None."""
        return None

    @property
    def stage_key(self) -> str:
        return f"llm@{self.at}" if self.stage == "llm" else self.stage

    def bind(self, adapter) -> Policy:
        """This configuration resolved for one model (called by `wrap`); `self` is left unchanged.

        None-valued ``zoo_fields`` take the model's defaults from model_zoo.yaml,
        then `resolve` derives and checks what needs the model. Every error
        is raised here, before any hook is installed.
        """
        from ..zoo import adapter_defaults

        defaults = adapter_defaults(adapter, self.name) if self.zoo_fields else {}
        changes = {f: defaults[f] for f in self.zoo_fields if getattr(self, f) is None and defaults.get(f) is not None}
        bound = dataclasses.replace(self, **changes) if changes else self
        return bound.resolve(adapter)

    def resolve(self, adapter) -> Policy:
        """Fill what the model alone determines and check the policy against it (a new object, or `self`)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain JSON-able data: ``{"name": ..., field: value, ...}``."""
        return {"name": self.name, **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    def layer_inputs_needed(self) -> tuple[int, ...]:
        return self.needs_layer_inputs

    def vision_layers_needed(self) -> tuple[int, ...]:
        """Vision-encoder layers (0-based) whose input hidden states the policy reads."""
        return ()

    def layer_queries_needed(self) -> tuple[int, ...]:
        """Decoder layers whose ``q_proj`` output the policy reads (captured in prefill, not recomputed)."""
        return ()

    def attention_layers_needed(self) -> tuple[int, ...]:
        """Decoder layers whose softmax attention (queries, keys) the policy reads.

        `wrap` refuses a model whose layer there has none (a linear-attention
        layer of a hybrid model such as Qwen3.5), naming the layers that have.
        """
        return ()

    def prune_layers(self) -> tuple[int, ...]:
        """Decoder layers the sequence is pruned before (llm stage), increasing; empty for the other stages.

        One layer for most policies (``at``); a progressive policy (TransPrune)
        prunes at several, and `select` is then called once per layer with
        ``ctx.layer`` saying which.
        """
        return (self.at,) if self.stage == "llm" and self.at is not None else ()

    def sub_block_layers(self) -> tuple[int, ...]:
        """Decoder layers whose sub-blocks (attention, MLP) the policy observes in prefill.

        For each, the runtime calls `sub_block_statistic` on every sub-block's
        input and output and keeps the result aligned with the sequence
        (re-indexed at every prune point): ``ctx.sub_block_stats``.
        """
        return ()

    def sub_block_statistic(self, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """A per-token statistic ``(B, L)`` of one sub-block.

        ``x``: the sub-block's input after its norm, ``y``: its output before
        the residual add, both ``(B, L, D)``; ``valid``: ``(B, L)`` bool,
        False at padding.
        """
        raise NotImplementedError(f"{type(self).__name__} observes sub-blocks but has no sub_block_statistic()")

    def image_budget(self, ctx: StageContext, b: int, i: int) -> int:
        n_alive = int(ctx.alive[b][i].numel())
        n_original = ctx.layouts[b].images[i].num_tokens
        return resolve_budget(self.keep, n_alive, n_original, self.rounding)

    def select(self, ctx: StageContext) -> list[list[Selection]]:
        """Keep sets for every image of every sample: ``[sample][image]``."""
        return [self.select_sample(ctx, b) for b in range(ctx.batch_size)]

    def select_sample(self, ctx: StageContext, b: int) -> list[Selection]:
        return [self.select_image(ctx, b, i, self.image_budget(ctx, b, i)) for i in range(ctx.num_images(b))]

    def select_image(self, ctx: StageContext, b: int, i: int, k: int) -> Selection:
        return Selection(topk_indices(self.score(ctx, b, i), k))

    def score(self, ctx: StageContext, b: int, i: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score() or select_image()")

    def describe(self) -> str:
        return self.name


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@dataclass(frozen=True)
class LLMStagePolicy(Policy):
    """A policy that prunes between decoder layers ``at_layer - 1`` and ``at_layer`` (0-based).

    ``at_layer=2`` means layers 0-1 see every visual token and layers 2.. see
    the kept set.
    """

    at_layer: int = 2
    stage: ClassVar[str] = "llm"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.name, "at_layer", self.at_layer, minimum=1)  # prune between layers at_layer-1 and at_layer

    @property
    def at(self) -> int:
        return self.at_layer


@dataclass(frozen=True)
class PerModelLayerPolicy(LLMStagePolicy):
    """An llm-stage policy whose layer K, when ``at_layer`` is None, is the model's default from model_zoo.yaml.

    `bind` returns a copy with K resolved for the wrapped model and checked against the depth.
    """

    at_layer: int | None = None
    zoo_fields: ClassVar[tuple[str, ...]] = ("at_layer",)

    def __post_init__(self) -> None:
        if self.at_layer is None:
            Policy.__post_init__(self)
        else:
            super().__post_init__()

    @property
    def at(self) -> int | None:
        """K once known: ``at_layer`` (given, or the per-model default in a bound copy)."""
        return self.at_layer

    def resolve(self, adapter) -> Policy:
        at = self.at_layer
        if at is None:
            raise ValueError(
                f"{self.name}: model_zoo.yaml has no reference layer for model type {adapter.model_type!r}; "
                "give at_layer explicitly"
            )
        check_decoder_layer(self.name, "at_layer", at, adapter.num_layers)
        return self

    def resolved_layer(self) -> int:
        if self.at_layer is None:
            raise RuntimeError(f"{self.name}: at_layer is not resolved yet; bind(adapter) first")
        return self.at_layer


def check_decoder_layer(who: str, name: str, layer: int, depth: int) -> None:
    """The one range check of a prune layer: decoder layers 1..depth-1 (layer 0 sees the whole sequence)."""
    if not 1 <= layer < depth:
        raise ValueError(
            f"{who}: {name}={layer} is past the model's depth; this model has {depth} decoder "
            f"layers 0..{depth - 1}, so {name} must be in [1, {depth - 1}]"
        )


@dataclass(frozen=True)
class Pipeline:
    """Several policies applied in order, e.g. ``Pipeline([DivPrune(keep=284), Random(at_layer=20, keep=38)])``.

    Stages must not go backwards (vision, then projector, then llm layers in
    increasing order); a later stage sees only the tokens earlier ones kept.
    """

    policies: tuple[Policy, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "policies", tuple(self.policies))
        if not self.policies:
            raise ValueError("Pipeline needs at least one policy; got an empty list")
        for p in self.policies:
            if isinstance(p, Pipeline):
                raise TypeError("a Pipeline cannot contain a Pipeline; list the policies flat")
            if not isinstance(p, Policy):
                raise TypeError(f"Pipeline items must be vtprune policies; got {p!r} of type {type(p).__name__}")
        order = [point for p in self.policies for point in self._points(p)]
        if order != sorted(order):
            got = ", ".join(p.stage_key for p in self.policies)
            raise ValueError(
                f"Pipeline stages must go forward (vision, projector, then llm layers in increasing order); "
                f"got {got}"
            )
        layers = [layer for stage, layer in order if stage == STAGES.index("llm") and layer]
        if len(set(layers)) != len(layers):
            raise ValueError(
                f"Pipeline policies prune before decoder layers {layers}; two policies cannot prune at the same layer"
            )
        for position, p in enumerate(self.policies):
            if position and p.needs_whole_grid:
                raise ValueError(
                    f"{p.describe()} reads each image's whole token grid; put it first in a Pipeline "
                    f"(it is at position {position} of {', '.join(q.stage_key for q in self.policies)})"
                )

    def bind(self, adapter) -> Pipeline:
        """Every policy resolved for one model, and the stage order checked again with the resolved layers."""
        return Pipeline([p.bind(adapter) for p in self.policies])

    def to_dict(self) -> dict[str, Any]:
        return {"name": "pipeline", "policies": [p.to_dict() for p in self.policies]}

    @staticmethod
    def _points(p: Policy) -> list[tuple[int, int]]:
        """Where `p` acts, as (stage, layer) pairs: one per prune layer at the llm stage (layer 0 while unresolved)."""
        return [(STAGES.index(p.stage), layer) for layer in p.prune_layers()] or [(STAGES.index(p.stage), p.at or 0)]

    def early(self) -> list[Policy]:
        """Policies applied before the first decoder layer (vision and projector stages)."""
        return [p for p in self.policies if p.stage != "llm"]

    def llm(self) -> list[Policy]:
        return [p for p in self.policies if p.stage == "llm"]

    def describe(self) -> str:
        return " -> ".join(p.describe() for p in self.policies)


_REGISTRY: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def available_policies() -> list[str]:
    """Names accepted by `vtprune.wrap`."""
    return sorted(_REGISTRY)


def unknown_policy(names: list[str], variants: bool = False) -> str | None:
    """``"unknown policy 'X'; available: ..."`` for the first of `names` not in the registry, or None.

    With `variants`, ``name:variant`` (the commands' ``idpruner:norm``) is checked by its name.
    """
    known = available_policies()
    for name in names:
        if (name.partition(":")[0] if variants else name) not in known:
            return f"unknown policy {name!r}; available: {', '.join(known)}"
    return None


def make_policy(policy: str | Policy | Pipeline, **options) -> Policy | Pipeline:
    """A policy object from a registry name and options, or the given object."""
    if isinstance(policy, (Policy, Pipeline)):
        if options:
            raise TypeError(
                f"options {sorted(options)} were given with a policy object; set them on the object instead"
            )
        return policy
    if not isinstance(policy, str):
        raise TypeError(
            f"policy must be a name from {available_policies()} or a vtprune policy object; got {policy!r}"
        )
    if policy not in _REGISTRY:
        raise ValueError(f"unknown policy {policy!r}; available: {', '.join(available_policies())}")
    cls = _REGISTRY[policy]
    try:
        return cls(**options)
    except TypeError as err:
        fields = sorted(f.name for f in dataclasses.fields(cls) if f.init)  # the options, not class constants
        raise TypeError(f"bad options for policy {policy!r}: {err}; it accepts {fields}") from None
