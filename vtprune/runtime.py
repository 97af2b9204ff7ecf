"""The pruning runtime: binds a policy to one model instance and prunes in prefill.

Data path (SPEC section 3): a pre-hook on the base model records the batch's
inputs; the language model's forward (replaced on the instance) builds the
visual layout, runs the vision/projector-stage policies on the merged input
embeddings, compacts every sequence tensor and calls the original forward on
the shorter sequence. LLM-stage policies run inside wrapped decoder layers
(one policy may prune at several); policies that observe sub-blocks (TTV)
get forward hooks on them that do work in prefill only.
Decode steps never re-score: they translate the growing 2-D attention mask
to the kept columns of each cache level and fix positions where HF derives
them from the (pruned) cache length.
"""

from __future__ import annotations

import inspect
import time
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .compaction import gather_seq, keep_index
from .context import LayerCall, StageContext
from .layout import SampleLayout
from .policies.base import Pipeline, Policy, Selection
from .report import Report


@dataclass
class Level:
    """One stretch of decoder layers that sees the same (pruned) sequence.

    Level 0 starts at layer 0 (after the vision/projector stages); each
    llm-stage prune point starts a new level. ``mask2d`` is the 2-D padding
    mask of the prefill tokens the level's caches hold; ``removed`` counts,
    per sample, the valid prefill tokens dropped up to this level.
    """

    layer: int
    mask2d: torch.Tensor
    removed: torch.Tensor
    # set per forward call for levels above 0
    masks: dict[str, Any] = field(default_factory=dict)
    position_embeddings: Any = None
    position_ids: torch.Tensor | None = None


@dataclass
class PrefillState:
    """What a prefill leaves for the decode steps that follow it."""

    full_len: int
    levels: list[Level]
    layouts: list[SampleLayout]
    alive: list[list[torch.Tensor]]
    seq_positions: list[list[torch.Tensor]]
    question_positions: list[torch.Tensor]
    pad_left: bool = True
    prefill: bool = True
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_q: dict[int, torch.Tensor] = field(default_factory=dict)
    #: per policy (its index in the pipeline): ``(layer, part) -> (B, L)`` sub-block statistics
    sub_block_stats: dict[int, dict[tuple[int, str], torch.Tensor]] = field(default_factory=dict)
    inputs_embeds: torch.Tensor | None = None

    def level_for(self, layer: int) -> Level:
        current = self.levels[0]
        for level in self.levels:
            if level.layer <= layer:
                current = level
        return current


class Runtime:
    """Hooks and instance-bound forwards of one wrapped model; `remove` undoes all of them."""

    def __init__(self, adapter, pipeline: Pipeline, positions: str = "original") -> None:
        self.adapter = adapter
        self.pipeline = pipeline
        self.positions = positions
        self.outer: dict[str, Any] | None = None
        self.captured: dict[str, Any] = {}
        self.vision: dict[str, Any] = {"calls": [], "pre_projector": [], "layers": {}}
        self._vision_used = False
        self._lm_signature: inspect.Signature | None = None
        self.state: PrefillState | None = None
        self.report = Report(policy=pipeline.describe(), samples=[])
        self._handles: list[Any] = []
        self._bound: list[tuple[torch.nn.Module, Any]] = []
        # decoder layer -> (index in the pipeline, policy) that prunes before it; a progressive policy
        # (TransPrune) appears at several layers (the Pipeline refuses two policies at one layer)
        self.prune_layers: dict[int, tuple[int, Policy]] = {
            layer: (index, p) for index, p in enumerate(pipeline.policies) for layer in p.prune_layers()
        }
        needed, queries, vision_layers = set(), set(), set()
        for p in pipeline.policies:
            needed.update(p.layer_inputs_needed())
            queries.update(p.layer_queries_needed())
            vision_layers.update(p.vision_layers_needed())
        self.needed_inputs = needed
        self.needed_queries = queries
        self.needed_vision_layers = vision_layers

    # ------------------------------------------------------------------ install
    def install(self) -> None:
        base = self.adapter.base
        base_sig = inspect.signature(base.forward)

        def record(_module, args, kwargs):
            outer = dict(base_sig.bind_partial(*args, **kwargs).arguments)
            outer.update(outer.pop("kwargs", {}) or {})
            self.outer = outer

        def clear(_module, _args, _kwargs, _output):
            self.outer = None

        self._handles.append(base.register_forward_pre_hook(record, with_kwargs=True))
        self._handles.append(base.register_forward_hook(clear, with_kwargs=True, always_call=True))
        self._install_vision_capture()
        for idx in sorted(self.needed_queries):
            self._handles.append(
                self.adapter.decoder_layers[idx].self_attn.q_proj.register_forward_hook(self._grab_queries(idx))
            )
        for index, policy in enumerate(self.pipeline.policies):
            for idx in policy.sub_block_layers():
                for part, module in self.adapter.sub_blocks(idx):
                    hook = self._observe_sub_block(index, policy, idx, part)
                    self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

        lm = self.adapter.language_model
        self._bind(lm, self._lm_forward)
        if self.prune_layers:
            first = min(min(self.prune_layers), min(self.needed_inputs, default=10**9))
            for idx, layer in enumerate(self.adapter.decoder_layers):
                if idx >= first:
                    self._bind(layer, self._layer_forward_for(idx))

    def _grab_queries(self, idx: int):
        def grab(_module, _args, output):
            if self.state is not None and self.state.prefill:
                self.state.layer_q[idx] = output

        return grab

    def _observe_sub_block(self, index: int, policy: Policy, idx: int, part: str):
        """Forward hook on a sub-block: the policy's statistic of its input and output, in prefill only."""

        def observe(_module, args, kwargs, output):
            state = self.state
            if state is None or not state.prefill:
                return
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            valid = state.level_for(idx).mask2d.bool()
            state.sub_block_stats.setdefault(index, {})[(idx, part)] = policy.sub_block_statistic(x, y, valid)

        return observe

    def _install_vision_capture(self) -> None:
        """Record the vision encoder's calls and the projector's inputs.

        `generate` may encode images before the first forward and hand the
        result over as ``mm_encoder_outputs`` (without ``pixel_values`` or
        ``image_sizes``), so what the encoder saw is kept until the next
        encoder call rather than per forward.
        """
        base = self.adapter.base

        def fresh():
            if self._vision_used:
                self.vision = {"calls": [], "pre_projector": [], "layers": {}}
                self._vision_used = False

        def grab(_module, args):
            fresh()
            self.vision["pre_projector"].append(args[0])

        for name in self.adapter.vision_methods:
            method = getattr(base, name, None)
            if method is None:
                continue
            sig = inspect.signature(method)

            def call(original, *args, _sig=sig, _name=name, **kwargs):
                fresh()
                bound = _sig.bind_partial(*args, **kwargs).arguments
                meta = {k: v for k, v in bound.items() if k in self.adapter.grid_keys}
                self.vision["calls"].append({"method": _name, **meta})
                return original(*args, **kwargs)

            self._bind(base, call, attr=name)
        self._handles.append(self.adapter.projector_module().register_forward_pre_hook(grab))
        if self.needed_vision_layers:
            layers = self.adapter.vision_layers()
            for j in sorted(self.needed_vision_layers):

                def grab_layer(_module, args, kwargs, _j=j):
                    fresh()
                    # the Qwen ViT blocks get their attention segments and rotary tables as keyword arguments
                    self.vision["layers"].setdefault(_j, []).append(LayerCall(args, kwargs))

                self._handles.append(layers[j].register_forward_pre_hook(grab_layer, with_kwargs=True))

        def expand(original, *args, **kwargs):
            # generate() repeats each sample after encoding the images (beams, num_return_sequences)
            sig = inspect.signature(original).bind_partial(*args, **kwargs).arguments
            size, ids = sig.get("expand_size", 1), sig.get("input_ids")
            if size > 1 and ids is not None and self.vision["calls"]:
                self.vision["expand"] = (size, ids)
            return original(*args, **kwargs)

        if hasattr(self.adapter.model, "_expand_inputs_for_generation"):
            self._bind(self.adapter.model, expand, attr="_expand_inputs_for_generation")

    def _bind(self, module: torch.nn.Module, fn, attr: str = "forward") -> None:
        """Replace ``module.<attr>`` on this instance only; `remove` restores it."""
        previous = module.__dict__.get(attr)
        original = getattr(module, attr)

        def bound(_self, *args, **kwargs):
            return fn(original, *args, **kwargs)

        # Keep the original signature visible: generate() inspects it to route inputs.
        sig = inspect.signature(original)
        this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        bound.__signature__ = sig.replace(parameters=[this, *sig.parameters.values()])
        setattr(module, attr, types.MethodType(bound, module))
        self._bound.append((module, attr, previous))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module, attr, previous in reversed(self._bound):
            if previous is None:
                delattr(module, attr)
            else:
                setattr(module, attr, previous)
        self._handles.clear()
        self._bound.clear()
        self.state = None

    # ----------------------------------------------------------- language model
    def _lm_forward(self, original, *args, **kwargs):
        if self._lm_signature is None:
            self._lm_signature = inspect.signature(original)
        bound = self._lm_signature.bind_partial(*args, **kwargs).arguments
        extra = bound.pop("kwargs", {}) or {}
        cache = bound.get("cache")
        embeds = bound.get("inputs_embeds")
        if embeds is None or self.outer is None:
            return original(*args, **kwargs)
        prefill = cache is None or cache.get_seq_length() == 0
        if not prefill:
            call = self._decode(bound, embeds) if self.state is not None else bound
            return original(**call, **extra)
        if self.outer.get("input_ids") is None:
            warnings.warn(
                "vtprune: a prefill given only inputs_embeds is not pruned (visual spans are found from input_ids)",
                RuntimeWarning,
                stacklevel=2,
            )
        self.state = None
        self.captured = self._prefill_inputs()
        call = self._prefill(bound, embeds)
        try:
            return original(**call, **extra)
        finally:
            if self.state is not None:
                self.state.prefill = False
                self.state.layer_inputs.clear()
                self.state.layer_q.clear()
                self.state.sub_block_stats.clear()

    def _prefill_inputs(self) -> dict[str, Any]:
        """The base forward's inputs, completed with what the vision encoder was called with."""
        captured = {k: v for k, v in self.outer.items() if v is not None}
        for call in self.vision["calls"]:
            for key, value in call.items():
                if key != "method" and value is not None:
                    captured.setdefault(key, value)
        captured["vision_calls"] = self.vision["calls"]
        captured["pre_projector"] = self.vision["pre_projector"]
        captured["vision_layers"] = self.vision["layers"]
        if "expand" in self.vision:
            size, ids = self.vision["expand"]
            captured.update(self.adapter.expand_metadata(captured, ids, size))
        self._vision_used = True
        return captured

    def _prefill(self, bound: dict[str, Any], embeds: torch.Tensor) -> dict[str, Any]:
        layouts = self.adapter.layouts(self.captured, embeds)
        if layouts is None:
            self.report.record_no_images(embeds.shape[0])
            return bound
        bsz, seq_len = embeds.shape[:2]
        mask = bound.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(
                f"vtprune needs a 2-D attention mask (batch, length) to prune; got a {mask.dim()}-D mask"
            )
        valid = torch.stack([s.valid for s in layouts])
        pad_left = not bool((~valid[:, -1]).any())
        positions = bound.get("position_ids")
        if positions is None:
            positions = torch.arange(seq_len, device=embeds.device).expand(bsz, seq_len)
        alive = [[torch.arange(img.num_tokens, device=embeds.device) for img in s.images] for s in layouts]
        seq_pos = [[img.positions for img in s.images] for s in layouts]
        question = [s.question_positions for s in layouts]
        records = self.report.start(layouts)

        for policy in self.pipeline.early():
            ctx = StageContext(
                stage=policy.stage,
                layer=None,
                layouts=layouts,
                hidden=embeds,
                alive=alive,
                seq_positions=seq_pos,
                question_seq_positions=question,
                adapter=self.adapter,
                captured=self.captured,
            )
            embeds, alive, seq_pos = self._apply(policy, ctx, records)

        keep = valid.clone()
        for b, sample in enumerate(layouts):
            if sample.images:
                keep[b, sample.visual_positions] = False
                keep[b, torch.cat(seq_pos[b])] = True
        index = keep_index(keep, pad_left)
        new_mask = (index >= 0).long()
        new_positions = self._positions_after(positions, index, new_mask)
        self.state = PrefillState(
            full_len=seq_len,
            levels=[Level(layer=0, mask2d=new_mask, removed=valid.sum(1) - new_mask.sum(1))],
            layouts=layouts,
            alive=alive,
            seq_positions=_remap(seq_pos, index, seq_len),
            question_positions=_remap([[q] for q in question], index, seq_len, flat=True),
            pad_left=pad_left,
        )
        call = dict(bound)
        call["inputs_embeds"] = gather_seq(embeds, index)
        call["attention_mask"] = new_mask
        call["position_ids"] = new_positions
        return call

    def _positions_after(self, positions: torch.Tensor, index: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        if self.positions == "compact":
            compact = (new_mask.cumsum(-1) - 1).masked_fill(new_mask == 0, 1)
            return compact.expand(*positions.shape[:-2], *compact.shape) if positions.dim() > 2 else compact
        return gather_seq(positions, index, dim=-1)

    def _apply(self, policy: Policy, ctx: StageContext, records) -> tuple[torch.Tensor, list, list]:
        """Run one policy, then narrow the alive sets (and write merged features)."""
        start = time.perf_counter()
        selections: list[list[Selection]] = policy.select(ctx)
        if ctx.hidden.is_cuda:
            torch.cuda.synchronize(ctx.hidden.device)
        ms = (time.perf_counter() - start) * 1000.0
        hidden = ctx.hidden
        alive, seq_pos = [], []
        wrote = False
        for b, per_image in enumerate(selections):
            if len(per_image) != ctx.num_images(b):
                raise RuntimeError(
                    f"{policy.describe()} returned {len(per_image)} selections for sample {b} with "
                    f"{ctx.num_images(b)} images"
                )
            a_b, s_b = [], []
            for i, sel in enumerate(per_image):
                idx = sel.indices.to(device=hidden.device, dtype=torch.long)
                order = torch.argsort(idx)
                idx = idx[order]
                if sel.values is not None:
                    if not wrote:
                        hidden, wrote = hidden.clone(), True
                    hidden[b, ctx.seq_positions[b][i][idx]] = sel.values[order.to(sel.values.device)].to(hidden)
                a_b.append(ctx.alive[b][i][idx])
                s_b.append(ctx.seq_positions[b][i][idx])
            alive.append(a_b)
            seq_pos.append(s_b)
        records.stage(f"llm@{ctx.layer}" if ctx.stage == "llm" else ctx.stage, ctx.alive, alive, ms)
        return hidden, alive, seq_pos

    def _decode(self, bound: dict[str, Any], embeds: torch.Tensor) -> dict[str, Any]:
        state = self.state
        cache = bound["cache"]
        call = dict(bound)
        q = embeds.shape[1]
        level0 = state.levels[0]
        mask = bound.get("attention_mask")
        call["attention_mask"] = self._level_mask(level0, mask, cache, q)
        positions = bound.get("position_ids")
        from_cache = self.adapter.decode_positions_from_cache(self.outer)
        if positions is None:
            past = cache.get_seq_length()
            positions = (torch.arange(q, device=embeds.device) + past).expand(embeds.shape[0], q)
        if self.positions == "original" and from_cache:
            positions = positions + level0.removed.view(-1, 1).to(positions)
        elif self.positions == "compact" and not from_cache:
            positions = positions - level0.removed.view(-1, 1).to(positions)
        call["position_ids"] = positions
        for level in state.levels[1:]:
            level.masks = {"mask2d": self._level_mask(level, mask, cache, q), "embeds": embeds, "cache": cache}
            if self.positions == "compact":
                shifted = positions - (level.removed - level0.removed).view(-1, 1).to(positions)
                level.position_ids = shifted
                level.position_embeddings = self.adapter.rotary(embeds, shifted)
            else:
                level.position_ids = None
                level.position_embeddings = None
        return call

    def _level_mask(self, level: Level, mask: torch.Tensor | None, cache, q: int) -> torch.Tensor:
        """The level's prefill mask plus one column per token since the prefill."""
        past = cache.get_seq_length(level.layer)
        new_cols = past - level.mask2d.shape[1] + q
        if mask is not None and mask.dim() == 2:
            tail = mask[:, mask.shape[1] - new_cols :]
        else:
            tail = level.mask2d.new_ones(level.mask2d.shape[0], new_cols)
        return torch.cat([level.mask2d, tail.to(level.mask2d)], dim=1)

    # ------------------------------------------------------------ decoder layers
    def _layer_forward_for(self, idx: int):
        def forward(original, hidden_states, *args, **kwargs):
            state = self.state
            if state is None:
                return original(hidden_states, *args, **kwargs)
            if state.prefill:
                if idx in self.needed_inputs:
                    state.layer_inputs[idx] = hidden_states
                if idx in self.prune_layers:
                    hidden_states = self._prune_llm(idx, hidden_states, kwargs)
            level = state.level_for(idx)
            if level.layer > 0:
                kwargs = self._substitute(level, idx, hidden_states, kwargs)
            return original(hidden_states, *args, **kwargs)

        return forward

    def _prune_llm(self, idx: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        state = self.state
        index_in_pipeline, policy = self.prune_layers[idx]
        prev = state.level_for(idx)
        records = self.report.current
        # Above an earlier prune point the layers run on that level's (gathered) rotary tables and positions;
        # the decoder loop's kwargs still carry the full-length ones.
        above = prev.layer > 0
        rotary = prev.position_embeddings if above and prev.position_embeddings is not None else kwargs.get("position_embeddings")
        position_ids = prev.position_ids if above and prev.position_ids is not None else kwargs.get("position_ids")
        ctx = StageContext(
            stage="llm",
            layer=idx,
            layouts=state.layouts,
            hidden=hidden,
            alive=state.alive,
            seq_positions=state.seq_positions,
            question_seq_positions=state.question_positions,
            adapter=self.adapter,
            captured=self.captured,
            layer_inputs=state.layer_inputs,
            layer_q=state.layer_q,
            position_embeddings=rotary,
            mask2d=prev.mask2d,
            sub_block_stats=state.sub_block_stats.get(index_in_pipeline, {}),
        )
        hidden, alive, seq_pos = self._apply(policy, ctx, records)
        keep = prev.mask2d.bool().clone()
        for b, sample in enumerate(state.layouts):
            if sample.images:
                keep[b, torch.cat(state.seq_positions[b])] = False
                keep[b, torch.cat(seq_pos[b])] = True
        index = keep_index(keep, state.pad_left)
        new_mask = (index >= 0).long()
        level = Level(layer=idx, mask2d=new_mask, removed=prev.removed + prev.mask2d.sum(1) - new_mask.sum(1))
        hidden = gather_seq(hidden, index)
        for stats in state.sub_block_stats.values():
            for key, value in stats.items():
                stats[key] = gather_seq(value, index)
        if self.positions == "compact":
            pos = (new_mask.cumsum(-1) - 1).masked_fill(new_mask == 0, 1)
            level.position_ids = pos
            level.position_embeddings = self.adapter.rotary(hidden, pos)
        else:
            level.position_embeddings = tuple(gather_seq(t, index, dim=-2) for t in rotary) if rotary is not None else None
            level.position_ids = gather_seq(position_ids, index, dim=-1) if position_ids is not None else None
        level.masks = {"mask2d": new_mask, "embeds": hidden, "cache": kwargs.get("cache")}
        state.levels.append(level)
        state.alive = alive
        old_len = prev.mask2d.shape[1]
        state.seq_positions = _remap(seq_pos, index, old_len)
        state.question_positions = _remap([[q] for q in state.question_positions], index, old_len, flat=True)
        return hidden

    def _substitute(self, level: Level, idx: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        layer_type = _layer_type(self.adapter.text_config, idx)
        if layer_type not in level.masks:
            m = level.masks
            args = dict(config=self.adapter.text_config, inputs_embeds=m["embeds"], attention_mask=m["mask2d"],
                        cache=m["cache"], position_ids=None)
            if layer_type == "sliding_attention":
                level.masks[layer_type] = create_sliding_window_causal_mask(**args)
            else:  # sized against the level's own cache layer (trap 3)
                level.masks[layer_type] = create_causal_mask(**args, layer_idx=level.layer)
        kwargs["attention_mask"] = level.masks[layer_type]
        if level.position_embeddings is not None:
            kwargs["position_embeddings"] = level.position_embeddings
        if "position_ids" in kwargs and kwargs["position_ids"] is not None and level.position_ids is not None:
            kwargs["position_ids"] = level.position_ids
        return kwargs


def _layer_type(config, idx: int) -> str:
    types_ = getattr(config, "layer_types", None)
    return types_[idx] if types_ else "full_attention"


def _remap(seq_pos, index: torch.Tensor, old_len: int, flat: bool = False):
    """Positions in the old sequence -> positions in the gathered one (``index`` from `keep_index`).

    Dropped positions map to -1; with ``flat`` they are left out.
    """
    bsz, width = index.shape
    new_of_old = torch.full((bsz, old_len), -1, dtype=torch.long, device=index.device)
    slots = torch.arange(width, device=index.device).expand(bsz, width)
    valid = index >= 0
    new_of_old[valid.nonzero(as_tuple=True)[0], index[valid]] = slots[valid]
    out = []
    for b, per_image in enumerate(seq_pos):
        mapped = []
        for pos in per_image:
            m = new_of_old[b, pos]
            mapped.append(m[m >= 0] if flat else m)
        out.append(mapped[0] if flat else mapped)
    return out
