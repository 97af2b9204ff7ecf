"""The pruning runtime: the hooks and instance-bound forwards of one wrapped model.

Data path (SPEC section 3): a pre-hook on the base model records the batch's
inputs into the call's record (`vtprune.call.CallRecord`, one per
``generate`` or per forward, per thread); the language model's forward
(replaced on the instance) builds the visual layout, runs the vision- and
projector-stage policies on the merged input embeddings, shortens every
sequence tensor with one `Sequence.compact` and calls the original forward
on the shorter sequence. LLM-stage policies run inside wrapped decoder
layers (one policy may prune at several) and shorten the sequence with the
same `compact`; policies that observe sub-blocks (TTV) get forward hooks
that work in prefill only. Decode steps never re-score: the state a
prefill leaves is kept with the cache it filled, and each step translates
the growing 2-D mask to the kept columns of each cache level and fixes
positions where HF derives them from the (pruned) cache length.

What is bound here is wiring only: what one call captures lives in its
record, and what the policy resolved for this model lives in the `Plan`.
"""

from __future__ import annotations

import inspect
import threading
import time
import types
import warnings
import weakref
from dataclasses import replace
from typing import Any

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .call import CallRecord
from .context import LayerCall, StageContext
from .plan import Plan
from .policies.base import Policy, Selection
from .report import Report
from .sequence import Level, PrefillState, Sequence

STATIC_CACHE_REFUSED = (
    "vtprune: a static cache (cache_implementation='static', or a StaticCache) preallocates every layer at the "
    "unpruned length and is indexed by unpruned positions, so pruned prefills cannot be written into it; "
    "use the default dynamic cache (drop cache_implementation) with a wrapped model"
)


class Runtime:
    """Hooks and instance-bound forwards of one wrapped model, driven by a bound `Plan`; `remove` undoes all of them."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.adapter = plan.adapter
        self.report = Report(policy=plan.pipeline.describe(), config=plan.to_dict())
        self._local = threading.local()
        self._report_lock = threading.Lock()
        # the state a prefill leaves, keyed by the cache it filled (manual decode loops span several calls)
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lm_signature: inspect.Signature | None = None
        self._handles: list[Any] = []
        self._bound: list[tuple[torch.nn.Module, str, Any]] = []

    # ------------------------------------------------------------------ calls
    @property
    def record(self) -> CallRecord | None:
        """The call running on this thread, if any."""
        return getattr(self._local, "record", None)

    def _open(self, scope: str) -> CallRecord:
        record = CallRecord(scope=scope)
        self._local.record = record
        return record

    def _close(self, record: CallRecord) -> None:
        self._local.record = None
        if record.report is not None:
            with self._report_lock:
                self.report = record.report

    # ------------------------------------------------------------------ install
    def install(self) -> None:
        base = self.adapter.base
        base_sig = inspect.signature(base.forward)

        def enter(_module, args, kwargs):
            record = self.record or self._open("forward")
            record.forward_depth += 1
            if record.forward_depth == 1:
                outer = dict(base_sig.bind_partial(*args, **kwargs).arguments)
                outer.update(outer.pop("kwargs", {}) or {})
                record.outer = outer

        def leave(_module, _args, _kwargs, _output):
            record = self.record
            if record is None:
                return
            record.forward_depth -= 1
            if record.forward_depth == 0:
                record.outer = None
                if record.scope == "forward":
                    self._close(record)

        self._handles.append(base.register_forward_pre_hook(enter, with_kwargs=True))
        self._handles.append(base.register_forward_hook(leave, with_kwargs=True, always_call=True))
        self._install_vision_capture()
        plan = self.plan
        for idx in sorted(plan.layer_queries):
            self._handles.append(self.adapter.query_module(idx).register_forward_hook(self._grab_queries(idx)))
        for index, policy in enumerate(plan.pipeline.policies):
            for idx in policy.sub_block_layers():
                for part, module in self.adapter.sub_blocks(idx):
                    hook = self._observe_sub_block(index, policy, idx, part)
                    self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

        self._bind(self.adapter.language_model, self._lm_forward)
        for attr, method in self.adapter.language_model_methods().items():
            self._bind(self.adapter.language_model, self._with_prefill_state(method), attr=attr)
        first = plan.first_wrapped_layer()
        if first is not None:
            for idx, layer in enumerate(self.adapter.decoder_layers):
                if idx >= first:
                    self._bind(layer, self._layer_forward_for(idx))
        if hasattr(self.adapter.model, "generate"):
            self._bind(self.adapter.model, self._generate, attr="generate")

    def _generate(self, original, *args, **kwargs):
        """One record for the whole generate call: its encoder calls, forwards and selections."""
        _refuse_static_cache(self.adapter.model, kwargs)
        if self.record is not None:  # generate called from inside a call: part of that call
            return original(*args, **kwargs)
        record = self._open("generate")
        try:
            return original(*args, **kwargs)
        finally:
            self._close(record)

    def _with_prefill_state(self, method):
        """An adapter's language-model method, called with this thread's running prefill state (or None)."""

        def call(original, *args, **kwargs):
            record = self.record
            state = record.state if record is not None and record.in_prefill else None
            return method(original, state, *args, **kwargs)

        return call

    def _grab_queries(self, idx: int):
        def grab(_module, _args, output):
            record = self.record
            if record is not None and record.in_prefill:
                record.layer_q[idx] = output

        return grab

    def _observe_sub_block(self, index: int, policy: Policy, idx: int, part: str):
        """Forward hook on a sub-block: the policy's statistic of its input and output, in prefill only."""

        def observe(_module, args, kwargs, output):
            record = self.record
            if record is None or record.state is None or not record.in_prefill:
                return
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            valid = record.state.level_for(idx).mask2d.bool()
            with torch.no_grad():
                stat = policy.sub_block_statistic(x, y, valid)
            record.sub_block_stats.setdefault(index, {})[(idx, part)] = stat

        return observe

    def _install_vision_capture(self) -> None:
        """Record the vision encoder's calls and the projector's inputs into the running call's record.

        Encoder calls outside any call of the wrapped model are not recorded,
        so they cannot leak into the next call.
        """
        base = self.adapter.base

        def grab(_module, args):
            record = self.record
            if record is not None:
                record.fresh_vision().pre_projector.append(args[0])

        for name in self.adapter.vision_methods:
            method = getattr(base, name, None)
            if method is None:
                continue
            sig = inspect.signature(method)

            def call(original, *args, _sig=sig, _name=name, **kwargs):
                record = self.record
                if record is not None:
                    bound = _sig.bind_partial(*args, **kwargs).arguments
                    meta = {k: v for k, v in bound.items() if k in self.adapter.grid_keys}
                    record.fresh_vision().calls.append({"method": _name, **meta})
                return original(*args, **kwargs)

            self._bind(base, call, attr=name)
        self._handles.append(self.adapter.projector_module().register_forward_pre_hook(grab))
        if self.plan.vision_layers:
            layers = self.adapter.vision_layers()
            for j in sorted(self.plan.vision_layers):

                def grab_layer(_module, args, kwargs, _j=j):
                    record = self.record
                    if record is not None:
                        # the Qwen ViT blocks get their attention segments and rotary tables as keyword arguments
                        record.fresh_vision().layers.setdefault(_j, []).append(LayerCall(args, kwargs))

                self._handles.append(layers[j].register_forward_pre_hook(grab_layer, with_kwargs=True))

        def expand(original, *args, **kwargs):
            # generate() repeats each sample after encoding the images (beams, num_return_sequences)
            sig = inspect.signature(original).bind_partial(*args, **kwargs).arguments
            size, ids = sig.get("expand_size", 1), sig.get("input_ids")
            record = self.record
            if record is not None and size > 1 and ids is not None and record.vision.calls:
                record.vision.expand = (size, ids)
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

    # ----------------------------------------------------------- language model
    def _lm_forward(self, original, *args, **kwargs):
        if self._lm_signature is None:
            self._lm_signature = inspect.signature(original)
        bound = self._lm_signature.bind_partial(*args, **kwargs).arguments
        extra = bound.pop("kwargs", {}) or {}
        cache = bound.get("cache")
        embeds = bound.get("inputs_embeds")
        record = self.record
        if embeds is None or record is None or record.outer is None:
            return original(*args, **kwargs)
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(STATIC_CACHE_REFUSED)
        if cache is not None and cache.get_seq_length() > 0:
            state = self._states.get(cache)
            call = self._decode(record, state, bound, embeds) if state is not None else bound
            record.state = state
            try:
                return original(**call, **extra)
            finally:
                record.state = None
        if record.outer.get("input_ids") is None:
            warnings.warn(
                "vtprune: a prefill given only inputs_embeds is not pruned (visual spans are found from input_ids)",
                RuntimeWarning,
                stacklevel=2,
            )
        for tensor in self.adapter.sequence_tensors:  # declared extras are shortened like every sequence tensor
            if tensor.name in extra:
                bound[tensor.name] = extra.pop(tensor.name)
        record.prefills += 1
        record.captured = self._prefill_inputs(record)
        call, state = self._prefill(record, bound, embeds)
        record.state, record.in_prefill = state, True
        try:
            out = original(**call, **extra)
        finally:
            record.state, record.in_prefill = None, False
            record.end_prefill()
        filled = getattr(out, "cache", None) or getattr(out, "past_key_values", None) or cache
        if state is not None and filled is not None:
            self._states[filled] = state
        return out

    def _prefill_inputs(self, record: CallRecord) -> dict[str, Any]:
        """The base forward's inputs, completed with what the vision encoder was called with."""
        vision = record.vision
        captured = {k: v for k, v in record.outer.items() if v is not None}
        for call in vision.calls:
            for key, value in call.items():
                if key != "method" and value is not None:
                    captured.setdefault(key, value)
        captured["vision_calls"] = vision.calls
        captured["pre_projector"] = vision.pre_projector
        captured["vision_layers"] = vision.layers
        if vision.expand is not None:
            size, ids = vision.expand
            captured.update(self.adapter.expand_metadata(captured, ids, size))
        vision.used = True
        return captured

    def _prefill(self, record: CallRecord, bound: dict[str, Any], embeds: torch.Tensor):
        """Run the vision/projector-stage policies and shorten the sequence: (the call's inputs, the state)."""
        report = Report(policy=self.plan.pipeline.describe(), config=self.plan.to_dict())
        if record.report is None:  # a call's report is its first prefill (generate(use_cache=False) has many)
            record.report = report
        record.prefill_report = report
        layouts = self.adapter.layouts(record.captured, embeds)
        if layouts is None:
            report.record_no_images(embeds.shape[0])
            return bound, None
        bsz, seq_len = embeds.shape[:2]
        mask = bound.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(
                f"vtprune needs a 2-D attention mask (batch, length) to prune; got a {mask.dim()}-D mask"
            )
        valid = torch.stack([s.valid for s in layouts])
        positions = bound.get("position_ids")
        if positions is None:
            positions = torch.arange(seq_len, device=embeds.device).expand(bsz, seq_len)
        declared = self.adapter.sequence_tensors
        sequence = Sequence(
            hidden=embeds,
            mask2d=valid.long(),
            position_ids=positions,
            alive=[[torch.arange(img.num_tokens, device=embeds.device) for img in s.images] for s in layouts],
            seq_positions=[[img.positions for img in s.images] for s in layouts],
            question_positions=[s.question_positions for s in layouts],
            extras={t.name: bound.get(t.name) for t in declared},
        )
        report.start(layouts)
        hidden, alive, seq_pos = embeds, sequence.alive, sequence.seq_positions
        for index, policy in enumerate(self.plan.pipeline.policies):
            if policy.stage == "llm":
                continue
            ctx = StageContext(
                stage=policy.stage,
                layer=None,
                layouts=layouts,
                hidden=hidden,
                alive=alive,
                seq_positions=seq_pos,
                question_seq_positions=sequence.question_positions,
                adapter=self.adapter,
                captured=record.captured,
            )
            hidden, alive, seq_pos = self._apply(record, index, policy, ctx, report)
        pad_left = not bool((~valid[:, -1]).any())
        short, _ = replace(sequence, hidden=hidden).compact(
            layouts, alive, seq_pos, pad_left=pad_left, compact_positions=self.plan.positions == "compact",
            declared=declared,
        )
        level = Level(layer=0, mask2d=short.mask2d, removed=valid.sum(1) - short.mask2d.sum(1), extras=short.extras)
        state = PrefillState(full_len=seq_len, levels=[level], layouts=layouts, sequence=_kept(short), pad_left=pad_left)
        call = dict(bound)
        call["inputs_embeds"] = short.hidden
        call["attention_mask"] = short.mask2d
        call["position_ids"] = short.position_ids
        for name, value in short.extras.items():
            if value is not None:
                call[name] = value
        return call, state

    def _apply(self, record: CallRecord, index: int, policy: Policy, ctx: StageContext, report: Report):
        """Run one policy (or reuse the call's earlier selection), then narrow the alive sets and write merged features.

        Selection runs without autograd: it needs no gradient, and the greedy
        ops write into preallocated buffers.
        """
        start = time.perf_counter()
        key = (index, ctx.layer)
        selections = record.selections.get(key) if record.prefills > 1 else None
        if selections is not None and not _same_images(selections, ctx):
            selections = None
        if selections is None:
            with torch.no_grad():
                selections = policy.select(ctx)
            if record.prefills == 1:
                record.selections[key] = selections
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
        report.stage(f"llm@{ctx.layer}" if ctx.stage == "llm" else ctx.stage, ctx.alive, alive, ms)
        return hidden, alive, seq_pos

    def _decode(self, record: CallRecord, state: PrefillState, bound: dict[str, Any], embeds: torch.Tensor):
        """One decode step's inputs: each level's 2-D mask translated to its kept columns, positions fixed (traps 2-4)."""
        cache = bound["cache"]
        call = dict(bound)
        q = embeds.shape[1]
        level0 = state.levels[0]
        mask = bound.get("attention_mask")
        call["attention_mask"] = level0.decode_mask(mask, cache, q)
        positions = bound.get("position_ids")
        from_cache = self.adapter.decode_positions_from_cache(record.outer)
        if positions is None:
            past = cache.get_seq_length()
            positions = (torch.arange(q, device=embeds.device) + past).expand(embeds.shape[0], q)
        if self.plan.positions == "original" and from_cache:
            positions = positions + level0.removed.view(-1, 1).to(positions)
        elif self.plan.positions == "compact" and not from_cache:
            positions = positions - level0.removed.view(-1, 1).to(positions)
        call["position_ids"] = positions
        for level in state.levels[1:]:
            level.masks = {"mask2d": level.decode_mask(mask, cache, q), "embeds": embeds, "cache": cache}
            level.extras = {}
            if self.plan.positions == "compact":
                shifted = positions - (level.removed - level0.removed).view(-1, 1).to(positions)
                level.position_ids = shifted
                level.position_embeddings = self.adapter.rotary(embeds, shifted)
            else:
                level.position_ids = None
                level.position_embeddings = None
        return call

    # ------------------------------------------------------------ decoder layers
    def _layer_forward_for(self, idx: int):
        def forward(original, hidden_states, *args, **kwargs):
            record = self.record
            state = record.state if record is not None else None
            if state is None:
                return original(hidden_states, *args, **kwargs)
            if record.in_prefill:
                if idx in self.plan.layer_inputs:
                    record.layer_inputs[idx] = hidden_states
                if idx in self.plan.prune_layers:
                    hidden_states = self._prune_llm(record, state, idx, hidden_states, kwargs)
            level = state.level_for(idx)
            if level.layer > 0:
                kwargs = self._substitute(level, idx, kwargs)
            return original(hidden_states, *args, **kwargs)

        return forward

    def _prune_llm(self, record: CallRecord, state: PrefillState, idx: int, hidden: torch.Tensor,
                   kwargs: dict[str, Any]) -> torch.Tensor:
        index_in_pipeline, policy = self.plan.prune_layers[idx]
        prev = state.level_for(idx)
        # Above an earlier prune point the layers run on that level's (gathered) rotary tables, positions and
        # extras; the decoder loop's kwargs still carry the full-length ones.
        above = prev.layer > 0
        rotary = prev.position_embeddings if above and prev.position_embeddings is not None else kwargs.get("position_embeddings")
        position_ids = prev.position_ids if above and prev.position_ids is not None else kwargs.get("position_ids")
        declared = self.adapter.sequence_tensors
        # (declared tensors the decoder layers do not take are the ones the language model got: level 0's)
        extras = dict(prev.extras) if above else {t.name: kwargs.get(t.name, prev.extras.get(t.name)) for t in declared}
        sequence = replace(state.sequence, hidden=hidden, mask2d=prev.mask2d, rotary=rotary, position_ids=position_ids,
                           extras=extras, stats=list(record.sub_block_stats.values()))
        ctx = StageContext(
            stage="llm",
            layer=idx,
            layouts=state.layouts,
            hidden=hidden,
            alive=sequence.alive,
            seq_positions=sequence.seq_positions,
            question_seq_positions=sequence.question_positions,
            adapter=self.adapter,
            captured=record.captured,
            layer_inputs=record.layer_inputs,
            layer_q=record.layer_q,
            position_embeddings=rotary,
            mask2d=prev.mask2d,
            sub_block_stats=record.sub_block_stats.get(index_in_pipeline, {}),
        )
        hidden, alive, seq_pos = self._apply(record, index_in_pipeline, policy, ctx, record.prefill_report)
        short, _ = replace(sequence, hidden=hidden).compact(
            state.layouts, alive, seq_pos, pad_left=state.pad_left,
            compact_positions=self.plan.positions == "compact", declared=declared, rotary_fn=self.adapter.rotary,
        )
        level = Level(
            layer=idx,
            mask2d=short.mask2d,
            removed=prev.removed + prev.mask2d.sum(1) - short.mask2d.sum(1),
            position_embeddings=short.rotary,
            position_ids=short.position_ids,
            extras=short.extras,
        )
        level.masks = {"mask2d": short.mask2d, "embeds": short.hidden, "cache": kwargs.get("cache")}
        state.levels.append(level)
        state.sequence = _kept(short)
        return short.hidden

    def _substitute(self, level: Level, idx: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        layer_type = self.adapter.layer_type(idx)
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
        for name, value in level.extras.items():
            if kwargs.get(name) is not None and value is not None:
                kwargs[name] = value
        return kwargs


def _kept(sequence: Sequence) -> Sequence:
    """What the state keeps of a sequence between prune points and decode steps (no activations)."""
    return replace(sequence, hidden=None, rotary=None, stats=[])


def _same_images(selections: list[list[Selection]], ctx: StageContext) -> bool:
    """Whether a stored selection fits this batch (same samples, same images per sample)."""
    return len(selections) == ctx.batch_size and all(len(s) == ctx.num_images(b) for b, s in enumerate(selections))


def _refuse_static_cache(model, kwargs: dict[str, Any]) -> None:
    """Refuse a static cache at the generate call, before anything runs (see STATIC_CACHE_REFUSED)."""
    implementation = kwargs.get("cache_implementation")
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if implementation is None and config is not None:
        implementation = getattr(config, "cache_implementation", None)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if implementation == "static" or (cache is not None and getattr(cache, "is_compileable", False)):
        raise ValueError(STATIC_CACHE_REFUSED)
