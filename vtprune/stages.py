"""What the runtime does at each pruning point: the stages run, the sequence shortened, decode steps translated.

`StageRunner` holds only the bound `Plan`; everything a call captures comes
in through its `CallRecord` and the `PrefillState` of the cache being
filled, so one runner serves every thread and call of a wrapped model.
The runtime (`vtprune.runtime`) wires it into the model's forwards.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from typing import Any

import torch
from transformers.masking_utils import find_packed_sequence_indices

from .call import CallRecord
from .context import StageContext
from .plan import Plan
from .policies.base import Policy, Selection
from .policies.vit_layer import encoder_kept
from .reporting import Report
from .sequence import Insertion, Level, PrefillState, Sequence


class StageRunner:
    """The vision/projector stages at prefill, the llm-stage prune points, and the decode-step translation."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.adapter = plan.adapter

    def prefill_inputs(self, record: CallRecord) -> dict[str, Any]:
        """The base forward's inputs, completed with what the vision encoder was called with."""
        vision = record.vision
        assert record.outer is not None  # set while a forward runs
        captured = {k: v for k, v in record.outer.items() if v is not None}
        for call in vision.calls:
            for key, value in call.items():
                if key != "method" and value is not None:
                    captured.setdefault(key, value)
        captured["vision_calls"] = vision.calls
        captured["pre_projector"] = vision.pre_projector
        captured["vision_layers"] = vision.layers
        captured["pixel_keep"] = vision.pixel_keep
        captured["pixel_keep_layer"] = vision.keep_layer
        captured["pixel_keep_first"] = vision.first_keep
        captured["encoder_ms"] = vision.encoder_ms
        if vision.expand is not None:
            size, ids = vision.expand
            captured.update(self.adapter.expand_metadata(captured, ids, size))
        vision.used = True
        return captured

    def prefill(self, record: CallRecord, bound: dict[str, Any], embeds: torch.Tensor):
        """Run the vision/projector-stage policies and shorten the sequence: (the call's inputs, the state)."""
        report = Report(policy=self.plan.pipeline.describe(), config=self.plan.to_dict())
        if record.report is None:  # a call's report is its first prefill (generate(use_cache=False) has many)
            record.report = report
        record.prefill_report = report
        layouts = self._layouts(record, embeds)
        if layouts is None:
            report.record_no_images(embeds.shape[0])
            return bound, None
        bsz, seq_len = embeds.shape[:2]
        mask = bound.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"vtprune needs a 2-D attention mask (batch, length) to prune; got a {mask.dim()}-D mask")
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
        for position, policy in enumerate(self.plan.pipeline.policies):
            if policy.stage == "llm":
                continue
            ctx = self._context(
                record, policy.stage, layouts, hidden, alive, seq_pos, sequence.question_positions, extras=sequence.extras
            )
            hidden, alive, seq_pos, inserted = self.apply(record, position, policy, ctx, report)
            if inserted is not None:
                raise RuntimeError(
                    f"{policy.describe()} returned merged rows to insert at the {policy.stage} stage; "
                    "rows are inserted inside the language model only (llm stage)"
                )
        # a row without any attended token says nothing about the side the batch is padded on
        pad_left = not bool((~valid[valid.any(1), -1]).any())
        short, index = replace(sequence, hidden=hidden).compact(
            layouts,
            alive,
            seq_pos,
            pad_left=pad_left,
            compact_positions=self.plan.positions == "compact",
            declared=declared,
        )
        packed = _packed_segments(bound.get("position_ids")) if mask is None else None
        level = Level(layer=0, mask2d=short.mask2d, removed=valid.sum(1) - short.mask2d.sum(1), extras=short.extras)
        # row indices count from level 0's rows (what the language model gets), not from the input's
        kept = replace(_kept(short), row_index={})
        state = PrefillState(
            full_len=seq_len, levels=[level], layouts=layouts, sequence=kept, pad_left=pad_left, packed=packed is not None
        )
        call = dict(bound)
        call["inputs_embeds"] = short.hidden
        if _is_identity(index, seq_len):
            # nothing left the sequence: the mask and positions the model was given stay as they were
            # (no mask stays no mask: transformers then reads packed sequences from the position ids)
            return call, state
        call["attention_mask"] = short.mask2d
        call["position_ids"] = short.position_ids
        if packed is not None:
            call["attention_mask"], call["position_ids"] = _packed_call(packed, index, short)
        for name, value in short.extras.items():
            if value is not None:
                call[name] = value
        return call, state

    def _context(
        self, record: CallRecord, stage: str, layouts, hidden, alive, seq_positions, question_positions, **llm: Any
    ) -> StageContext:
        """What a policy sees at one stage; ``llm`` adds the llm stage's layer, captured signals, rotary and mask."""
        return StageContext(
            stage=stage,
            layouts=layouts,
            hidden=hidden,
            alive=alive,
            seq_positions=seq_positions,
            question_seq_positions=question_positions,
            adapter=self.adapter,
            captured=record.captured,
            **{"layer": None, **llm},
        )

    def _layouts(self, record: CallRecord, embeds: torch.Tensor):
        """The batch's visual layouts, or None where the call holds no media the vision encoder saw.

        Without an encoder call in this call, placeholder ids are text to the
        model (typed by the user with no pixels) or stand for features
        encoded elsewhere (an assisted-decoding main model hands its
        assistant ``mm_encoder_outputs``): the model then runs as unwrapped.
        """
        if record.captured.get("vision_calls"):
            return self.adapter.layouts(record.captured, embeds)
        ids = record.captured.get("input_ids")
        if ids is not None and bool(self.adapter.visual_token_mask(ids).any()):
            warnings.warn(
                "vtprune: input_ids hold visual placeholder tokens but no vision encoder ran in this call (features "
                "given as mm_encoder_outputs, or placeholders typed as text); nothing is pruned",
                RuntimeWarning,
                stacklevel=2,
            )
        return None

    def apply(self, record: CallRecord, index: int, policy: Policy, ctx: StageContext, report: Report):
        """Run one policy (or reuse the call's earlier selection), then narrow the alive sets and write merged features.

        Returns (hidden, alive, kept positions, insertions): a selection's
        ``merged`` rows (`Selection`) come back as one `Insertion` per image
        (None where an image has none; None overall when no image has any),
        and their tokens are already in ``alive`` (after the kept ones) as
        ``N + g`` for the grid index g of the token each stands at, N the
        image's token count: unique, never a grid index, and the report
        counts them apart. Selection runs without autograd: it needs no
        gradient, and the greedy ops write into preallocated buffers.
        """
        start = time.perf_counter()
        key = (index, ctx.layer)
        selections = record.selections.get(key) if record.prefills > 1 else None
        if selections is not None and not _same_images(selections, ctx):
            selections = None
        # a policy that chose before or inside the vision encoder spent that time in the tower call
        chosen_in_tower = 0.0
        if selections is None:
            inside = getattr(policy, "vit_layer", None) is not None
            where = "inside" if inside else "before" if policy.before_encoder else None
            chosen_in_tower = ctx.captured.get("encoder_ms", {}).get(where, 0.0) if where else 0.0
            with torch.no_grad():
                if inside:  # it selected inside the encoder
                    selections = encoder_kept(ctx, policy.describe())
                else:
                    selections = policy.select(ctx)
            if record.prefills == 1:
                record.selections[key] = selections
        if ctx.hidden.is_cuda:
            torch.cuda.synchronize(ctx.hidden.device)
        ms = (time.perf_counter() - start) * 1000.0 + chosen_in_tower
        hidden = ctx.hidden
        alive, seq_pos, inserted = [], [], []
        merged: dict[int, dict[int, torch.Tensor]] = {}
        wrote = False
        for b, per_image in enumerate(selections):
            if len(per_image) != ctx.num_images(b):
                raise RuntimeError(
                    f"{policy.describe()} returned {len(per_image)} selections for sample {b} with {ctx.num_images(b)} images"
                )
            a_b, s_b, i_b = [], [], []
            for i, sel in enumerate(per_image):
                idx = sel.indices.to(device=hidden.device, dtype=torch.long)
                order = torch.argsort(idx)
                idx = idx[order]
                if sel.values is not None:
                    if not wrote:
                        hidden, wrote = hidden.clone(), True
                    hidden[b, ctx.seq_positions[b][i][idx]] = sel.values[order.to(sel.values.device)].to(hidden)
                if sel.level_values:
                    ctx.write_feature_levels(b, i, idx, [v[order.to(v.device)] for v in sel.level_values])
                if sel.merged is not None:
                    merged.setdefault(b, {})[i] = ctx.alive[b][i][idx[sel.merged.to(idx.device)[order]]]
                a_b.append(ctx.alive[b][i][idx])
                s_b.append(ctx.seq_positions[b][i][idx])
                i_b.append(self._insertion(policy, ctx, b, i, idx, sel))
                if i_b[-1] is not None:
                    assert sel.inserted_at is not None  # checked by _insertion
                    n = ctx.layouts[b].images[i].num_tokens
                    stands_at = ctx.alive[b][i][sel.inserted_at.to(device=idx.device, dtype=torch.long)] % n
                    a_b[-1] = torch.cat([a_b[-1], n + stands_at])
            alive.append(a_b)
            seq_pos.append(s_b)
            inserted.append(i_b)
        report.stage(f"llm@{ctx.layer}" if ctx.stage == "llm" else ctx.stage, ctx.alive, alive, ms, merged=merged)
        any_inserted = any(ins is not None for per in inserted for ins in per)
        return hidden, alive, seq_pos, inserted if any_inserted else None

    @staticmethod
    def _insertion(policy: Policy, ctx: StageContext, b: int, i: int, kept: torch.Tensor, sel: Selection) -> Insertion | None:
        """Image i's merged rows as an `Insertion` (after its last current token), or None; checked against the kept."""
        if sel.inserted is None or sel.inserted.shape[0] == 0:
            return None
        at = sel.inserted_at
        if at is None or at.numel() != sel.inserted.shape[0]:
            raise RuntimeError(f"{policy.describe()}: every inserted row needs the token it stands at (inserted_at)")
        at = at.to(device=kept.device, dtype=torch.long)
        n_alive = ctx.alive[b][i].numel()
        if bool(((at < 0) | (at >= n_alive)).any()) or bool(torch.isin(at, kept).any()) or at.unique().numel() != at.numel():
            raise RuntimeError(f"{policy.describe()}: merged rows must stand at distinct tokens it did not keep")
        positions = ctx.seq_positions[b][i]
        return Insertion(values=sel.inserted, sources=positions[at], after=int(positions.max()))

    def decode(self, record: CallRecord, state: PrefillState, bound: dict[str, Any], embeds: torch.Tensor):
        """One decode step's inputs: each level's 2-D mask translated to its kept columns, positions fixed
        where transformers would derive them from the (shorter) cache length."""
        cache = bound["cache"]
        call = dict(bound)
        q = embeds.shape[1]
        level0 = state.levels[0]
        # the tokens since the prefill, from a layer that holds keys (its own length, whatever transformers'
        # version reads for get_seq_length()): the same count for every level
        counted, since = self.since_prefill(state, cache)
        new_cols = since + q
        mask = bound.get("attention_mask")
        call["attention_mask"] = level0.decode_mask(mask, new_cols)
        positions = bound.get("position_ids")
        assert record.outer is not None  # set while a forward runs
        from_cache = self.adapter.decode_positions_from_cache(record.outer)
        if from_cache:
            # HF derives them from get_seq_length(), whichever layer (and length) that reads
            hf_past = int(cache.get_seq_length())
            if positions is None:
                positions = (torch.arange(q, device=embeds.device) + hf_past).expand(embeds.shape[0], q)
            # as if read from the first layer with keys (the level's columns, re-padding included)
            shift = counted.mask2d.shape[1] + since - hf_past
            if self.plan.positions == "original":
                # unwrapped, they count the input's columns: the same shift for every row
                shift = shift + (state.full_len - counted.mask2d.shape[1])
            positions = positions + shift
        elif positions is None:
            positions = (torch.arange(q, device=embeds.device) + counted.mask2d.shape[1] + since).expand(embeds.shape[0], q)
        if self.plan.positions == "compact" and not from_cache:
            positions = positions - level0.removed.view(-1, 1).to(positions)
        call["position_ids"] = positions
        for level in state.levels[1:]:
            level.masks = {"mask2d": level.decode_mask(mask, new_cols), "embeds": embeds}
            level.extras = {}
            if self.plan.positions == "compact":
                shifted = positions - (level.removed - level0.removed).view(-1, 1).to(positions)
                level.position_ids = shifted
                level.position_embeddings = self.adapter.rotary(embeds, shifted)
            else:
                level.position_ids = None
                level.position_embeddings = None
        return call

    def since_prefill(self, state: PrefillState, cache) -> tuple[Level, int]:
        """(the level of the first layer with keys, how many tokens its cache holds beyond that level's prefill)."""
        layer = self.adapter.seq_length_layer()
        level = state.level_for(layer)
        return level, layer_length(cache, layer) - level.mask2d.shape[1]

    def settle(self, state: PrefillState, cache) -> None:
        """After a prefill: layers below the first layer with keys that count their own tokens report its length.

        Since transformers 5.25 linear-attention layers count the tokens they
        saw and ``Cache.get_seq_length()`` reads layer 0 whatever it is; below
        an llm-stage prune point that count is the unpruned length, while
        the keys of the layers from the prune point on hold the pruned one.
        ``get_seq_length()`` then says the kept length, as it did when it read
        the first layer with keys. Both counts grow by one per token from here,
        so they stay equal.
        """
        layers = getattr(cache, "layers", None)
        first = self.adapter.seq_length_layer()
        if not layers or first >= len(layers) or len(state.levels) == 1:
            return
        kept = layer_length(cache, first)
        for j in range(first):
            counter = getattr(layers[j], "cumulative_length_linear", None)  # a linear layer's own count, if it keeps one
            if isinstance(counter, torch.Tensor) and int(counter) != kept:
                counter.fill_(kept)

    def prune_llm(
        self, record: CallRecord, state: PrefillState, idx: int, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        index_in_pipeline, policy = self.plan.prune_layers[idx]
        prev = state.level_for(idx)
        # Above an earlier prune point the layers run on that level's (gathered) rotary tables, positions and
        # extras; the decoder loop's kwargs still carry the full-length ones.
        above = prev.layer > 0
        rotary = prev.position_embeddings if above and prev.position_embeddings is not None else kwargs.get("position_embeddings")
        position_ids = prev.position_ids if above and prev.position_ids is not None else kwargs.get("position_ids")
        declared = self.adapter.sequence_tensors
        extras = dict(prev.extras)  # level 0's: what the prefill handed the language model, already shortened
        sequence = replace(
            state.sequence,
            hidden=hidden,
            mask2d=prev.mask2d,
            rotary=rotary,
            position_ids=position_ids,
            extras=extras,
            stats=list(record.sub_block_stats.values()),
        )
        ctx = self._context(
            record,
            "llm",
            state.layouts,
            hidden,
            sequence.alive,
            sequence.seq_positions,
            sequence.question_positions,
            layer=idx,
            layer_inputs=record.layer_inputs,
            layer_q=record.layer_q,
            position_embeddings=rotary,
            mask2d=prev.mask2d,
            sub_block_stats=record.sub_block_stats.get(index_in_pipeline, {}),
            prefill_memo=record.prefill_memo,
        )
        assert record.prefill_report is not None  # set at the prefill's start
        hidden, alive, seq_pos, inserted = self.apply(record, index_in_pipeline, policy, ctx, record.prefill_report)
        short, index = replace(sequence, hidden=hidden).compact(
            state.layouts,
            alive,
            seq_pos,
            pad_left=state.pad_left,
            compact_positions=self.plan.positions == "compact",
            declared=declared,
            rotary_fn=self.adapter.rotary,
            inserted=inserted,
        )
        if _is_identity(index, prev.mask2d.shape[1]):
            # nothing left: the layers above keep running on what the layers below had (no new level)
            state.sequence = _kept(short)
            return short.hidden
        if state.packed:
            raise ValueError(
                "vtprune: packed inputs (position_ids that restart within a row and no attention_mask) cannot be "
                f"pruned inside the language model (layer {idx}); pass the sequences as a padded batch with an "
                "attention_mask instead"
            )
        level = Level(
            layer=idx,
            mask2d=short.mask2d,
            removed=prev.removed + prev.mask2d.sum(1) - short.mask2d.sum(1),
            position_embeddings=short.rotary,
            position_ids=short.position_ids,
            extras=short.extras,
            row_index=short.row_index,
        )
        level.masks = {"mask2d": short.mask2d, "embeds": short.hidden}
        state.levels.append(level)
        state.sequence = _kept(short)
        return short.hidden

    def substitute(self, level: Level, idx: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        layer_type = self.adapter.layer_type(idx)
        if layer_type not in level.masks:
            m = level.masks
            # the cache comes from the call, never from the level (a state kept with its cache must not hold it)
            cache = given_cache(kwargs)
            args = dict(
                config=self.adapter.text_config,
                inputs_embeds=m["embeds"],
                attention_mask=m["mask2d"],
                cache=cache,
                position_ids=None,
            )
            level.masks[layer_type] = self.adapter.layer_mask(layer_type, idx, args)  # sized by this level's cache
        kwargs["attention_mask"] = level.masks[layer_type]
        if level.position_embeddings is not None:
            kwargs["position_embeddings"] = level.position_embeddings
        if "position_ids" in kwargs and kwargs["position_ids"] is not None and level.position_ids is not None:
            kwargs["position_ids"] = level.position_ids
        for name, value in level.extras.items():
            if kwargs.get(name) is not None and value is not None:
                kwargs[name] = value
        return kwargs


def given_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a call was given: ``cache=``, else ``past_key_values=`` (the name transformers 5.24 retires at 5.40)."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _is_identity(index: torch.Tensor, length: int) -> bool:
    """Whether a gather index keeps every position of a sequence of ``length`` in place."""
    return index.shape[1] == length and bool((index == torch.arange(length, device=index.device)).all())


def _packed_segments(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The packed-sequence ids transformers reads from position ids given without a mask, or None (not packed).

    Qwen's M-RoPE models take a leading row of text positions for this
    (``(4, B, L)`` position ids); 3-row M-RoPE ids are never read as packed.
    """
    if position_ids is None:
        return None
    if position_ids.dim() == 3:
        if position_ids.shape[0] != 4:
            return None
        position_ids = position_ids[0]
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    return find_packed_sequence_indices(position_ids)


def _packed_call(segments: torch.Tensor, index: torch.Tensor, short: Sequence) -> tuple[None, torch.Tensor]:
    """No mask and position ids that still mark each packed sequence, for a pruned packed prefill.

    transformers builds the block-diagonal mask of packed sequences from the
    position ids when no mask is given; gathered positions have gaps where
    tokens were pruned, which it would read as more boundaries. A text row
    renumbered 0, 1, ... within each kept sequence keeps the boundaries, and
    is possible only where the text row is separate from the rotary rows
    (Qwen's 4-row position ids).
    """
    positions = short.position_ids
    if positions is None or positions.dim() != 3 or positions.shape[0] != 4 or bool((index < 0).any()):
        raise ValueError(
            "vtprune: packed inputs (position_ids that restart within a row and no attention_mask) can be pruned "
            "only on Qwen models given 4-row position ids (a text row, then the M-RoPE rows) with equal budgets per "
            "row; pass the sequences as a padded batch with an attention_mask instead"
        )
    kept_segments = segments.to(index.device).gather(1, index)
    slots = torch.arange(index.shape[1], device=index.device).expand_as(index)
    starts = torch.ones_like(index, dtype=torch.bool)
    starts[:, 1:] = kept_segments[:, 1:] != kept_segments[:, :-1]
    first = torch.where(starts, slots, torch.zeros_like(slots)).cummax(dim=1).values
    text = (slots - first).to(positions)
    return None, torch.cat([text[None], positions[1:]])


def layer_length(cache, layer: int) -> int:
    """How many tokens decoder ``layer``'s cache holds, read from that layer itself."""
    return int(cache.layers[layer].get_seq_length())


def _kept(sequence: Sequence) -> Sequence:
    """What the state keeps of a sequence between prune points and decode steps (no activations)."""
    return replace(sequence, hidden=None, rotary=None, stats=[])  # type: ignore[arg-type]  # no activations kept


def _same_images(selections: list[list[Selection]], ctx: StageContext) -> bool:
    """Whether a stored selection fits this batch (same samples, same images per sample)."""
    return len(selections) == ctx.batch_size and all(len(s) == ctx.num_images(b) for b, s in enumerate(selections))
