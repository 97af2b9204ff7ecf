"""The policy interface, the Pipeline that chains policies, and the registry.

A policy is a small frozen dataclass: an immutable configuration (hashable,
comparable, `to_dict()` for reports) that turns a `StageContext` into a keep
set per image. `bind` resolves it against one model (per-model defaults from
model_zoo.yaml, checks against the model's depth) into a new, resolved
policy; the object the user made is never changed, so one policy object can
be wrapped onto several models.

How a policy declares itself (all in its class, nowhere else)
-------------------------------------------------------------
Class constants, read without a model (registry, Pipeline checks, README table):

- ``name``: the registry name (``vtprune.wrap(model, name)``).
- ``stage``: where it prunes: ``"vision"``, ``"projector"`` or ``"llm"``
  (subclass `LLMStagePolicy` for the llm stage; a policy whose options pick
  its stage, as `Random` and `Fixed`, subclasses `AnyStagePolicy`).
- ``paper``: the method's paper and official code, one line (README table).
- ``zoo_fields``: fields whose None means "the model's default": `bind` fills
  them from model_zoo.yaml, then `resolve` checks them against the model.
- ``whole_grid``: True when it reads each image's whole token grid (it must
  come first in a Pipeline). ``after_pixelprune``: such a policy also reads
  the grid that PixelPrune left (its alive tokens, holes where duplicate units
  were dropped), so it may follow policies that act before the encoder
  (``before_encoder``: PixelPrune).
- ``first_llm``: True when it reads layer 0's sequence at its own prune
  points (SparseVLM's raters): no llm-stage policy may come before it.
- ``rounding``: how a fractional ``keep`` becomes a count (``"round"``/``"floor"``).

One method, on the bound policy: `signals()` returns a `Signals` value, the
model signals it reads, as data. The plan checks them against the model
(layer ranges, softmax-attention layers, a query module), the runtime captures
exactly them during prefill, and the `StageContext` serves them:

- ``prune_before``: (llm stage) decoder layers the sequence is pruned before;
  `select` runs once per layer, ``ctx.layer`` says which.
- ``decoder_inputs``: the input hidden states of these decoder layers:
  ``ctx.layer_input(layer)`` (with ``ctx.attention_rows`` for probed attention).
- ``decoder_queries``: these decoder layers' ``q_proj`` outputs:
  ``ctx.queries(layer, b, i)``.
- ``decoder_attention``: layers whose softmax attention it reads (inputs or
  queries above); `wrap` refuses a model whose layer there has none (the
  linear-attention layers of Qwen3.5), naming the layers that have.
- ``sub_blocks``: for each of these decoder layers, the runtime calls the
  policy's `sub_block_statistic` on every sub-block (attention, MLP) in
  prefill: ``ctx.sub_block_stats[(layer, part)]``.
- ``vision_inputs``: the input calls of these ViT layers (0-based):
  ``ctx.vision_attention``, ``vision_keys``, ``vision_cls_attention``,
  ``vision_cls_feature``.
- ``encoder_prune``: ViT blocks the tower's own sequence is pruned before
  (``(0,)``: before the encoder, the only one built): the runtime asks the
  policy's ``encoder_keep(adapter, pixel_values, grid)`` which units the
  tower encodes, and ``ctx.captured["pixel_keep"]`` holds them per call.

The default `signals()` says ``prune_before=(self.at,)`` at the llm stage and
nothing else. A field a policy reads only after `bind` is asked for with
``self.resolved("field", ...)``, which raises the one "bind(adapter) first"
error for an unbound policy.

Converting a policy written against the earlier hooks: ``needs_layer_inputs``
/ ``layer_inputs_needed()`` -> ``decoder_inputs``; ``layer_queries_needed()``
-> ``decoder_queries``; ``attention_layers_needed()`` -> ``decoder_attention``;
``sub_block_layers()`` -> ``sub_blocks``; ``vision_layers_needed()`` ->
``vision_inputs``; ``prune_layers()`` (overridden) -> ``prune_before``;
``needs_whole_grid`` -> ``whole_grid``; ``reference_positions`` is gone; a
"bind(adapter) first" check -> ``self.resolved(...)``; a stage picked by the
options -> `AnyStagePolicy`. Then add the class to `vtprune.policies`'s
``__init__``, a row to tests/families/test_policies_models.py's ``POLICIES`` (a test
checks every registered policy is there) and paste `policy_table()` into the
README (a test checks it). A new kind of signal is a new `Signals` field,
its capture in `vtprune.runtime` (from the plan's union of it) and its
accessor on `StageContext`.

Selection: the common case is a score: implement `score` and the base class
keeps the top ``k`` (ties go to the lowest index). Greedy methods override
`select_image`, methods that pool one selection over all images of a sample
override `select_sample`.

One example per stage (see the modules for the full classes)::

    @register
    @dataclass(frozen=True)
    class HiPrune(Policy):                       # vision stage, reads two ViT layers
        keep: int | float = 64
        object_layer: int | None = None          # 1-based; None: model_zoo.yaml
        name: ClassVar[str] = "hiprune"
        stage: ClassVar[str] = "vision"
        paper: ClassVar[str] = "HiPrune, code Danielement321/HiPrune"
        zoo_fields: ClassVar[tuple[str, ...]] = ("object_layer",)
        whole_grid: ClassVar[bool] = True

        def signals(self) -> Signals:
            obj, deep = self.resolved("object_layer", "deep_layer")
            return Signals(vision_inputs=tuple(sorted({obj - 1, deep - 1})))

    @register
    @dataclass(frozen=True)
    class DivPrune(Policy):                      # projector stage, reads only the merged embeddings
        name: ClassVar[str] = "divprune"
        stage: ClassVar[str] = "projector"       # no signals(): the default reads nothing
        paper: ClassVar[str] = "DivPrune (CVPR 2025), code vbdi/divprune"

    @register
    @dataclass(frozen=True)
    class FastV(PerModelLayerPolicy):            # llm stage, K from model_zoo.yaml (``at_layer``)
        name: ClassVar[str] = "fastv"
        paper: ClassVar[str] = "FastV (ECCV 2024), code pkunlp-icler/FastV"

        def signals(self) -> Signals:
            k = self.resolved("at_layer")
            return Signals(prune_before=(k,), decoder_inputs=(k - 1,), decoder_attention=(k - 1,))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..budget import resolve_budget, validate_keep
from ..checks import BadType, BadValue, as_user_error, check_int
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


@dataclass(frozen=True)
class Signals:
    """What a bound policy reads from the model, and where it prunes (llm stage): the runtime captures these.

    Every field is a tuple of 0-based layer numbers (see the module docstring
    for what each captures and how a policy reads it).
    """

    prune_before: tuple[int, ...] = ()
    decoder_inputs: tuple[int, ...] = ()
    decoder_queries: tuple[int, ...] = ()
    decoder_attention: tuple[int, ...] = ()
    sub_blocks: tuple[int, ...] = ()
    vision_inputs: tuple[int, ...] = ()
    #: ViT blocks the tower's sequence is pruned before (0: before the encoder; the runtime runs the tower on the
    #: units `encoder_keep` keeps)
    encoder_prune: tuple[int, ...] = ()

    def union(self, other: Signals) -> Signals:
        """Both policies' signals: each field the sorted, distinct layers of either."""
        return Signals(
            **{f.name: tuple(sorted({*getattr(self, f.name), *getattr(other, f.name)})) for f in dataclasses.fields(self)}
        )

    def decoder_layers_read(self) -> tuple[int, ...]:
        """Decoder layers something is captured from (their range is checked against the model's depth)."""
        return (*self.decoder_inputs, *self.sub_blocks, *self.decoder_queries)

    @property
    def prunes_before_encoder(self) -> bool:
        """True where the tower encodes only the units this policy keeps (PixelPrune)."""
        return self.encoder_prune == (0,)

    @property
    def prunes_inside_encoder(self) -> bool:
        """True where this policy selects between two blocks of the tower (``vit_layer=k``)."""
        return bool(self.encoder_prune) and self.encoder_prune[0] > 0


@dataclass
class Selection:
    """Kept tokens of one image: indices into its alive tokens, optionally new features and new rows.

    ``values`` (``(k, D)``, same order as ``indices``) replace the kept tokens'
    features, for policies that merge or pool (Pooling, VisionZip, FastVID).
    ``level_values`` (vision/projector stages) replace the kept tokens' rows
    in each per-token feature level the model carries beside the sequence,
    one ``(k, D')`` tensor per level in `StageContext.feature_levels`'s order
    (Qwen3-VL's DeepStack rows merged like the sequence's). ``merged`` (bool
    per index) marks the kept rows that are merges (the report's ``merged``).
    ``inserted`` (``(c, D)``, llm stage only) are rows that were not in the
    sequence, inserted right after the image's current tokens in this order
    (SparseVLM's recycled tokens); row j stands at the alive token
    ``inserted_at[j]``, one the selection does not keep: it takes that token's
    position id (``positions="original"``) and is a visual token of the
    image at later prune points.
    """

    indices: torch.Tensor
    values: torch.Tensor | None = None
    level_values: list[torch.Tensor] | None = None
    merged: torch.Tensor | None = None
    inserted: torch.Tensor | None = None
    inserted_at: torch.Tensor | None = None


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

    #: the registry name
    name: ClassVar[str] = "policy"
    #: where it prunes: "vision", "projector" or "llm"
    stage: ClassVar[str] = "projector"
    #: the method's paper and official code (README's policy table)
    paper: ClassVar[str] = ""
    #: fields whose None is resolved from model_zoo.yaml by `bind` (the same way for every policy)
    zoo_fields: ClassVar[tuple[str, ...]] = ()
    #: True for policies that read each image's whole grid: they must come first in a Pipeline
    whole_grid: ClassVar[bool] = False
    #: True for whole-grid policies that also read the grid PixelPrune leaves: they may follow `before_encoder` ones
    after_pixelprune: ClassVar[bool] = False
    #: True for policies that choose before the vision encoder runs, from the pixels (PixelPrune)
    before_encoder: ClassVar[bool] = False
    #: True for llm-stage policies that read layer 0's sequence at their prune points: first llm stage in a Pipeline
    first_llm: ClassVar[bool] = False
    #: how a fractional keep becomes a count
    rounding: ClassVar[str] = "round"

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
        return {"name": self.name, **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}}

    def signals(self) -> Signals:
        """The model signals this (bound) policy reads; by default only where it prunes (llm stage)."""
        return Signals(prune_before=(self.at,) if self.stage == "llm" and self.at is not None else ())

    def prune_layers(self) -> tuple[int, ...]:
        """Decoder layers the sequence is pruned before (llm stage), increasing; empty for the other stages.

        One layer for most policies (``at``); a progressive policy (TransPrune)
        prunes at several, and `select` is then called once per layer with
        ``ctx.layer`` saying which.
        """
        return self.signals().prune_before

    def require_zoo(self, adapter, *names: str) -> None:
        """A clear error (what is missing, for which model type) when model_zoo.yaml gave no value to fields
        `names` (default: every `zoo_fields` entry) and the user gave none either."""
        missing = [n for n in (names or self.zoo_fields) if getattr(self, n) is None]
        if missing:
            raise ValueError(
                f"{self.name}: model_zoo.yaml has no {', '.join(missing)} for model type {adapter.model_type!r}; "
                f"give {'it' if len(missing) == 1 else 'them'} explicitly"
            )

    def resolved(self, *names: str) -> Any:
        """The fields `names` of a bound policy (one value for one name); the one "bind first" error otherwise."""
        values = tuple(getattr(self, n) for n in names)
        missing = [n for n, v in zip(names, values) if v is None]
        if missing:
            raise RuntimeError(f"{self.name}: {', '.join(missing)} not resolved yet; bind(adapter) first")
        return values[0] if len(values) == 1 else values

    def sub_block_statistic(self, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """A per-token statistic ``(B, L)`` of one sub-block.

        ``x``: the sub-block's input after its norm, ``y``: its output before
        the residual add, both ``(B, L, D)``; ``valid``: ``(B, L)`` bool,
        False at padding.
        """
        raise NotImplementedError(f"{type(self).__name__} observes sub-blocks but has no sub_block_statistic()")

    def encoder_keep(self, adapter: Any, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None) -> torch.Tensor:
        """Bool per unit of one vision-tower call: the units the tower encodes (policies with ``encoder_prune``)."""
        raise NotImplementedError(f"{type(self).__name__} prunes inside the encoder but has no encoder_keep()")

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

    #: None only where a subclass resolves it later (`PerModelLayerPolicy`) or it picks another stage
    #: (`AnyStagePolicy`); this class's check refuses None
    at_layer: int | None = 2
    stage: ClassVar[str] = "llm"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.name, "at_layer", self.at_layer, minimum=1)  # prune between layers at_layer-1 and at_layer

    @property
    def at(self) -> int | None:
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
        return self.resolved("at_layer")


@dataclass(frozen=True)
class AnyStagePolicy(LLMStagePolicy):
    """A policy whose options pick its stage: ``where`` ("vision"/"projector", default projector) or ``at_layer``.

    ``stage`` is then a property of the configuration (``"llm"`` when
    ``at_layer`` is given), fixed once the object is made. Subclasses declare
    the fields ``at_layer: int | None = None`` and ``where: str | None = None``
    themselves (where they stand in the field order).
    """

    if TYPE_CHECKING:  # pragma: no cover
        where: str | None = None

    def __post_init__(self) -> None:
        vit_layer = getattr(self, "vit_layer", None)
        if vit_layer is not None:
            from .vit_layer import check_vit_layer

            check_vit_layer(self.name, vit_layer)
            if self.at_layer is not None or self.where == "projector":
                raise BadValue(
                    f"{self.name}: vit_layer={vit_layer} selects inside the vision encoder; it cannot be combined "
                    f"with {'at_layer' if self.at_layer is not None else 'where=' + repr(self.where)}"
                )
        if self.at_layer is None:
            Policy.__post_init__(self)
            if self.where not in (None, "vision", "projector"):
                raise ValueError(
                    f"{self.name}: where must be 'vision' or 'projector' (or give at_layer=k for the llm stage); "
                    f"got {self.where!r}"
                )
        else:
            LLMStagePolicy.__post_init__(self)
            if self.where is not None:
                raise ValueError(
                    f"{self.name}: where={self.where!r} and at_layer={self.at_layer} name two stages; give "
                    "at_layer for the llm stage or where for the vision/projector stage, not both"
                )

    @property
    def stage(self) -> str:  # type: ignore[override]
        if getattr(self, "vit_layer", None) is not None:
            return "vision"
        return "llm" if self.at_layer is not None else (self.where or "projector")

    def resolve(self, adapter) -> Policy:
        from .vit_layer import resolve_vit_layer

        resolve_vit_layer(self.name, adapter, getattr(self, "vit_layer", None))
        return self

    def signals(self) -> Signals:
        vit_layer = getattr(self, "vit_layer", None)
        if vit_layer is not None:
            return Signals(encoder_prune=(vit_layer,))
        return super().signals()

    @property
    def at(self) -> int | None:
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

    policies: Sequence[Policy] = field(default_factory=tuple)  # a tuple once made

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
                f"Pipeline stages must go forward (vision, projector, then llm layers in increasing order); got {got}"
            )
        layers = [layer for stage, layer in order if stage == STAGES.index("llm") and layer]
        if len(set(layers)) != len(layers):
            raise ValueError(
                f"Pipeline policies prune before decoder layers {layers}; two policies cannot prune at the same layer"
            )
        for position, p in enumerate(self.policies):
            after_pixels = p.after_pixelprune and all(q.before_encoder for q in self.policies[:position])
            if position and p.whole_grid and not after_pixels:
                also = " or right after pixelprune" if p.after_pixelprune else ""
                raise ValueError(
                    f"{p.describe()} reads each image's whole token grid; put it first in a Pipeline{also} "
                    f"(it is at position {position} of {', '.join(q.stage_key for q in self.policies)})"
                )
            if p.first_llm and any(q.stage == "llm" for q in self.policies[:position]):
                raise ValueError(
                    f"{p.describe()} reads layer 0's sequence at its prune points; put it before every other "
                    f"llm-stage policy in a Pipeline (got {', '.join(q.stage_key for q in self.policies)})"
                )

    def bind(self, adapter) -> Pipeline:
        """Every policy resolved for one model, and the stage order checked again with the resolved layers."""
        return Pipeline([p.bind(adapter) for p in self.policies])

    def to_dict(self) -> dict[str, Any]:
        return {"name": "pipeline", "policies": [p.to_dict() for p in self.policies]}

    @staticmethod
    def _points(p: Policy) -> list[tuple[int, int]]:
        """Where `p` acts, as (stage, layer) pairs: one per prune layer at the llm stage (layer 0 while unresolved)."""
        stage = STAGES.index(p.stage)
        if p.stage == "llm" and all(getattr(p, f) is not None for f in p.zoo_fields):
            return [(stage, layer) for layer in p.prune_layers()] or [(stage, p.at or 0)]
        return [(stage, p.at or 0)]

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


def policy_table() -> str:
    """The README's policy table, from the registry: name, stage, paper and code, per-model (zoo) fields.

    Regenerate with ``python -c "from vtprune.policies import policy_table; print(policy_table())"``;
    a test checks that the README holds exactly this table.
    """
    rows = ["| policy | stage | paper, official code | from model_zoo.yaml when None |", "|---|---|---|---|"]
    for name in available_policies():
        cls = _REGISTRY[name]
        stage = "any (`where=`, `at_layer=`)" if issubclass(cls, AnyStagePolicy) else f"`{cls.stage}`"
        if cls.whole_grid:
            stage += ", whole grid (first in a Pipeline" + (", or after `pixelprune`)" if cls.after_pixelprune else ")")
        zoo = ", ".join(f"`{f}`" for f in cls.zoo_fields) or "-"
        rows.append(f"| `{name}` | {stage} | {cls.paper or '-'} | {zoo} |")
    return "\n".join(rows)


def policy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """The commands' ``NAME`` or ``NAME:VARIANT`` (``idpruner:norm``) -> (name, options): the variant is ``importance``."""
    name, _, variant = spec.partition(":")
    return name, ({"importance": variant} if variant else {})


def unknown_policy(names: list[str], variants: bool = False) -> str | None:
    """``"unknown policy 'X'; available: ..."`` for the first of `names` not in the registry, or None.

    With `variants`, ``name:variant`` (the commands' ``idpruner:norm``) is checked by its name.
    """
    known = available_policies()
    for name in names:
        if (policy_spec(name)[0] if variants else name) not in known:
            return f"unknown policy {name!r}; available: {', '.join(known)}"
    return None


def make_policy(policy: str | Policy | Pipeline, **options) -> Policy | Pipeline:
    """A policy object from a registry name and options, or the given object."""
    if isinstance(policy, (Policy, Pipeline)):
        if options:
            raise BadType(f"options {sorted(options)} were given with a policy object; set them on the object instead")
        return policy
    if not isinstance(policy, str):
        raise BadType(f"policy must be a name from {available_policies()} or a vtprune policy object; got {policy!r}")
    if policy not in _REGISTRY:
        raise BadValue(f"unknown policy {policy!r}; available: {', '.join(available_policies())}")
    cls = _REGISTRY[policy]
    try:
        return cls(**options)
    except TypeError as err:
        fields = sorted(f.name for f in dataclasses.fields(cls) if f.init)  # the options, not class constants
        raise BadType(f"bad options for policy {policy!r}: {err}; it accepts {fields}") from None
    except ValueError as err:  # a policy's own check of an option's value
        raise as_user_error(err).with_traceback(err.__traceback__) from None
