"""`vtprune bench`: where each millisecond of a pruned prefill goes, as ratios measured in one process.

Random-weight models with the real visual geometry (the demo's: LLaVA-1.5's
576 tokens of a 336 px photo; the LLM size is configurable), batches of the
same photo. For each batch size it times, interleaved round-robin over the
repeats after a warm-up (`vtprune.measure.interleaved` / `timed`, CUDA
synchronised), one process:

- the unpruned model's prefill, the wrapped model at full budget (the wrap
  overhead) and at each budget (vtprune's prefill);
- the bare pipeline on the hand-pruned sequence: vision tower, projector,
  embeddings, the same number of visual tokens kept by a plain index, and
  the unwrapped LLM on that sequence with the original positions (the
  achievable speedup);
- the parts: vision tower, projector, the policy's selection (the report's
  time), the compaction op (`gather_seq`) beside a plain copy of the same
  output bytes, the decoder prefill (LLM alone) unpruned and pruned, and
  decode time per token unpruned and pruned;
- the FLOPs ratio (an estimate: matmuls plus attention scores);
- the vision tower's own time inside each prefill, unpruned and pruned
  (policies that prune before the encoder, such as ``pixelprune``, shrink
  it), and the share of merge units ``pixelprune`` drops.

The image is the demo's photo, (``--image text``) scikit-image's ``text``
sample (a 172 x 448 scan of printed text) scaled to fill the Qwen families'
``--qwen-pixels`` (a document page: 1280 x 1280 = 1638400), or (``--image
page``) a page of text rendered here, black on white, 1280 px square.
``--policy`` may chain policies with ``+``: ``pixelprune+idpruner`` is a
Pipeline, pixelprune first (it takes no budget), the rest at each ``--keep``.
``--vit-layers 2 4 6`` adds, per budget, the policy selecting inside the
vision encoder after that many blocks (``vit_layer``), in the same
round-robin; ``--vision-layers`` / ``--vision-hidden`` size the ViT.

``--shares P1 P2 ...`` replaces all of that by one table: each policy's
selection time (the report's, summed over its stages) beside its own pruned
prefill, the policies run round-robin in one process. ``--option KEY=VALUE``
(the value read as JSON) sets an option of the policy, ``NAME.KEY=VALUE`` of
one policy of ``--shares``.

Prints markdown tables (and writes them as JSON with ``--json PATH``; nothing is
written without it). The compaction op is also timed at
7B width (D = 4096) at batch 8 with unequal keeps, fp32 and bf16.

    python -m vtprune.eval.bench                                  # batch 1, 8, 32; random at 64; CPU, 1 thread
    python -m vtprune.eval.bench --batch-sizes 1 8 --keep 64 192 --policy idpruner --json runs/bench.json
    python -m vtprune.eval.bench --shares scope holov pdrop --option 'pdrop.prune_after=[2,4,6]' --llm-layers 8 \
        --batch-sizes 1                                           # selection / pruned prefill per policy
    python -m vtprune.eval.bench --suite gpu --json gpu.json      # on a GPU machine: see vtprune/eval/gpu_suite.py
    python -m vtprune.eval.bench --families qwen3_vl --image text --qwen-pixels 1638400 --policy pixelprune+random \
        --keep 0.25 --batch-sizes 1                               # a document page: the ViT's share and its cut
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import torch

from .. import api
from ..budget import is_full_budget, parse_keep, validate_keep
from ..compaction import gather_seq, keep_index
from ..demo import DEMO_GEOMETRY, QWEN_PIXELS, demo_inputs, photo
from ..measure import cache_bytes_by_kind, interleaved, median, synchronize, timed
from ..patches import adapter_for
from ..policies.base import Pipeline, Policy, make_policy
from ..tiny import FAMILIES, IMAGE_TOKEN, Geometry, family_spec, tiny_model
from .outputs import file_problem, make_parent


def bench_model(
    family: str,
    layers: int,
    hidden: int,
    device: torch.device,
    dtype: torch.dtype,
    vision_layers: int = DEMO_GEOMETRY.vision_layers,
    vision_hidden: int = DEMO_GEOMETRY.vision_hidden,
):
    """The demo model of `family` with an LLM of `layers` x `hidden` (heads of 64, MLP 8/3 x hidden) and a ViT of
    `vision_layers` x `vision_hidden`; the view size and config of the family's demo (`FamilySpec.demo_geometry`,
    `demo_config`: LLaVA-OneVision's 384 px views and ``anyres_max_9``), as `vtprune.demo.demo_model`."""
    heads = max(1, hidden // 64)
    intermediate = (8 * hidden // 3 + 63) // 64 * 64
    geometry = Geometry(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=heads,
        intermediate=intermediate,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        image_size=DEMO_GEOMETRY.image_size,
        patch=DEMO_GEOMETRY.patch,
    )
    spec = family_spec(family)
    # LLaVA-NeXT: grid pinpoints of 336 px views, as the demo's
    model = tiny_model(family, dataclasses.replace(geometry, **spec.demo_geometry), dtype=dtype)
    for name, value in spec.demo_config.items():
        setattr(model.config, name, value)
        setattr(model.model.config, name, value)
    return model.to(device)


def text_page():
    """scikit-image's ``text`` sample (grey, 172 x 448) as an RGB array: printed text on a flat background."""
    import numpy as np
    from skimage import data

    return np.repeat(data.text()[..., None], 3, axis=2)


def rendered_page(side: int = 1280):
    """A document page drawn here: black lines of text (PIL's default font) on white, ``side`` px square.

    Drawn at the size the Qwen processor keeps for ``--qwen-pixels 1638400``
    (1280 x 1280, a multiple of 32), so its white margins and line gaps stay
    exactly white.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    page = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=22)
    words = (
        "vision tokens prune the encoder before it runs; duplicate patches of flat background cost nothing once they are gone. "
    ).split()
    y, line = 96, 0
    while y < side - 128:
        text = " ".join(words[(line * 5 + k) % len(words)] for k in range(14))
        draw.text((112, y), text, fill="black", font=font)
        y += 36 if line % 9 != 8 else 72  # paragraphs
        line += 1
    return np.asarray(page)


IMAGES = {"photo": photo, "text": text_page, "page": rendered_page}


def bench_policy(policy: str, keep, vit_layer: int | None = None, options: dict | None = None):
    """The policy a bench row runs: a name, or names joined by ``+`` (a Pipeline); pixelprune takes no budget.

    With `vit_layer` the first budgeted policy selects inside the vision encoder after that many blocks;
    ``options`` (``--option KEY=VALUE``) go to the last policy of the chain, the one the budget is for.
    """
    names = policy.split("+")
    made: list[Policy | Pipeline] = []
    placed = False
    for j, n in enumerate(names):
        own = dict(options or {}) if j == len(names) - 1 else {}
        if n == "pixelprune":
            made.append(make_policy(n, **own))
            continue
        if vit_layer is not None and not placed:
            own["vit_layer"], placed = vit_layer, True
        made.append(make_policy(n, keep=keep, **own))
    return made[0] if len(made) == 1 else Pipeline(cast("list[Policy]", made))  # each name is one policy


def parse_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value): the value read as JSON (``[2,4,6]``, ``0.5``, ``true``), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"an option is KEY=VALUE, e.g. prune_after=[2,4,6]; got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


class _TowerClock:
    """The vision tower's wall time in the forwards since `reset` (hooks around its call, CUDA synchronised)."""

    def __init__(self, tower: torch.nn.Module) -> None:
        self.ms = 0.0
        self._start = 0.0
        self.handles = [tower.register_forward_pre_hook(self._pre), tower.register_forward_hook(self._post)]

    def _pre(self, *_args):
        synchronize()
        self._start = time.perf_counter()

    def _post(self, *_args):
        synchronize()
        self.ms += (time.perf_counter() - self._start) * 1000.0

    def reset(self) -> float:
        ms, self.ms = self.ms, 0.0
        return ms

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def batched(one: dict, batch_size: int, device: torch.device) -> dict:
    """`batch_size` copies of the one-sample inputs `one`."""
    out = {}
    for key, value in one.items():
        if isinstance(value, torch.Tensor):
            reps = [batch_size] + [1] * (value.dim() - 1)
            value = value.repeat(*reps) if key != "image_grid_thw" else value.repeat(batch_size, 1)
            out[key] = value.to(device)
        else:
            out[key] = value
    return out


class _Bare:
    """The LLaVA pipeline written out plainly: what a perfect pruning implementation would run."""

    def __init__(self, model, inputs: dict, kept_visual: int) -> None:
        self.model, self.inputs = model, inputs
        base = model.model
        self.vision, self.projector = base.vision_tower, base.multi_modal_projector
        self.lm, self.head = base.language_model, model.lm_head
        self.layer = model.config.vision_feature_layer
        ids = inputs["input_ids"]
        visual = ids[0] == IMAGE_TOKEN
        keep = ~visual
        keep[visual.nonzero().squeeze(1)[:kept_visual]] = True  # any kept_visual tokens cost the same
        self.keep = keep
        self.positions = torch.arange(ids.shape[1], device=ids.device)[keep].expand(ids.shape[0], -1)
        self.visual_mask = (ids == IMAGE_TOKEN).unsqueeze(-1)

    def tower(self):
        return self.vision(self.inputs["pixel_values"], output_hidden_states=True).hidden_states[self.layer][:, 1:]

    def project(self, feats):
        return self.projector(feats)

    def embeds(self, image_features=None):
        ids = self.inputs["input_ids"]
        emb = self.lm.embed_tokens(ids)
        feats = self.project(self.tower()) if image_features is None else image_features
        return emb.masked_scatter(self.visual_mask, feats.to(emb.dtype))

    def llm(self, embeds, positions=None):
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        return self.head(out.last_hidden_state[:, -1:])

    def pruned_prefill(self):
        return self.llm(self.embeds()[:, self.keep], self.positions)


class _StepClock:
    """A logits processor that only records when each generation step's logits arrive (CUDA synchronised)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        synchronize()
        self.stamps.append(time.perf_counter())
        return scores


def decode_ms_per_token(model, inputs: dict, tokens: int) -> float:
    """Decode time per token of greedy generation: from the first step's logits to the last, over `tokens` steps.

    The prefill is outside the measured span, so its noise does not leak in.
    """
    from transformers import LogitsProcessorList

    clock = _StepClock()
    model.generate(
        **inputs,
        max_new_tokens=1 + tokens,
        min_new_tokens=1 + tokens,
        do_sample=False,
        pad_token_id=0,
        logits_processor=LogitsProcessorList([clock]),
    )
    return (clock.stamps[-1] - clock.stamps[0]) * 1000.0 / tokens


@torch.no_grad()
def bench_inputs(model, image: str, qwen_pixels: int, batch_size: int, device: torch.device) -> tuple[dict, int]:
    """The bench image's inputs repeated `batch_size` times, and its patch tokens (as the demo and the report count
    them: LLaVA-NeXT / OneVision newlines excluded)."""
    one = demo_inputs(model, IMAGES[image](), qwen_pixels=qwen_pixels)
    if "pixel_values" in one:
        one["pixel_values"] = one["pixel_values"].to(next(model.parameters()).dtype)
    layouts = adapter_for(model).layouts(one, one["input_ids"])
    assert layouts is not None  # the bench image is in the inputs
    return batched(one, batch_size, device), layouts[0].images[0].num_tokens


def round_robin(
    fns: dict[str, Callable[[], Any]], wrapped_fns: dict[str, Callable[[], Any]], clock: _TowerClock, warmup: int, repeats: int
) -> tuple[dict, dict, dict, dict]:
    """One round-robin over every configuration, wrapped or not, so that load drift hits them alike; a wrapped
    run times only its forward (wrapping is not part of a prefill). Per name: prefill ms, selection ms (wrapped),
    the last run's cache bytes by kind (wrapped), the vision tower's ms."""
    times: dict = {name: [] for name in [*fns, *wrapped_fns]}
    sel_times: dict = {name: [] for name in wrapped_fns}
    kv: dict = {}
    tower_ms: dict = {}
    for rnd in range(warmup + repeats):
        for name in times:
            clock.reset()
            if name in wrapped_fns:
                ms, out, sel = wrapped_fns[name]()
                kv[name] = cache_bytes_by_kind(out.cache)
                if rnd >= warmup:
                    sel_times[name].append(sel)
            else:
                ms, _ = timed(fns[name])
            if rnd >= warmup:
                times[name].append(ms)
                tower_ms.setdefault(name, []).append(clock.reset())
    clock.remove()
    return times, sel_times, kv, tower_ms


def decode_times(
    model, inputs: dict, policy: str, budgets: list, decode_tokens: int, warmup: int, repeats: int, options: dict | None = None
) -> dict:
    """Decode ms per token, unpruned (key None) and pruned at each budget (key ``str(keep)``), round-robin."""
    dec: dict = {None: [], **{str(keep): [] for keep in budgets}}
    for rnd in range(warmup + repeats):
        for key, keep in [(None, None), *((str(k), k) for k in budgets)]:
            if keep is None:
                ms = decode_ms_per_token(model, inputs, decode_tokens)
            else:
                with api.pruned(model, bench_policy(policy, keep, options=options)):
                    ms = decode_ms_per_token(model, inputs, decode_tokens)
            if rnd >= warmup:
                dec[key].append(ms)
    return dec


def bench_batch(
    model,
    family: str,
    batch_size: int,
    policy: str,
    budgets: list,
    repeats: int,
    warmup: int,
    decode_tokens: int,
    device: torch.device,
    image: str = "photo",
    qwen_pixels: int = QWEN_PIXELS,
    vit_layers: tuple[int, ...] = (),
    options: dict | None = None,
) -> list[dict]:
    """Rows (one per budget, and per budget and `vit_layers` entry) for one batch size; ``options`` go to the
    budgeted policy (`bench_policy`)."""
    inputs, n_visual = bench_inputs(model, image, qwen_pixels, batch_size, device)
    seq = inputs["input_ids"].shape[1]
    adapter = adapter_for(model)
    is_llava = adapter.spec.bench_bare  # `_Bare` writes out LLaVA-1.5's pipeline
    clock = _TowerClock(
        adapter.vision_tower() if adapter.pixel_prune else getattr(model.model, "vision_tower", None) or model.model.visual
    )
    after: dict = {}

    def prefill():
        return model(**inputs, use_cache=True, logits_to_keep=1)

    def label(keep, vit=None) -> str:
        return f"vtprune {keep}" if vit is None else f"vtprune {keep} vit{vit}"

    def wrapped(keep, vit=None):
        def run():
            chosen = make_policy("random", keep=keep) if is_full_budget(keep) else bench_policy(policy, keep, vit, options)
            with api.pruned(model, chosen):
                ms, out = timed(prefill)
                stages = api.report(model).to_dict()["samples"][0]["images"][0]["stages"]
            after[(keep, vit)] = stages
            return ms, out, sum(s["ms"] for s in stages.values())

        return run

    fns: dict[str, Callable[[], Any]] = {"unpruned": prefill}
    wrapped_fns = {"wrapped, full budget": wrapped(1.0)}
    bares: dict = {}
    if is_llava:
        full = _Bare(model, inputs, n_visual)
        feats, full_embeds = full.tower(), full.embeds()
        fns.update(
            {
                "vision tower": full.tower,
                "projector": lambda: full.project(feats),
                "llm prefill (unpruned)": lambda: full.llm(full_embeds),
            }
        )
    for keep in budgets:
        wrapped_fns[label(keep)] = wrapped(keep)
        for vit in vit_layers:
            wrapped_fns[label(keep, vit)] = wrapped(keep, vit)
        if is_llava:
            kept = min(keep, n_visual) if isinstance(keep, int) else max(1, round(n_visual * keep))
            b = bares[str(keep)] = _Bare(model, inputs, kept)  # by text: the int 1 and 1.0 (full budget) differ
            fns[f"bare pruned {keep}"] = b.pruned_prefill
            fns[f"llm prefill {keep}"] = functools.partial(b.llm, full_embeds[:, b.keep], b.positions)

    times, sel_times, kv, tower_ms = round_robin(fns, wrapped_fns, clock, warmup, repeats)
    dec = decode_times(model, inputs, policy, budgets, decode_tokens, warmup, repeats, options)
    kv["unpruned"] = cache_bytes_by_kind(prefill().cache)

    full_ms = median(times["unpruned"])
    wrap_ms = median(times["wrapped, full budget"])
    rows = []
    for keep, vit_at in [(keep, v) for keep in budgets for v in (None, *vit_layers)]:
        stages = after[(keep, vit_at)]
        name = label(keep, vit_at)
        kept = list(stages.values())[-1]["after"]  # what the policy kept (pixelprune: what its predictor kept)
        vt_ms = median(times[name])
        sel_ms = median(sel_times[name])
        new_seq = seq - n_visual + kept
        row = dict(
            family=family,
            batch=batch_size,
            policy=policy,
            options=options or {},
            keep=keep,
            vit_layer=vit_at,
            visual_before=n_visual,
            visual_after=kept,
            seq_len=seq,
            pruned_seq_len=new_seq,
            prefill_unpruned_ms=full_ms,
            prefill_wrapped_full_budget_ms=wrap_ms,
            prefill_vtprune_ms=vt_ms,
            selection_ms=sel_ms,
            wrap_overhead=wrap_ms / full_ms,
            speedup_vtprune=full_ms / vt_ms,
            flops_ratio=prefill_flops(model, seq) / prefill_flops(model, new_seq),
            decode_unpruned_ms_per_token=median(dec[None]),
            decode_vtprune_ms_per_token=median(dec[str(keep)]),
            # per layer kind: attention layers' keys and values shrink, linear-attention state (Qwen3.5) does not
            kv_bytes_unpruned=kv["unpruned"]["kv"],
            kv_bytes_vtprune=kv[name]["kv"],
            linear_state_bytes_unpruned=kv["unpruned"]["linear_state"],
            linear_state_bytes_vtprune=kv[name]["linear_state"],
            selection_share=sel_ms / vt_ms,
            image=image,
            qwen_pixels=qwen_pixels if adapter.mrope else None,
            vision_unpruned_ms=median(tower_ms["unpruned"]),
            vision_vtprune_ms=median(tower_ms[name]),
            vision_share_unpruned=median(tower_ms["unpruned"]) / full_ms,
            units_dropped=(1 - stages["vision"]["after"] / stages["vision"]["before"])
            if "pixelprune" in policy and "vision" in stages
            else None,
        )
        if is_llava:
            row.update(_bare_columns(times, keep, full_ms, vt_ms - sel_ms, full_embeds, bares[str(keep)].keep, repeats))
        rows.append(row)
    return rows


def _bare_columns(
    times: dict, keep, full_ms: float, path_ms: float, full_embeds: torch.Tensor, keep_row: torch.Tensor, repeats: int
) -> dict:
    """LLaVA-1.5's hand-written pipeline beside the wrapped run: its stages, the achievable speedup, the
    compaction's cost (`path_ms`: the wrapped prefill without its selection)."""
    bare_ms = median(times[f"bare pruned {keep}"])
    comp = bench_compaction_index(full_embeds, keep_row, repeats=max(5, repeats))
    return dict(
        vision_ms=median(times["vision tower"]),
        projector_ms=median(times["projector"]),
        llm_prefill_unpruned_ms=median(times["llm prefill (unpruned)"]),
        llm_prefill_pruned_ms=median(times[f"llm prefill {keep}"]),
        bare_pruned_ms=bare_ms,
        speedup_achievable=full_ms / bare_ms,
        vtprune_path_over_bare=path_ms / bare_ms,
        compaction_ms=comp["gather_ms"],
        compaction_copy_ms=comp["copy_ms"],
        compaction_ratio=comp["ratio"],
    )


def bench_compaction_index(x: torch.Tensor, keep_row: torch.Tensor, repeats: int = 9) -> dict:
    """`gather_seq` of `x` ``(B, L, D)`` keeping `keep_row` in every sample, beside a plain copy of the output bytes."""
    keep = keep_row.expand(x.shape[0], -1)
    return _time_gather(x, keep_index(keep), repeats)


def _time_gather(x: torch.Tensor, index: torch.Tensor, repeats: int) -> dict:
    rows = index.numel()
    src = x.reshape(-1, x.shape[-1])[:rows]
    t = interleaved({"gather": lambda: gather_seq(x, index), "copy": lambda: src.clone()}, repeats, 2)
    gather, copy = median(t["gather"]), median(t["copy"])
    return dict(
        device=str(x.device),
        dtype=str(x.dtype).replace("torch.", ""),
        batch=x.shape[0],
        length=x.shape[1],
        kept_max=index.shape[1],
        width=x.shape[-1],
        padding_rows=int((index < 0).sum()),
        gather_ms=gather,
        copy_ms=copy,
        ratio=gather / copy,
    )


def bench_compaction(
    batch: int = 8,
    length: int = 640,
    width: int = 4096,
    dtype=torch.float32,
    repeats: int = 15,
    device: torch.device | None = None,
) -> dict:
    """The compaction op on a padded batch with unequal keeps (64 + 40 b rows of sample b) beside a plain copy."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, length, width, generator=g).to(device=device, dtype=dtype)
    keep = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        keep[b, torch.randperm(length, generator=g)[: min(length, 64 + 40 * b)]] = True
    return _time_gather(x, keep_index(keep.to(device)), repeats)


def _layer_params(layer: torch.nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


def prefill_flops(model, seq_len: int) -> float:
    """Estimated prefill FLOPs: the vision tower (fixed) plus the decoder on `seq_len` tokens.

    Per layer: 2 x tokens x weights (matmuls) + 4 x tokens^2 x width
    (scores and weighted sum); the LM head runs on the last token only.
    """
    from ..patches import adapter_for

    adapter = adapter_for(model)
    text = adapter.text_config
    flops = 0.0
    for layer in adapter.decoder_layers:
        flops += 2 * seq_len * _layer_params(layer) + 4 * seq_len**2 * text.hidden_size
    flops += 2 * text.hidden_size * text.vocab_size
    vision = getattr(adapter.base, "vision_tower", None) or getattr(adapter.base, "visual", None)
    vcfg = model.config.vision_config
    patches = (vcfg.image_size // vcfg.patch_size) ** 2 + 1 if hasattr(vcfg, "image_size") else None
    if vision is not None and patches is not None:
        flops += 2 * patches * sum(p.numel() for p in vision.parameters()) + 4 * patches**2 * vcfg.hidden_size
    return flops


def _f(value, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _keep(row: dict) -> str:
    """A row's budget, with the ViT block it selects after (``vit_layer``) where it has one."""
    vit = row.get("vit_layer")
    return f"{row['keep']}" if vit is None else f"{row['keep']} vit@{vit}"


def options_for(name: str, options: dict) -> dict:
    """The ``--option`` entries for policy ``name`` in ``--shares``: ``KEY`` goes to every policy,
    ``NAME.KEY`` only to ``name``."""
    out = {}
    for key, value in options.items():
        owner, dot, field = key.rpartition(".")
        if not dot:
            out[key] = value
        elif owner == name:
            out[field] = value
    return out


def bench_shares(
    model,
    family: str,
    batch_size: int,
    policies: list[str],
    keep,
    repeats: int,
    warmup: int,
    device: torch.device,
    options: dict | None = None,
    image: str = "photo",
    qwen_pixels: int = QWEN_PIXELS,
) -> list[dict]:
    """Each policy's selection beside its own pruned prefill: one row per policy, runs round-robin over the
    policies (``warmup`` rounds dropped), medians. Selection is the report's ``ms`` summed over the policy's
    stages (what the runtime times around ``select``, attention probes included), in the same forward."""
    inputs, n_visual = bench_inputs(model, image, qwen_pixels, batch_size, device)
    made = {p: bench_policy(p, keep, options=options_for(p, options or {})) for p in policies}
    prefill_ms: dict = {p: [] for p in policies}
    select_ms: dict = {p: [] for p in policies}
    kept: dict = {}
    for rnd in range(warmup + repeats):
        for p in policies:
            with api.pruned(model, made[p]):
                ms, _ = timed(lambda: model(**inputs, use_cache=True, logits_to_keep=1))
                stages = api.report(model).to_dict()["samples"][0]["images"][0]["stages"]
            kept[p] = list(stages.values())[-1]["after"]
            if rnd >= warmup:
                prefill_ms[p].append(ms)
                select_ms[p].append(sum(s["ms"] for s in stages.values()))
    rows = []
    for p in policies:
        pre, sel = median(prefill_ms[p]), median(select_ms[p])
        rows.append(
            dict(
                family=family,
                batch=batch_size,
                policy=p,
                options=options_for(p, options or {}),
                keep=keep,
                visual_before=n_visual,
                visual_after=kept[p],
                prefill_vtprune_ms=pre,
                selection_ms=sel,
                selection_share=sel / pre,
                prefill_runs_ms=prefill_ms[p],
                selection_runs_ms=select_ms[p],
            )
        )
    return rows


def shares_markdown(rows: list[dict]) -> str:
    lines = [
        "| family | batch | keep | policy | selection ms | pruned prefill ms | selection / prefill |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['batch']} | {r['keep']} ({r['visual_before']}->{r['visual_after']}) | "
            f"{r['policy']} | {r['selection_ms']:.1f} | {r['prefill_vtprune_ms']:.1f} | "
            f"{r['selection_share']:.1%} |"
        )
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """Two tables: the costs (ms) and the ratios."""
    costs = [
        "| family | batch | keep | prefill unpruned | vtprune prefill | bare pruned | vision tower | projector | "
        "selection | compaction (copy) | LLM prefill unpruned / pruned | decode/token unpruned / pruned | "
        "KV MB unpruned / pruned | linear-attention state MB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = [
        "| family | batch | keep | vtprune speedup | achievable speedup | FLOPs ratio | vtprune / achievable | "
        "achievable / FLOPs | wrap overhead (full budget) | vtprune path / bare | selection / prefill | "
        "compaction / copy |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = r.get
        costs.append(
            f"| {r['family']} | {r['batch']} | {_keep(r)} ({r['visual_before']}->{r['visual_after']}) | "
            f"{r['prefill_unpruned_ms']:.1f} | {r['prefill_vtprune_ms']:.1f} | {_f(g('bare_pruned_ms'))} | "
            f"{_f(g('vision_ms'))} | {_f(g('projector_ms'))} | {r['selection_ms']:.2f} | "
            f"{_f(g('compaction_ms'), '.3f')} ({_f(g('compaction_copy_ms'), '.3f')}) | "
            f"{_f(g('llm_prefill_unpruned_ms'))} / {_f(g('llm_prefill_pruned_ms'))} | "
            f"{r['decode_unpruned_ms_per_token']:.2f} / {r['decode_vtprune_ms_per_token']:.2f} | "
            f"{r['kv_bytes_unpruned'] / 2**20:.2f} / {r['kv_bytes_vtprune'] / 2**20:.2f} | "
            f"{r['linear_state_bytes_vtprune'] / 2**20:.2f} |"
        )
        ach = g("speedup_achievable")
        ratios.append(
            f"| {r['family']} | {r['batch']} | {_keep(r)} | {r['speedup_vtprune']:.2f}x | {_f(ach, '.2f')}x | "
            f"{r['flops_ratio']:.2f}x | {_f(None if ach is None else r['speedup_vtprune'] / ach, '.0%')} | "
            f"{_f(None if ach is None else ach / r['flops_ratio'], '.0%')} | {r['wrap_overhead']:.3f}x | "
            f"{_f(g('vtprune_path_over_bare'), '.3f')}x | {r['selection_share']:.1%} | "
            f"{_f(g('compaction_ratio'), '.2f')}x |"
        )
    vision = [
        "| family | image | keep | units dropped (pixelprune) | vision tower ms unpruned / vtprune | "
        "tower speedup | tower share of the unpruned prefill | prefill ms unpruned / vtprune | prefill speedup |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        dropped = r.get("units_dropped")
        vision.append(
            f"| {r['family']} | {r.get('image', 'photo')} | {_keep(r)} ({r['visual_before']}->{r['visual_after']}) | "
            f"{_f(None if dropped is None else dropped, '.1%')} | {r['vision_unpruned_ms']:.1f} / "
            f"{r['vision_vtprune_ms']:.1f} | {r['vision_unpruned_ms'] / r['vision_vtprune_ms']:.2f}x | "
            f"{r['vision_share_unpruned']:.0%} | {r['prefill_unpruned_ms']:.1f} / {r['prefill_vtprune_ms']:.1f} | "
            f"{r['speedup_vtprune']:.2f}x |"
        )
    return "\n".join(costs) + "\n\n" + "\n".join(ratios) + "\n\n" + "\n".join(vision)


def compaction_markdown(comp: list[dict]) -> str:
    lines = [
        "| compaction | dtype | batch x length -> kept (max) | width | padding rows | gather_seq ms | "
        "plain copy of the output ms | ratio |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for c in comp:
        lines.append(
            f"| {c['device']} | {c['dtype']} | {c['batch']} x {c['length']} -> {c['kept_max']} | {c['width']} | "
            f"{c['padding_rows']} | {c['gather_ms']:.3f} | {c['copy_ms']:.3f} | {c['ratio']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--suite",
        choices=["cpu", "gpu"],
        default="cpu",
        help="gpu: the CUDA kernel and attention-backend equality tests plus this bench, one JSON",
    )
    parser.add_argument("--policy", default="random", help="the registry policy timed (default random)")
    parser.add_argument(
        "--option",
        action="append",
        type=parse_option,
        default=[],
        metavar="KEY=VALUE",
        help="an option of the policy (the last of a + chain), the value read as JSON, repeatable: "
        "--option prune_after=[2,4,6] for PyramidDrop on an 8-layer bench LLM; with --shares, "
        "NAME.KEY=VALUE for one policy (--option pdrop.prune_after=[2,4,6])",
    )
    parser.add_argument(
        "--shares",
        nargs="+",
        metavar="POLICY",
        help="instead of the full bench: each POLICY's selection time beside its own pruned prefill, "
        "the policies interleaved round-robin in one process (one table row per policy and budget)",
    )
    parser.add_argument(
        "--keep",
        nargs="+",
        default=["64"],
        help="budgets timed, each a token count per image (int) or a fraction in (0, 1] (default 64)",
    )
    parser.add_argument(
        "--families",
        nargs="+",
        default=["llava"],
        choices=FAMILIES,
        help="llava also gets the bare pipeline and the per-part rows",
    )
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=[1, 8, 32],
        help="batch sizes timed, each a batch of the demo image (default 1 8 32)",
    )
    parser.add_argument(
        "--llm-layers",
        type=int,
        default=DEMO_GEOMETRY.layers,
        help=f"decoder layers of the randomly initialised bench model (default {DEMO_GEOMETRY.layers})",
    )
    parser.add_argument(
        "--llm-hidden",
        type=int,
        default=DEMO_GEOMETRY.hidden,
        help=f"hidden width of its decoder (default {DEMO_GEOMETRY.hidden})",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed rounds after the warm-up, interleaved across variants; the median is reported (default 3)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument(
        "--decode-tokens", type=int, default=8, help="tokens generated per round for the decode time per token (default 8)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the model's dtype (default float32)"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default cuda where available, else cpu)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH (default: print only)")
    parser.add_argument(
        "--image",
        choices=sorted(IMAGES),
        default="photo",
        help="photo: scikit-image's astronaut; text: its scanned text sample; page: a rendered text page",
    )
    parser.add_argument(
        "--qwen-pixels",
        type=int,
        default=QWEN_PIXELS,
        help="pixels of the image for Qwen families (default 448 x 448; a document page: 1280 x 1280)",
    )
    parser.add_argument(
        "--vision-layers",
        type=int,
        default=DEMO_GEOMETRY.vision_layers,
        help=f"ViT blocks of the bench model (default {DEMO_GEOMETRY.vision_layers})",
    )
    parser.add_argument(
        "--vision-hidden",
        type=int,
        default=DEMO_GEOMETRY.vision_hidden,
        help=f"hidden width of its ViT (default {DEMO_GEOMETRY.vision_hidden})",
    )
    parser.add_argument(
        "--vit-layers",
        nargs="+",
        type=int,
        default=[],
        help="also time the policy selecting inside the vision encoder after each of these many "
        "blocks (vit_layer), interleaved with the rest (default: none)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1); use fewer than the idle cores, oversubscribed threads make CPU timings meaningless",
    )
    args = parser.parse_args(argv)
    if args.json is not None and (problem := file_problem(args.json, "--json")):
        print(f"vtprune bench: {problem}", file=sys.stderr)  # before any timing: a bad path must not cost the finished results
        return 2
    if args.json is not None:
        make_parent(args.json)
    if args.suite == "gpu":
        from .gpu_suite import main as gpu_main

        return gpu_main(["--json", args.json] if args.json else [])
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    # one row per budget: "64 64" is one budget; the int 1 (one token) and 1.0 (full budget) are two
    budgets = list({(type(k), k): k for k in (validate_keep(parse_keep(k)) for k in args.keep)}.values())
    options = dict(args.option)
    for name in args.shares or [args.policy]:  # a bad name or option fails here, before any timing
        bench_policy(name, budgets[0], options=options_for(name, options) if args.shares else options)
    load_before = os.getloadavg()
    rows = []
    if args.shares:
        for family in args.families:
            model = bench_model(family, args.llm_layers, args.llm_hidden, device, dtype)
            for bsz in args.batch_sizes:
                for keep in budgets:
                    rows.extend(
                        bench_shares(
                            model,
                            family,
                            bsz,
                            args.shares,
                            keep,
                            args.repeats,
                            args.warmup,
                            device,
                            options,
                            args.image,
                            args.qwen_pixels,
                        )
                    )
                    print(shares_markdown(rows[-len(args.shares) :]), flush=True)
        result = {
            "mode": "shares",
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "llm": {"layers": args.llm_layers, "hidden": args.llm_hidden},
            "dtype": args.dtype,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "rows": rows,
        }
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
        print()
        print(shares_markdown(rows))
        print(
            f"\n(torch threads: {torch.get_num_threads()}; load average {load_before[0]:.2f} before, "
            f"{result['load_average_after'][0]:.2f} after; medians of {args.repeats} interleaved rounds"
            + (f"; JSON: {args.json})" if args.json else ")")
        )
        return 0
    for family in args.families:
        model = bench_model(family, args.llm_layers, args.llm_hidden, device, dtype, args.vision_layers, args.vision_hidden)
        for bsz in args.batch_sizes:
            new = bench_batch(
                model,
                family,
                bsz,
                args.policy,
                budgets,
                args.repeats,
                args.warmup,
                args.decode_tokens,
                device,
                args.image,
                args.qwen_pixels,
                tuple(args.vit_layers),
                options,
            )
            rows.extend(new)
            print(markdown(new).split("\n\n")[0].split("\n", 2)[-1], flush=True)
    comp = [bench_compaction(dtype=d, device=device) for d in (torch.float32, torch.bfloat16)]
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "llm": {"layers": args.llm_layers, "hidden": args.llm_hidden},
        "vit": {"layers": args.vision_layers, "hidden": args.vision_hidden},
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rows": rows,
        "compaction": comp,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    print()
    print(markdown(rows))
    print()
    print(compaction_markdown(comp))
    print(
        f"\n(torch threads: {torch.get_num_threads()}; load average {load_before[0]:.2f} before, "
        f"{result['load_average_after'][0]:.2f} after" + (f"; JSON: {args.json})" if args.json else ")")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
