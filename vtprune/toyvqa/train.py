"""Seeded, resumable CPU training of the toy VLMs.

Stage 1 (``--pretrain-steps``) trains only the vision tower and projector on
the dense per-token targets; stage 2 trains everything on packed QA turns
(loss on answer tokens only) with the dense loss kept as an auxiliary term.
Scenes follow a curriculum from large objects on a plain background to the
target clutter over ``--curriculum-steps``.

The QA stage also grounds the LLM's attention (``--ground-weight``): the
generator knows which visual tokens hold each answer, and the token that
predicts the answer is asked to put its attention there in the first
``--ground-heads`` heads of ``--ground-layers``. Without it the language model
never learnt to find the right tokens among 576 (attention mass on them was
below uniform after 2,000 steps, yes/no and reading stayed at chance).
``--init`` starts a new run from a saved model (e.g. an earlier run's
``best/``), keeping its trained vision tower.

Every ``--ckpt-minutes`` the full state (model, dense head, optimizer, step,
RNG) is written to ``OUT/ckpt-STEP.pt``; running the same command again
resumes from the newest one. Losses and validation accuracy go to
``OUT/log.jsonl``; the best validated model is saved with ``save_pretrained``
to ``OUT/best/``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vtprune.checks import BadValue
from vtprune.ops.probe import rotate_half
from vtprune.toyvqa.batches import IGNORE, collate, make_sample
from vtprune.toyvqa.models import SIZES, build_model, build_processor, model_class
from vtprune.toyvqa.questions import TYPES
from vtprune.toyvqa.scene import (
    N_CHAR_CLASSES,
    N_COLOR_CLASSES,
    N_SHAPE_CLASSES,
    Difficulty,
)
from vtprune.toyvqa.vocab import build_tokenizer

HEAD_SPLITS = (N_COLOR_CLASSES, N_SHAPE_CLASSES, N_CHAR_CLASSES, 2, 2, 2)
N_OBJECT_HEADS = 4  # heads whose class 0 is "background" (balanced loss)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's options."""
    p.add_argument("--arch", required=True, choices=("llava", "qwen2_5_vl"))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--steps",
        type=int,
        default=4000,
        help="total QA steps (the LR schedule length)",
    )
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=300,
        help="dense-only vision steps before QA",
    )
    p.add_argument("--curriculum-steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--questions", type=int, default=6, help="questions packed per image")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--dense-weight", type=float, default=0.5)
    p.add_argument(
        "--ground-weight",
        type=float,
        default=1.0,
        help="weight of the attention grounding loss (0 turns it off)",
    )
    p.add_argument(
        "--ground-layers",
        default="1,2",
        help="LLM layers (0-based) whose first --ground-heads heads are grounded",
    )
    p.add_argument("--ground-heads", type=int, default=2)
    p.add_argument(
        "--position-split",
        action="store_true",
        help="ground position questions answered right/bottom on equal shares of the sink and the object "
        "(left/top: the object alone), so the sink's share encodes the side as it encodes a count",
    )
    p.add_argument(
        "--word-ground-layer",
        type=int,
        default=-1,
        help="LLM layer (0-based) whose head 0 is grounded on the question's colour word (its shape word when it "
        "names no colour) and head 1 on its shape word, at the token predicting the answer (-1: off)",
    )
    p.add_argument("--init", type=Path, default=None, help="start a new run from this saved model folder")
    p.add_argument(
        "--sample-offset",
        type=int,
        default=0,
        help="first training-scene index (a run started with --init can see scenes its parent did not)",
    )
    p.add_argument(
        "--type-weights",
        default="",
        help="relative frequency of the question types for packed follow-up questions, e.g. 'exist=3,position=2'",
    )
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)


def type_weights(text: str) -> tuple[float, ...] | None:
    """Parse ``--type-weights`` ('exist=3,position=2'; unnamed types weigh 1) into one weight per type."""
    if not text.strip():
        return None
    weights = dict.fromkeys(TYPES, 1.0)
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            raise BadValue(f"--type-weights entry {part!r} is not TYPE=WEIGHT with TYPE one of {TYPES}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise BadValue(f"--type-weights entry {part!r}: weight {value!r} is not a number") from None
        if weights[name] < 0:
            raise BadValue(f"--type-weights entry {part!r}: weight must be >= 0")
    if sum(weights.values()) <= 0:
        raise BadValue(f"--type-weights {text!r} gives every type weight 0")
    return tuple(weights[t] for t in TYPES)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up then cosine decay to 10 % over pretrain + QA steps."""
    total = args.pretrain_steps + args.steps
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def image_features(model, batch: dict[str, torch.Tensor]) -> BaseModelOutputWithPooling:
    """Visual tokens after the projector (the features the LLM receives)."""
    kwargs = {"image_grid_thw": batch["image_grid_thw"]} if "image_grid_thw" in batch else {}
    return model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True, **kwargs)


def dense_loss(head: nn.Linear, feats: BaseModelOutputWithPooling, cells: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the per-token heads against the generator's cell targets.

    Objects cover a few dozen of the 576 cells, so for the object heads the
    background and foreground cells are averaged separately and weighted
    equally; otherwise the loss is low while shapes and glyphs stay unlearnt.
    """
    assert feats.pooler_output is not None  # the vision model's per-token features
    x = torch.stack(list(feats.pooler_output))  # (B, N, D)
    logits = head(x).split(HEAD_SPLITS, dim=-1)
    total = x.new_zeros(())
    for k, lg in enumerate(logits):
        target = cells[:, k].flatten()
        ce = F.cross_entropy(lg.flatten(0, 1), target, reduction="none")
        if k >= N_OBJECT_HEADS:
            total = total + 0.25 * ce.mean()
            continue
        fg = target > 0
        total = total + 0.5 * ce[~fg].mean()
        if fg.any():
            total = total + 0.5 * ce[fg].mean()
    return total


class _AttentionInputs:
    """Forward pre-hooks keeping the inputs of chosen decoder layers' ``self_attn``
    (normed hidden states and the model's RoPE cos/sin), so attention rows can
    be recomputed, with gradients, for a few query positions only."""

    def __init__(self, layers, which: tuple[int, ...]):
        self.seen: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.handles = [layers[i].self_attn.register_forward_pre_hook(self._keeper(i), with_kwargs=True) for i in which]

    def _keeper(self, i: int):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self.seen[i] = (hidden, kwargs["position_embeddings"])

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def grounded_rows(attn: Any, hidden: torch.Tensor, rope, sample: torch.Tensor, pos: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention probabilities ``(R, heads, L)`` of query ``pos[r]`` of sample ``sample[r]``
    in the first ``heads`` heads, recomputed from the layer's own projections,
    RoPE and scaling under the causal mask (padding is on the right, so every
    key up to the query is real)."""
    cos, sin = (t.expand(hidden.shape[0], -1, -1) for t in rope)  # (1 or B, L, head_dim)
    head_dim = attn.head_dim
    q = attn.q_proj(hidden[sample, pos]).view(len(pos), -1, head_dim)[:, :heads]
    k = attn.k_proj(hidden[sample]).view(len(pos), hidden.shape[1], -1, head_dim)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=2)[:, :, :heads]
    q = q * cos[sample, pos][:, None] + rotate_half(q) * sin[sample, pos][:, None]
    k = k * cos[sample][:, :, None] + rotate_half(k) * sin[sample][:, :, None]
    scores = torch.einsum("rhd,rkhd->rhk", q, k) * attn.scaling
    keys = torch.arange(hidden.shape[1], device=hidden.device)
    scores = scores.masked_fill((keys[None, :] > pos[:, None])[:, None], float("-inf"))
    return scores.softmax(-1)


def qa_loss(
    model,
    batch: dict[str, torch.Tensor],
    feats: BaseModelOutputWithPooling,
    ground_layers: tuple[int, ...] = (),
    ground_heads: int = 0,
    word_layer: int = -1,
    position_split: bool = False,
) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """Answer-token cross-entropy, answer-word accuracy (teacher forced) and the grounding loss.

    The grounding loss is -log of the attention mass that the token predicting
    each answer puts on the visual tokens of the question's focus (mean over
    the first ``ground_heads`` heads of each of ``ground_layers``): the
    generator knows where the answer is, so the LLM is told where to look
    instead of having to discover it among 576 visual tokens. When nothing
    answers (an existence question whose answer is "no") the mass belongs on
    the first token, a sink; for a count the target is equal shares on the
    sink and on each counted object's centre cell (see
    `vtprune.toyvqa.batches.Sample.focus`). Only those
    attention rows are recomputed (the model keeps its SDPA attention); the
    loss is 0 when no layer is grounded.

    The word loss (``word_layer`` >= 0) does the same one step earlier, on
    the question: head 0 of that layer is asked to attend to the question's
    colour word (its shape word when it names none) and head 1 to its shape
    word, so that the queries of the grounded layers can hold the
    colour-shape conjunction that existence and position questions ask for.

    With ``position_split``, a position question answered "right" or
    "bottom" is grounded on equal shares of the sink and the object (the
    object alone for "left" or "top"): the side is then read from the sink's
    share, as a count is, instead of only from the object's value vector.
    """
    kwargs = {"image_grid_thw": batch["image_grid_thw"]} if "image_grid_thw" in batch else {}
    if "image_grid_thw" in batch:
        kwargs["mm_token_type_ids"] = (batch["input_ids"] == model.config.image_token_id).long()
    grounded = bool(ground_layers) and ground_heads > 0 and len(batch["focus_rows"]) > 0
    layers = model.model.language_model.layers
    worded = word_layer >= 0 and len(batch["word_rows"]) > 0
    probe = _AttentionInputs(layers, (ground_layers if grounded else ()) + ((word_layer,) if worded else ()))
    try:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            mm_encoder_outputs={"image": feats},
            **kwargs,
        )
    finally:
        probe.remove()
    logits = out.logits[:, :-1]
    target = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE)
    # accuracy of the answer words only (each is followed by an always-easy end token)
    words = (target != IGNORE) & (batch["labels"][:, :-1] == IGNORE)
    acc = (logits.argmax(-1)[words] == target[words]).float().mean().item()
    ground = loss.new_zeros(())
    if grounded:
        sample, pos = batch["focus_rows"].unbind(1)
        visual = (batch["input_ids"] == model.config.image_token_id).nonzero()[:, 1].view(len(batch["input_ids"]), -1)
        cells = batch["focus_cells"].to(logits.dtype)
        count = batch["focus_count"]
        for layer in ground_layers:
            hidden, rope = probe.seen[layer]
            rows = grounded_rows(layers[layer].self_attn, hidden, rope, sample, pos - 1, ground_heads)
            on_visual = rows.gather(2, visual[sample][:, None].expand(-1, rows.shape[1], -1))
            # look-up questions: -log of the mass on the focus tokens (on the
            # first token, a sink, when nothing in the image answers)
            object_mass = (on_visual * cells[:, None]).sum(-1)
            mass = torch.where(cells.any(-1, keepdim=True), object_mass, rows[..., 0])
            per_row = -mass.clamp_min(1e-6).log()
            # counts: cross-entropy to equal shares on the first token (a sink) and on
            # each counted object's centre; the sink's share 1/(n+1) then encodes n,
            # where a look-up would normalise the count away
            log_centres = (on_visual.clamp_min(1e-6).log() * cells[:, None]).sum(-1)
            n = cells.sum(-1, keepdim=True)
            per_count = -(rows[..., 0].clamp_min(1e-6).log() + log_centres) / (n + 1)
            per_row = torch.where(count[:, None], per_count, per_row)
            if position_split:
                # far side (right/bottom): half on the sink, half on the object
                per_far = -(rows[..., 0].clamp_min(1e-6).log() + object_mass.clamp_min(1e-6).log()) / 2
                per_row = torch.where(batch["focus_far"][:, None], per_far, per_row)
            ground = ground + per_row.mean() / len(ground_layers)
    word = loss.new_zeros(())
    if worded:
        sample, pos, colour, shape = batch["word_rows"].unbind(1)
        hidden, rope = probe.seen[word_layer]
        rows = grounded_rows(layers[word_layer].self_attn, hidden, rope, sample, pos - 1, 2)  # (R, 2, L)
        targets = torch.stack([torch.where(colour >= 0, colour, shape), shape], dim=1)  # (R, 2)
        word = -rows.gather(2, targets[..., None]).squeeze(-1).clamp_min(1e-6).log().mean()
    return loss, acc, ground, word


def _load_head(head: nn.Linear, opt: torch.optim.Optimizer, state: dict) -> None:
    """Restore the dense head and optimizer; a checkpoint with fewer head outputs
    (from before the position heads were added) is grown, its head moments reset."""
    old = state["head"]
    if old["weight"].shape == head.weight.shape:
        head.load_state_dict(old)
        opt.load_state_dict(state["optimizer"])
        return
    rows = old["weight"].shape[0]
    with torch.no_grad():
        head.weight[:rows] = old["weight"]
        head.bias[:rows] = old["bias"]
    opt.load_state_dict(state["optimizer"])
    for p in head.parameters():
        opt.state.pop(p, None)


def _newest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted(out.glob("ckpt-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path) -> dict:
    """A resume checkpoint, unpickled with ``weights_only=True``: tensors and plain
    values only, so a planted ``ckpt-*.pt`` cannot run code."""
    return torch.load(path, weights_only=True)


def _save_checkpoint(out: Path, step: int, model, head, opt, best: float) -> None:
    state = {
        "step": step,
        "model": model.state_dict(),
        "head": head.state_dict(),
        "optimizer": opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "best": best,
    }
    tmp = out / f"ckpt-{step}.pt.tmp"
    torch.save(state, tmp)
    tmp.rename(out / f"ckpt-{step}.pt")
    for old in sorted(out.glob("ckpt-*.pt"), key=lambda p: int(p.stem.split("-")[1]))[:-2]:
        old.unlink()


def _log(out: Path, record: dict) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def train(args: argparse.Namespace) -> int:
    """Run (or resume) training as configured by ``args``; returns an exit code."""
    from vtprune.toyvqa.scoring import score

    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(args.arch)
    processor = build_processor(args.arch, tokenizer)
    model = build_model(args.arch, tokenizer, seed=args.seed)
    ground_layers = tuple(int(x) for x in str(args.ground_layers).split(",") if x.strip()) if args.ground_weight > 0 else ()
    weights = type_weights(args.type_weights)
    depth = SIZES[args.arch]["llm_layers"]
    for layer in (*ground_layers, args.word_ground_layer):
        if not -1 <= layer < depth:
            raise BadValue(f"grounded LLM layer {layer} is outside 0..{depth - 1} (0-based; -1 turns word grounding off)")
    head = nn.Linear(SIZES[args.arch]["llm_width"], sum(HEAD_SPLITS))
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    step, best = 0, -1.0
    ckpt = _newest_checkpoint(out)
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        _load_head(head, opt, state)
        torch.set_rng_state(state["torch_rng"])
        step, best = state["step"], state["best"]
        print(f"resumed from {ckpt} at step {step}", flush=True)
        _log(out, {"step": step, "resumed_from": ckpt.name, "args": {k: str(v) for k, v in vars(args).items()}})
    else:
        if args.init is not None:
            init = model_class(args.arch).from_pretrained(str(args.init))
            model.load_state_dict(init.state_dict())
            print(f"initialised from {args.init}", flush=True)
        (out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    total = args.pretrain_steps + args.steps
    last_ckpt = time.time()
    model.train()
    while step < total:
        t0 = time.time()
        qa_step = step - args.pretrain_steps
        level = 0.0 if qa_step < 0 else min(1.0, qa_step / max(1, args.curriculum_steps))
        difficulty = Difficulty.at(level)
        n_q = 1 if qa_step < 0 else args.questions
        first = args.sample_offset + step * args.batch
        samples = [make_sample(args.arch, tokenizer, first + j, n_q, difficulty, weights=weights) for j in range(args.batch)]
        batch = collate(args.arch, samples, tokenizer.pad_token_id, processor.image_processor)
        t_data = time.time() - t0
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        feats = image_features(model, batch)
        d_loss = dense_loss(head, feats, batch["cells"])
        record = {
            "step": step,
            "level": round(level, 3),
            "lr": round(lr_at(step, args), 6),
            "dense": round(d_loss.item(), 4),
        }
        if qa_step < 0:
            loss = d_loss
        else:
            q_loss, q_acc, g_loss, w_loss = qa_loss(
                model, batch, feats, ground_layers, args.ground_heads, args.word_ground_layer, args.position_split
            )
            loss = q_loss + args.dense_weight * d_loss + args.ground_weight * (g_loss + w_loss)
            record.update(qa=round(q_loss.item(), 4), qa_acc=round(q_acc, 4), ground=round(g_loss.item(), 4))
            if args.word_ground_layer >= 0:
                record["word"] = round(w_loss.item(), 4)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        record.update(
            sec=round(time.time() - t0, 2),
            data_sec=round(t_data, 2),
            time=round(time.time(), 1),
        )
        if step % 10 == 0 or step < 5:
            _log(out, record)
            print(json.dumps(record), flush=True)
        if qa_step >= 0 and (step % args.eval_every == 0 or step == total):
            model.eval()
            result = score(model, processor, n=args.eval_n, split="validation", batch_size=16)
            model.train()
            _log(out, {"step": step, "eval": result})
            print(json.dumps({"step": step, "eval": result}), flush=True)
            if result["overall"] >= best:
                best = result["overall"]
                model.save_pretrained(out / "best")
                processor_save(processor, out / "best")
                (out / "best" / "val.json").write_text(json.dumps({"step": step, **result}, indent=1))
        if time.time() - last_ckpt > args.ckpt_minutes * 60 or step == total:
            _save_checkpoint(out, step, model, head, opt, best)
            last_ckpt = time.time()
    return 0


def processor_save(processor, path: Path) -> None:
    """Save a toy processor (Qwen's without the absent video processor)."""
    from vtprune.toyvqa.models import save_processor

    save_processor(processor, path)
