"""A call runs under the policy in force when it began, whatever other threads wrap or unwrap meanwhile (issue 18, item 9)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers import gen_kwargs, hooks_left, inputs, mixed_specs, model_for
from transformers import LogitsProcessor, LogitsProcessorList

import vtprune
from vtprune.patches import adapter_for
from vtprune.policies import Pipeline, Random

STEPS = 5


def _first():  # projector and llm stage: decode steps need this policy's per-layer state to the end
    return Pipeline([Random(keep=3, seed=1), Random(keep=2, at_layer=2)])


def _second():
    return Random(keep=4, seed=2, at_layer=1)


class _PauseAt(LogitsProcessor):
    """Stops the generating thread at one point until the test lets it go on.

    ``"prefill"``: inside the prefill forward, where the projector is called
    (the call has begun, its selection has not run); ``"decode"``: after the
    prefill's logits, before the first decode step.
    """

    def __init__(self, model, where: str) -> None:
        self.where, self.thread = where, None
        self.reached, self.go = threading.Event(), threading.Event()
        self.handle = None
        if where == "prefill":
            self.handle = adapter_for(model).projector_module().register_forward_pre_hook(self._hook)

    def _wait(self) -> None:
        self.reached.set()
        assert self.go.wait(60), "the test never let the paused generate go on"

    def _hook(self, _module, _args):
        if threading.current_thread() is self.thread and not self.reached.is_set():
            self._wait()

    def __call__(self, input_ids, scores):
        if self.where == "decode" and not self.reached.is_set():
            self._wait()
        return scores

    def release(self) -> None:
        self.go.set()
        if self.handle is not None:
            self.handle.remove()


def _alone(family, policy, batch, calls):
    """What each call gives with the model wrapped by `policy` (None: unwrapped) and nothing else running."""
    model = model_for(family)
    if policy is not None:
        vtprune.wrap(model, policy)
    with torch.no_grad():
        return [call(model, batch) for call in calls]


def _generate(model, batch, **extra):
    """Every step's logits: equal only if every step ran under the same policy."""
    out = model.generate(**batch, **gen_kwargs(STEPS), return_dict_in_generate=True, output_logits=True, **extra)
    return torch.stack(out.logits, 1)


def _forward(model, batch):
    return model(**batch).logits


def _paused_generate(model, batch, pause, out):
    def work():
        try:
            with torch.no_grad():
                out["tokens"] = _generate(model, batch, logits_processor=LogitsProcessorList([pause]))
        except BaseException as err:  # noqa: BLE001 - asserted by the test
            out["error"] = err
            pause.reached.set()

    thread = threading.Thread(target=work)
    pause.thread = thread
    thread.start()
    assert pause.reached.wait(60)
    return thread


@pytest.mark.parametrize("where", ["prefill", "decode"])
@pytest.mark.parametrize("change", ["rewrap", "unwrap"])
def test_rewrap_or_unwrap_while_another_thread_generates(family, change, where):
    model = model_for(family)
    batch = inputs(model, mixed_specs(family))  # padded samples: decode steps need the call's own state
    with torch.no_grad():
        model(**batch)
    before = hooks_left(model)  # after a first call: HF's own output-capture hooks, if any
    want_first = _alone(family, _first(), batch, [_generate])[0]
    after_policy = _second() if change == "rewrap" else None
    want_after = _alone(family, after_policy, batch, [_forward, _generate])

    vtprune.wrap(model, _first())
    pause, out = _PauseAt(model, where), {}
    thread = _paused_generate(model, batch, pause, out)
    try:
        if change == "rewrap":  # while the first call is in its decode steps
            vtprune.wrap(model, _second())
        else:
            vtprune.unwrap(model)
        with torch.no_grad():  # a call that begins now runs under what is in force now, to its end
            got_after = [_forward(model, batch), _generate(model, batch)]
    finally:
        pause.release()
        thread.join(60)
    assert "error" not in out, out.get("error")
    assert torch.equal(out["tokens"], want_first)  # the paused call ended under the policy it began with
    assert torch.equal(got_after[0], want_after[0]) and torch.equal(got_after[1], want_after[1])
    with torch.no_grad():
        assert torch.equal(_generate(model, batch), want_after[1])
    vtprune.unwrap(model)
    assert hooks_left(model) == before  # the retired runtime left with its last call


def test_pruned_blocks_on_two_threads(family):
    model = model_for(family)
    batch = inputs(model, mixed_specs(family))
    want_first = _alone(family, _first(), batch, [_generate])[0]
    want_second = _alone(family, _second(), batch, [_generate])[0]
    want_base = _alone(family, Random(keep=5, seed=3), batch, [_generate])[0]
    vtprune.wrap(model, Random(keep=5, seed=3))
    pause, out = _PauseAt(model, "prefill"), {}

    def work():
        try:
            with vtprune.pruned(model, _first()), torch.no_grad():
                out["tokens"] = _generate(model, batch, logits_processor=LogitsProcessorList([pause]))
        except BaseException as err:  # noqa: BLE001 - asserted by the test
            out["error"] = err
            pause.reached.set()

    thread = threading.Thread(target=work)
    pause.thread = thread
    thread.start()
    assert pause.reached.wait(60)
    try:
        with vtprune.pruned(model, _second()), torch.no_grad():
            got_second = [_generate(model, batch)]
            pause.release()  # the first block's call goes on, under its policy, and its block ends inside this one
            thread.join(60)
            got_second.append(_generate(model, batch))
    finally:
        pause.release()
        thread.join(60)
    assert "error" not in out, out.get("error")
    assert torch.equal(out["tokens"], want_first)
    assert torch.equal(got_second[0], want_second) and torch.equal(got_second[1], want_second)
    with torch.no_grad():  # both blocks ended: the policy wrapped before them
        assert torch.equal(_generate(model, batch), want_base)


def test_calls_during_repeated_rewraps_each_run_one_policy():
    """Two threads generate while the main thread re-wraps back and forth: every output is one policy's, whole."""
    family = "qwen2_5_vl"
    model = model_for(family)
    batch = inputs(model, mixed_specs(family))
    policies = [_first, _second]
    wants = [_alone(family, p(), batch, [_generate])[0] for p in policies]
    vtprune.wrap(model, _first())
    stop, errors, outputs = threading.Event(), [], []

    def work():
        try:
            with torch.no_grad():
                while True:
                    outputs.append(_generate(model, batch))
                    if stop.is_set():
                        break
        except BaseException as err:  # noqa: BLE001 - asserted below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for k in range(30):
            vtprune.wrap(model, policies[k % 2]())
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert outputs and all(torch.equal(o, wants[0]) or torch.equal(o, wants[1]) for o in outputs)
