"""The pruning runtime: the hooks and instance-bound forwards of one wrapped model.

Data path: a pre-hook on the base model records the batch's
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
positions where HF derives them from the (pruned) cache length. A static
cache needs nothing else: each of its layers writes at its own count, so a
pruned prefill fills the first slots and decoding continues after them
(generate's ahead-of-time masks for it are left to the model, built from
the translated 2-D mask).

What is bound here is wiring only: what one call captures lives in its
record, and what the policy resolved for this model lives in the `Plan`.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
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
from .reporting import Report
from .stages import StageRunner, given_cache

CHUNKED_PREFILL_REFUSED = (
    "vtprune: generate(prefill_chunk_size={size}) would split this prompt of {length} tokens, which holds visual "
    "tokens, into chunks; a wrapped model prunes visual tokens in a prefill of the whole prompt, so the chunks would "
    "run unpruned. Drop prefill_chunk_size (pruning shortens the prefill already) or make it at least the prompt's "
    "length"
)


# The call open on each thread, per model: {id(model): (runtime, record)}. Shared by every runtime of a
# model, so that while a re-wrap or unwrap leaves an older runtime installed for calls still running on
# other threads, each call is served by the runtime it began under and every other one passes through.
_CALLS = threading.local()
_LIFE = threading.RLock()


def _open_calls() -> dict[int, tuple[Runtime, CallRecord]]:
    calls = getattr(_CALLS, "open", None)
    if calls is None:
        calls = _CALLS.open = {}
    return calls


class _Link:
    """One instance-bound method: what it calls (`original`) and what it replaced (`previous`), both re-pointable."""

    __slots__ = ("original", "previous")

    def __init__(self, original, previous) -> None:
        self.original, self.previous = original, previous


def _link_of(node) -> _Link | None:
    """The `_Link` of a method bound by `Runtime._bind` or an attribute set by `Runtime._set`, else None."""
    return getattr(getattr(node, "__func__", node), "_vtprune_link", None)


class Runtime:
    """Hooks and instance-bound forwards of one wrapped model, driven by a bound `Plan`; `remove` undoes all of them.

    A runtime serves the calls that begin while it is active (`activate`);
    `retire` stops it taking new calls and removes it once the calls it
    serves have ended, so a call runs under one policy from start to end.
    """

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
        # guards active, installed and the count of running calls; one lock for every runtime, as installing one
        # and removing another (its last call ending on another thread) both re-link a module's bound methods
        self._life = _LIFE
        self.active = False
        self._installed = False
        self._running = 0

    # ------------------------------------------------------------------ life
    def activate(self) -> None:
        """Serve the calls that begin from now on (installs the hooks unless calls still running kept them)."""
        with self._life:
            if not self._installed:
                try:
                    self.install()
                except BaseException:
                    self.remove()
                    raise
                self._installed = True
            self.active = True

    def retire(self) -> None:
        """Take no new calls; remove the hooks now, or when the last call this runtime serves ends."""
        with self._life:
            self.active = False
            if self._installed and self._running == 0:
                self.remove()
                self._installed = False

    # ------------------------------------------------------------------ calls
    @property
    def record(self) -> CallRecord | None:
        """The call running on this thread, if this runtime serves it."""
        entry = _open_calls().get(id(self.adapter.model))
        return entry[1] if entry is not None and entry[0] is self else None

    def _mine(self) -> bool:
        """Whether this thread's call on the model is served here (or, with none open, would begin here)."""
        entry = _open_calls().get(id(self.adapter.model))
        return entry[0] is self if entry is not None else self.active

    def _open(self, scope: str) -> CallRecord | None:
        """Begin a call served by this runtime; None once it is retired (the call passes through it)."""
        with self._life:
            if not self.active:
                return None
            self._running += 1
        record = CallRecord(scope=scope)
        _open_calls()[id(self.adapter.model)] = (self, record)
        return record

    def _close(self, record: CallRecord) -> None:
        _open_calls().pop(id(self.adapter.model), None)
        if record.report is not None:
            with self._report_lock:
                self.report = record.report
        with self._life:
            self._running -= 1
            if not self.active and self._installed and self._running == 0:
                self.remove()  # retired while this call ran: the last call served removes the hooks
                self._installed = False

    # ------------------------------------------------------------------ install
    def install(self) -> None:
        base = self.adapter.base
        base_sig = inspect.signature(base.forward)

        def enter(_module, args, kwargs):
            record = self.record
            if record is None:
                if not self._mine():
                    return
                record = self._open("forward")
                if record is None:
                    return
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
        self._install_labels_check()
        self._install_vision_capture()
        plan = self.plan
        for idx in plan.reads.decoder_queries:
            self._handles.append(self.adapter.query_module(idx).register_forward_hook(self._grab_queries(idx)))
        for index, policy, idx in plan.sub_blocks():
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

    def _install_labels_check(self) -> None:
        """Note whether the running forward of the model (not its base) was given ``labels`` (see `_refuse_labels`)."""
        top = self.adapter.model
        if top is self.adapter.base or "labels" not in inspect.signature(top.forward).parameters:
            return
        sig = inspect.signature(top.forward)

        def given(_module, args, kwargs):
            self._local.labels = sig.bind_partial(*args, **kwargs).arguments.get("labels") is not None

        def done(_module, _args, _kwargs, _output):
            self._local.labels = False

        self._handles.append(top.register_forward_pre_hook(given, with_kwargs=True))
        self._handles.append(top.register_forward_hook(done, with_kwargs=True, always_call=True))

    def _refuse_labels(self, removed: torch.Tensor) -> None:
        """A loss needs one logit per label: refuse ``labels`` once a prune has actually removed tokens."""
        if getattr(self._local, "labels", False) and int(removed.sum()) > 0:
            raise ValueError(
                f"vtprune: labels= (a loss, training) is not supported while the model is wrapped with a policy that "
                f"removes tokens: {self.plan.pipeline.describe()} removed {int(removed.sum())} visual tokens in this "
                "call, so the logits are shorter than input_ids and cannot be matched to the labels. Compute the loss "
                "on the unwrapped model (vtprune.unwrap(model)), or wrap at keep=1.0"
            )

    def _sequence_method_for(self, name: str, arguments: dict[str, str]):
        """A language-model method the decoder loop calls with declared sequence tensors: give it the level's."""
        sig = inspect.signature(getattr(self.adapter.language_model, name))
        rows_of = {t.name for t in self.adapter.sequence_tensors if t.rows_of is not None}

        def call(original, *args, **kwargs):
            record = self.record
            if record is None or record.state is None:
                return original(*args, **kwargs)
            state = record.state
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
        if not self._mine():  # another runtime's call, or a retired runtime: pass through
            return original(*args, **kwargs)
        self._refuse_chunked_prefill(args, kwargs)
        if self.record is not None:  # generate called from inside a call: part of that call
            return original(*args, **kwargs)
        record = self._open("generate")
        if record is None:
            return original(*args, **kwargs)
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        record.generate_inputs = {**kwargs, "input_ids": ids}  # generate encodes the media before any forward
        try:
            with self._continuing(given_cache(kwargs)):
                return original(*args, **kwargs)
        finally:
            self._close(record)

    def _refuse_chunked_prefill(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Refuse, before anything runs, a chunked prefill of a prompt that holds visual tokens.

        Each chunk is a forward of its own: the first sees part of the prompt (and of its images), the others
        continue from its cache, so the prompt's visual tokens can be pruned in none of them.
        """
        size = kwargs.get("prefill_chunk_size")
        if size is None:
            config = kwargs.get("generation_config") or getattr(self.adapter.model, "generation_config", None)
            size = getattr(config, "prefill_chunk_size", None)
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        if size is None or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] <= size:
            return
        cache = given_cache(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            return  # a continuation: its new tokens run as decode steps, never pruned
        if bool(self.adapter.visual_token_mask(ids).any()):
            raise ValueError(CHUNKED_PREFILL_REFUSED.format(size=size, length=ids.shape[1]))

    @contextlib.contextmanager
    def _continuing(self, cache):
        """A generate call given a cache a pruned prefill filled (a second turn of a chat): while it runs, the
        cache's ``get_seq_length()`` (no layer named) says how many input columns it stands for.

        generate slices the new input at that length (and Qwen decides from it whether the uncached tokens hold
        images); the pruned length would feed the removed count of prompt tokens again. Lengths of named
        layers (what the mask builders read) stay what the layers hold.
        """
        with self._report_lock:
            state = self._states.get(cache) if cache is not None else None
        if state is None or "get_seq_length" in vars(cache):
            yield
            return
        stages, layer_length = self.stages, cache.get_seq_length

        def get_seq_length(layer_idx: int | None = None):
            if layer_idx is not None:
                return layer_length(layer_idx)
            return state.full_len + stages.since_prefill(state, cache)[1]

        cache.get_seq_length = get_seq_length
        try:
            yield
        finally:
            del cache.get_seq_length

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
        if self.plan.reads.vision_inputs:
            layers = self.adapter.vision_layers()
            for j in self.plan.reads.vision_inputs:

                def grab_layer(_module, args, kwargs, _j=j):
                    record = self.record
                    if record is not None:
                        # the Qwen ViT blocks get their attention segments and rotary tables as keyword arguments
                        record.fresh_vision().layers.setdefault(_j, []).append(LayerCall(args, kwargs))

                self._handles.append(layers[j].register_forward_pre_hook(grab_layer, with_kwargs=True))

        if self.plan.encoder_policy is not None or self.plan.inside_encoder_policy is not None:
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
        """The vision tower on the units the encoder-side policies keep (outputs at full length, zero where dropped).

        Outside a call of the wrapped model the tower runs whole. A policy
        before the encoder (PixelPrune) chooses the units the tower encodes;
        one inside it (``vit_layer=k``) chooses, after block k - 1, the units
        the later blocks encode (a subset of the first's when both run).
        Where the tower's merger is the projector (Qwen), the merger's input
        captured for the projector stage is replaced by its full-length form,
        so later policies index it as unpruned.
        """
        record = self.record
        if record is None:
            return original(pixels, *args, **kwargs)
        vision = record.fresh_vision()
        grid = args[0] if args else kwargs.get("grid_thw")  # Qwen towers take the grid; CLIP's images are square
        first = None
        policy = self.plan.encoder_policy
        if policy is not None:
            start = time.perf_counter()
            with torch.no_grad():
                first = policy.encoder_keep(self.adapter, pixels, grid)
            _add_ms(vision.encoder_ms, "before", start, pixels)
        at = self.plan.encoder_layer
        if at > 0:
            return self._tower_pruned_after(original, record, vision, pixels, grid, kwargs, at, first)
        assert first is not None  # the tower is bound only for an encoder-side policy
        vision.pixel_keep.append((grid, first))
        if bool(first.all()):
            return original(pixels, *args, **kwargs)
        captured = len(vision.pre_projector)
        rest = {k: v for k, v in kwargs.items() if k != "grid_thw"}
        out, merger_input = self.adapter.encode_kept(original, pixels, grid, first, rest)
        if merger_input is not None and len(vision.pre_projector) > captured:
            vision.pre_projector[captured] = merger_input
        return out

    def _tower_pruned_after(self, original, record, vision, pixels, grid, kwargs, at: int, first):
        """The vision tower with the inside-encoder policy selecting after block ``at - 1`` (``vit_layer=at``), on
        the units ``first`` keeps where a policy pruned before the encoder (None: every unit)."""
        from .encoder import encoder_selection

        policy = self.plan.inside_encoder_policy
        assert policy is not None  # `at` comes from it
        vision.keep_layer = at
        # this tower call's encoder method: the calls are recorded in tower-call order, a method another one calls
        # (Qwen3-VL's get_video_features calls get_image_features) recorded after it
        n_call = len(vision.pixel_keep)
        call = vision.calls[n_call] if n_call < len(vision.calls) else {"method": "get_image_features"}
        start = {j: len(calls) for j, calls in vision.layers.items()}
        if first is not None:
            vision.first_keep.append((grid, first))

        def choose(hidden):
            began = time.perf_counter()
            layer_calls = {j: calls[start.get(j, 0) :] for j, calls in vision.layers.items()}
            outer = record.outer if record.outer is not None else record.generate_inputs
            keep, updates = encoder_selection(policy, self.adapter, outer, call, grid, hidden, layer_calls, first)
            vision.pixel_keep.append((grid, keep))
            _add_ms(vision.encoder_ms, "inside", began, hidden)
            return keep, updates

        captured = len(vision.pre_projector)
        rest = {k: v for k, v in kwargs.items() if k != "grid_thw"}
        narrowed = None if first is None or bool(first.all()) else first  # nothing dropped: the tower starts whole
        out, merger_input = self.adapter.encode_pruned_after(original, pixels, grid, rest, at, choose, first=narrowed)
        if len(vision.pixel_keep) == n_call:  # block `at - 1`'s hook never ran: no keep set to report for this call
            raise RuntimeError(f"{policy.describe()}: the vision tower never reached block {at - 1}")
        if merger_input is not None and len(vision.pre_projector) > captured:
            vision.pre_projector[captured] = merger_input
        return out

    def _bind(self, module: torch.nn.Module, fn, attr: str = "forward") -> None:
        """Replace ``module.<attr>`` on this instance only; `remove` restores it.

        Another runtime of the model may bind over this one (a re-wrap while
        calls of this one still run): the links let either be removed first.
        """
        link = _Link(getattr(module, attr), module.__dict__.get(attr))

        def bound(_self, *args, **kwargs):
            return fn(link.original, *args, **kwargs)

        # Keep the original signature visible: generate() inspects it to route inputs.
        sig = inspect.signature(link.original)
        this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        bound.__signature__ = sig.replace(parameters=[this, *sig.parameters.values()])  # type: ignore[attr-defined]
        bound._vtprune_link = link  # type: ignore[attr-defined]  # read by _link_of
        method = types.MethodType(bound, module)
        setattr(module, attr, method)
        self._bound.append((module, attr, method))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module, attr, method in reversed(self._bound):
            link = _link_of(method)
            assert link is not None  # `_bind` made it
            if module.__dict__.get(attr) is method:
                if link.previous is None:
                    delattr(module, attr)
                else:
                    setattr(module, attr, link.previous)
                continue
            node = module.__dict__.get(attr)  # bound over by a later runtime: unlink this one from the chain
            while (upper := _link_of(node)) is not None:
                if upper.previous is method:
                    upper.original, upper.previous = link.original, link.previous
                    break
                node = upper.previous
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
        if state is not None:
            self._refuse_labels(state.levels[0].removed)
        record.state, record.in_prefill = state, True
        try:
            out = original(**call, **extra)
        finally:
            record.state, record.in_prefill, record.current_layer = None, False, 0
            record.end_prefill()
            if state is not None:  # the decode steps need masks and positions, not the prefill's extra tensors
                for level in state.levels:
                    level.extras, level.masks = {}, {}
                state.sequence = replace(state.sequence, extras={})
        if record.report is not None:  # report() describes this prefill from now on, while its call runs on
            with self._report_lock:
                self.report = record.report
        filled = _filled_cache(out, cache)
        if state is not None and filled is not None:
            self.stages.settle(state, filled)
            with self._report_lock:  # one lock for what threads share: the report and the cache -> state map
                self._states[filled] = state
        return out

    # ------------------------------------------------------------ decoder layers
    def _layer_forward_for(self, idx: int):
        def forward(original, hidden_states, *args, **kwargs):
            record = self.record
            if record is None or record.state is None:
                return original(hidden_states, *args, **kwargs)
            state = record.state
            record.current_layer = idx
            if record.in_prefill:
                if idx in self.plan.prune_layers:
                    hidden_states = self.stages.prune_llm(record, state, idx, hidden_states, kwargs)
                    self._refuse_labels(state.levels[-1].removed)
                if idx in self.plan.reads.decoder_inputs:  # what the layer runs on: after a prune before it
                    record.layer_inputs[idx] = hidden_states
            level = state.level_for(idx)
            if level.layer > 0:
                kwargs = self.stages.substitute(level, idx, kwargs)
            return original(hidden_states, *args, **kwargs)

        return forward


def masks_for_generate(model: torch.nn.Module, **kwargs: Any) -> Any:
    """generate's hook that builds the decoder's masks ahead of a compilable (static) cache's forward.

    In a call a vtprune runtime serves, the 2-D mask is kept: the prefill and
    every decode step translate it to the kept columns of each level, and the
    model builds its masks from the translated one. Any other call gets what
    transformers builds. `vtprune.wrap` sets it on the model instance.
    """
    entry = _open_calls().get(id(model))
    if entry is not None and entry[0] is not None:
        return kwargs.get("attention_mask")
    own = getattr(type(model), "create_masks_for_generate", None)
    if own is not None:
        return own(model, **kwargs)
    from transformers.masking_utils import create_masks_for_generate

    return create_masks_for_generate(**kwargs)


def _filled_cache(out: Any, given: Any) -> Any:
    """The cache a forward filled: its output's ``cache`` (``past_key_values`` before transformers renamed it).

    Read without truthiness (an empty cache is falsy) and without touching the
    deprecated name where the new one exists (transformers warns on reading it).
    """
    names = getattr(out, "keys", lambda: ())()
    for name in ("cache", "past_key_values"):
        if name in names and out[name] is not None:
            return out[name]
    return given


def _add_ms(into: dict[str, float], key: str, start: float, like: torch.Tensor) -> None:
    """Add the milliseconds since ``start`` (`time.perf_counter`) to ``into[key]``, after the device's queued work."""
    if like.is_cuda:
        torch.cuda.synchronize(like.device)
    into[key] = into.get(key, 0.0) + (time.perf_counter() - start) * 1000.0
