"""The pruning runtime: the hooks and instance-bound forwards of one wrapped model.

Data path (SPEC section 3): a pre-hook on the base model records the batch's
inputs into the call's record (`vtprune.call.CallRecord`, one per
``generate`` or per forward, per thread); the language model's forward
(replaced on the instance) has `vtprune.stages.StageRunner` build the
visual layout, run the vision- and projector-stage policies on the merged
input embeddings and shorten every sequence tensor with one
`Sequence.compact`, then calls the original forward on the shorter
sequence. LLM-stage policies run inside wrapped decoder layers (one policy
may prune at several) through the same runner; policies that observe
sub-blocks (TTV) get forward hooks that work in prefill only. Decode steps never re-score: the state a
prefill leaves is kept with the cache it filled, and each step translates
the growing 2-D mask to the kept columns of each cache level and fixes
positions where HF derives them from the (pruned) cache length.

What is bound here is wiring only: what one call captures lives in its
record, and what the policy resolved for this model lives in the `Plan`.
"""

from __future__ import annotations

import inspect
import threading
import types
import warnings
import weakref
from dataclasses import replace
from typing import Any

import torch

from .call import CallRecord
from .context import LayerCall
from .plan import Plan
from .policies.base import Policy
from .report import Report
from .stages import StageRunner

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
        self.stages = StageRunner(plan)
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
        first = plan.first_wrapped_layer()
        if first is not None:
            for idx, layer in enumerate(self.adapter.decoder_layers):
                if idx >= first:
                    self._bind(layer, self._layer_forward_for(idx))
        for name, arguments in self.adapter.sequence_methods.items():
            self._bind(self.adapter.language_model, self._sequence_method_for(name, arguments), attr=name)
        if hasattr(self.adapter.model, "generate"):
            self._bind(self.adapter.model, self._generate, attr="generate")

    def _sequence_method_for(self, name: str, arguments: dict[str, str]):
        """A language-model method the decoder loop calls with declared sequence tensors: give it the level's."""
        sig = inspect.signature(getattr(self.adapter.language_model, name))
        rows_of = {t.name for t in self.adapter.sequence_tensors if t.rows_of is not None}

        def call(original, *args, **kwargs):
            record = self.record
            state = record.state if record is not None else None
            if state is None:
                return original(*args, **kwargs)
            level = state.level_for(record.current_layer)
            if level.layer == 0:
                return original(*args, **kwargs)
            bound = sig.bind(*args, **kwargs).arguments
            for argument, tensor in arguments.items():
                value = bound.get(argument)
                if value is None:
                    continue
                if tensor in rows_of:
                    rows = level.row_index.get(tensor)
                    if rows is not None:
                        bound[argument] = value.index_select(0, rows.to(value.device))
                elif level.extras.get(tensor) is not None:
                    bound[argument] = level.extras[tensor]
            return original(**bound)

        return call

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

        if self.plan.encoder_policy is not None:
            self._bind(self.adapter.vision_tower(), self._tower_forward)

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

    def _tower_forward(self, original, pixels, *args, **kwargs):
        """The vision tower on the units the encoder-side policy keeps (outputs at full length, zero where dropped).

        Outside a call of the wrapped model the tower runs whole. Where the
        tower's merger is the projector (Qwen), the merger's input captured
        for the projector stage is replaced by its full-length form, so later
        policies index it as unpruned.
        """
        record = self.record
        if record is None:
            return original(pixels, *args, **kwargs)
        vision = record.fresh_vision()
        grid = args[0] if args else kwargs.get("grid_thw")  # Qwen towers take the grid; CLIP's images are square
        with torch.no_grad():
            keep = self.plan.encoder_policy.encoder_keep(self.adapter, pixels, grid)
        vision.pixel_keep.append((grid, keep))
        if bool(keep.all()):
            return original(pixels, *args, **kwargs)
        captured = len(vision.pre_projector)
        rest = {k: v for k, v in kwargs.items() if k != "grid_thw"}
        out, merger_input = self.adapter.encode_kept(original, pixels, grid, keep, rest)
        if merger_input is not None and len(vision.pre_projector) > captured:
            vision.pre_projector[captured] = merger_input
        return out

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
        if bound.get("cache") is None and "past_key_values" in extra:
            # the name transformers 5.24 retires (at 5.40) in favour of cache=: read both
            bound["cache"] = extra.pop("past_key_values")
        cache = bound.get("cache")
        embeds = bound.get("inputs_embeds")
        record = self.record
        if embeds is None or record is None or record.outer is None:
            return original(*args, **kwargs)
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(STATIC_CACHE_REFUSED)
        if cache is not None and cache.get_seq_length() > 0:
            with self._report_lock:
                state = self._states.get(cache)
            call = self.stages.decode(record, state, bound, embeds) if state is not None else bound
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
        record.captured = self.stages.prefill_inputs(record)
        call, state = self.stages.prefill(record, bound, embeds)
        record.state, record.in_prefill = state, True
        try:
            out = original(**call, **extra)
        finally:
            record.state, record.in_prefill, record.current_layer = None, False, 0
            record.end_prefill()
            if state is not None:  # the decode steps need masks and positions, not the prefill's extra tensors
                for level in state.levels:
                    level.extras = {}
                state.sequence = replace(state.sequence, extras={})
        if record.report is not None:  # report() describes this prefill from now on, while its call runs on
            with self._report_lock:
                self.report = record.report
        filled = getattr(out, "cache", None) or getattr(out, "past_key_values", None) or cache
        if state is not None and filled is not None:
            with self._report_lock:  # one lock for what threads share: the report and the cache -> state map
                self._states[filled] = state
        return out

    # ------------------------------------------------------------ decoder layers
    def _layer_forward_for(self, idx: int):
        def forward(original, hidden_states, *args, **kwargs):
            record = self.record
            state = record.state if record is not None else None
            if state is None:
                return original(hidden_states, *args, **kwargs)
            record.current_layer = idx
            if record.in_prefill:
                if idx in self.plan.layer_inputs:
                    record.layer_inputs[idx] = hidden_states
                if idx in self.plan.prune_layers:
                    hidden_states = self.stages.prune_llm(record, state, idx, hidden_states, kwargs)
            level = state.level_for(idx)
            if level.layer > 0:
                kwargs = self.stages.substitute(level, idx, kwargs)
            return original(hidden_states, *args, **kwargs)

        return forward

def _refuse_static_cache(model, kwargs: dict[str, Any]) -> None:
    """Refuse a static cache at the generate call, before anything runs (see STATIC_CACHE_REFUSED)."""
    implementation = kwargs.get("cache_implementation")
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if implementation is None and config is not None:
        implementation = getattr(config, "cache_implementation", None)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if implementation == "static" or (cache is not None and getattr(cache, "is_compileable", False)):
        raise ValueError(STATIC_CACHE_REFUSED)
