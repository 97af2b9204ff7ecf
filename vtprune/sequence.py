"""Every tensor that carries sequence length, held in one object with one `compact`.

The prefill (after the vision/projector stages) and every llm-stage prune
point shorten the sequence the same way: build the keep mask from the kept
visual tokens, turn it into gather indices with re-padding (`keep_index`),
and gather the hidden states, the 2-D mask, the position ids (1-D or M-RoPE
rows), the rotary tables, the policies' sub-block statistics and whatever
extra tensors the model family carries (declared by its adapter as
`SequenceTensor`, e.g. Qwen3-VL's visual-position mask and DeepStack
features). Decode steps translate the growing 2-D mask and the positions
with `Level.decode_mask` / `PrefillState.decode_positions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .compaction import gather_seq, keep_index
from .layout import SampleLayout


@dataclass(frozen=True)
class Insertion:
    """Rows a prune point adds to one image (SparseVLM's merged tokens): rows that were not in the sequence.

    ``values`` ``(c, D)`` go right after the image's current tokens, in this
    order, at sequence position ``after`` (the image's last current token,
    itself kept or not) of the sequence being shortened. Row j stands for
    the token at ``sources[j]`` (a pruned position of the same sequence): its
    position id, rotary rows, mask column, per-token statistics and declared
    extras (for a ``rows_of`` extra: that token's row) are that token's.
    """

    values: torch.Tensor
    sources: torch.Tensor
    after: int


@dataclass(frozen=True)
class SequenceTensor:
    """An adapter's declaration of one extra tensor of the language model's inputs that a prune must shorten.

    ``name`` is the keyword the language model (or its decoder layers)
    takes. With ``rows_of=None`` the tensor carries sequence length along
    ``dim`` (batch just before it), like an attention mask. With
    ``rows_of="<mask name>"`` its rows along ``dim`` are the True entries,
    in row-major order, of that declared ``(B, L)`` bool mask (DeepStack
    features are rows of the visual positions): a prune keeps the rows whose
    position it keeps. A list or tuple of such tensors (one per layer) is
    shortened element by element.
    """

    name: str
    dim: int = 1
    rows_of: str | None = None


@dataclass
class Sequence:
    """The sequence at one point of the prefill, for the whole batch.

    ``alive[b][i]``: grid indices of image i still present; ``seq_positions[b][i]``:
    where they sit now; ``question_positions[b]``: the question's tokens now.
    ``stats`` are the dicts of per-token statistics ``(B, L)`` the policies
    accumulate (shortened in place, so their owners see the new rows).
    """

    hidden: torch.Tensor
    mask2d: torch.Tensor
    position_ids: torch.Tensor | None
    alive: list[list[torch.Tensor]]
    seq_positions: list[list[torch.Tensor]]
    question_positions: list[torch.Tensor]
    rotary: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    stats: list[dict] = field(default_factory=list)
    #: for each ``rows_of`` extra: the rows kept since level 0 (indices into level 0's rows), for the
    #: copies of it the decoder loop still holds at level 0's length
    row_index: dict[str, torch.Tensor] = field(default_factory=dict)

    def compact(
        self,
        layouts: list[SampleLayout],
        alive: list[list[torch.Tensor]],
        seq_positions: list[list[torch.Tensor]],
        *,
        pad_left: bool,
        compact_positions: bool,
        declared: tuple[SequenceTensor, ...] = (),
        rotary_fn=None,
        inserted: list[list[Insertion | None]] | None = None,
    ) -> tuple[Sequence, torch.Tensor]:
        """Keep only the visual tokens at ``seq_positions`` (current positions, after a selection) and every other token.

        Only pruned visual tokens leave. A selection that keeps every visual
        token gives the sequence back unchanged, whatever the mask (padding
        on either side, holes, masked placeholders). Once tokens leave, rows
        are re-padded to the longest kept row: the padding at either end of
        a row (masked positions before its first or after its last attended
        token) is re-made, while masked positions inside a row keep their
        place and stay masked (a masked placeholder is never attended).
        Returns the shortened sequence and the gather index ``(B, L')``
        (``-1``: re-padding). ``compact_positions`` renumbers the attended
        tokens 0..n-1 (and recomputes rotary tables with ``rotary_fn`` where
        this point has them); otherwise positions and rotary tables are
        gathered. ``inserted[b][i]`` (llm stage) adds new rows to image i
        (`Insertion`); its new positions follow the kept ones in
        ``seq_positions`` of the result (``alive`` names them already), and
        the returned index points at each new row's source token.
        """
        visual = torch.zeros_like(self.mask2d, dtype=torch.bool)
        kept = torch.zeros_like(visual)
        for b, sample in enumerate(layouts):
            if sample.images:
                visual[b, torch.cat(self.seq_positions[b])] = True
                kept[b, torch.cat(seq_positions[b])] = True
        if torch.equal(visual, kept):
            keep = torch.ones_like(visual)
        else:
            attended = self.mask2d.bool()
            inside = attended.cummax(dim=1).values & attended.flip(1).cummax(dim=1).values.flip(1)
            keep = (inside & ~visual) | kept
        fresh = None
        if inserted is not None and any(ins is not None for per in inserted for ins in per):
            index, fresh, values = _index_with_insertions(keep, inserted, pad_left)
        else:
            index = keep_index(keep, pad_left)
        new_mask = gather_seq(self.mask2d, index)
        hidden = gather_seq(self.hidden, index)
        if fresh is not None:
            hidden[fresh] = values.to(device=hidden.device, dtype=hidden.dtype)
        rotary, positions = self.rotary, self.position_ids
        if compact_positions:
            renumbered = (new_mask.cumsum(-1) - 1).masked_fill(new_mask == 0, 1)
            if positions is not None and positions.dim() > 2:
                renumbered = renumbered.expand(*positions.shape[:-2], *renumbered.shape)
            positions = renumbered
            rotary = rotary_fn(hidden, renumbered) if rotary is not None else None
        else:
            rotary = tuple(gather_seq(t, index, dim=-2) for t in rotary) if rotary is not None else None
            positions = gather_seq(positions, index, dim=-1) if positions is not None else None
        for stats in self.stats:
            for key, value in stats.items():
                stats[key] = gather_seq(value, index)
        old_len = self.mask2d.shape[1]
        extras, rows = _gather_extras(self.extras, declared, keep, index)
        row_index = {name: self.row_index[name][r] if name in self.row_index else r for name, r in rows.items()}
        new_positions = remap(seq_positions, index, old_len)
        if fresh is not None:
            new_positions = _append_inserted(new_positions, inserted, fresh)
        shortened = replace(
            self,
            hidden=hidden,
            mask2d=new_mask,
            position_ids=positions,
            rotary=rotary,
            alive=alive,
            seq_positions=new_positions,
            question_positions=remap([[q] for q in self.question_positions], index, old_len, flat=True),
            extras=extras,
            row_index=row_index,
        )
        return shortened, index


def _gather_extras(
    extras: dict[str, Any], declared: tuple[SequenceTensor, ...], keep: torch.Tensor, index: torch.Tensor
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The declared extras shortened, and for each ``rows_of`` one the indices of the rows it kept."""
    out, kept_rows = dict(extras), {}
    for spec in declared:
        value = extras.get(spec.name)
        if value is None:
            continue
        if spec.rows_of is None:
            out[spec.name] = _each(value, lambda t, d=spec.dim: gather_seq(t, index, dim=d))
        else:
            mask = extras.get(spec.rows_of)  # the mask before this prune (``out`` may hold the shortened one)
            if mask is None:
                raise RuntimeError(f"{spec.name} is declared as rows of {spec.rows_of!r}, which the inputs lack")
            # the row of each position the index picks (an inserted row: its source's), in row-major order
            mask = mask.bool().to(index.device)
            row_of = (mask.flatten().long().cumsum(0) - 1).view(mask.shape)
            picked = index.clamp(min=0)
            rows = row_of.gather(1, picked)[(index >= 0) & mask.gather(1, picked)]
            out[spec.name] = _each(value, lambda t, d=spec.dim, r=rows: t.index_select(d, r.to(t.device)))
            kept_rows[spec.name] = rows
    return out, kept_rows


def _index_with_insertions(keep: torch.Tensor, inserted: list[list[Insertion | None]], pad_left: bool):
    """`keep_index` with new rows: (index ``(B, L')``, True at the new rows' slots, their values in row-major order).

    Each sample's rows: its kept positions ascending, an image's inserted
    rows right after position ``after`` (in their order); re-padded on the
    side the batch is padded. The index of a new row is its source's position.
    """
    bsz = keep.shape[0]
    device = keep.device
    rows, flags, values = [], [], []
    for b in range(bsz):
        kept = torch.nonzero(keep[b]).flatten()
        per = [ins for ins in (inserted[b] if b < len(inserted) else []) if ins is not None and ins.values.shape[0]]
        width = 1 + max((ins.values.shape[0] for ins in per), default=0)
        keys = [kept * width]
        src = [kept]
        flag = [torch.zeros_like(kept, dtype=torch.bool)]
        for ins in per:
            c = ins.values.shape[0]
            keys.append(ins.after * width + 1 + torch.arange(c, device=device))
            src.append(ins.sources.to(device=device, dtype=torch.long))
            flag.append(torch.ones(c, dtype=torch.bool, device=device))
        order = torch.argsort(torch.cat(keys), stable=True)
        rows.append(torch.cat(src)[order])
        flags.append(torch.cat(flag)[order])
        for ins in sorted(per, key=lambda ins: ins.after):
            values.append(ins.values)
    width = max(r.numel() for r in rows)
    index = torch.full((bsz, width), -1, dtype=torch.long, device=device)
    fresh = torch.zeros(bsz, width, dtype=torch.bool, device=device)
    for b, (r, f) in enumerate(zip(rows, flags)):
        sl = slice(width - r.numel(), width) if pad_left else slice(0, r.numel())
        index[b, sl] = r
        fresh[b, sl] = f
    return index, fresh, torch.cat(values)


def _append_inserted(seq_positions, inserted, fresh: torch.Tensor):
    """Each image's new positions: its kept ones (remapped), then the slots of its inserted rows."""
    out = []
    for b, per_image in enumerate(seq_positions):
        slots = torch.nonzero(fresh[b]).flatten()
        order = sorted(range(len(per_image)), key=lambda i: inserted[b][i].after if inserted[b][i] is not None else 0)
        taken, mapped = 0, list(per_image)
        for i in order:
            ins = inserted[b][i]
            if ins is None or not ins.values.shape[0]:
                continue
            c = ins.values.shape[0]
            mapped[i] = torch.cat([per_image[i], slots[taken : taken + c].to(per_image[i])])
            taken += c
        out.append(mapped)
    return out


def _each(value, fn):
    if isinstance(value, (list, tuple)):
        return type(value)(fn(t) for t in value)
    return fn(value)


def remap(seq_pos, index: torch.Tensor, old_len: int, flat: bool = False):
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


@dataclass
class Level:
    """One stretch of decoder layers that sees the same (pruned) sequence.

    Level 0 starts at layer 0 (after the vision/projector stages); each
    llm-stage prune point starts a new level. ``mask2d`` is the 2-D padding
    mask of the prefill tokens the level's caches hold; ``removed`` counts,
    per sample, the valid prefill tokens dropped up to this level.
    ``masks``, ``position_embeddings``, ``position_ids`` and ``extras`` are
    what the level's layers get instead of the decoder loop's full-length
    ones (set in the prefill and at every decode step, levels above 0);
    ``row_index`` selects the level's rows of a ``rows_of`` extra from the
    copy the decoder loop holds (level 0's rows).
    """

    layer: int
    mask2d: torch.Tensor
    removed: torch.Tensor
    masks: dict[str, Any] = field(default_factory=dict)
    position_embeddings: Any = None
    position_ids: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    row_index: dict[str, torch.Tensor] = field(default_factory=dict)

    def decode_mask(self, mask: torch.Tensor | None, new_cols: int) -> torch.Tensor:
        """The level's prefill mask plus one column per token since the prefill, this step's included."""
        if mask is not None and mask.dim() == 2:
            tail = mask[:, mask.shape[1] - new_cols :]
        else:
            tail = self.mask2d.new_ones(self.mask2d.shape[0], new_cols)
        return torch.cat([self.mask2d, tail.to(self.mask2d)], dim=1)


@dataclass
class PrefillState:
    """What a prefill leaves for the decode steps that follow it (kept with the cache it filled)."""

    full_len: int
    levels: list[Level]
    layouts: list[SampleLayout]
    sequence: Sequence
    pad_left: bool = True
    #: the input is packed sequences (position ids restarting within a row, no mask), which transformers
    #: separates with a block-diagonal mask that only its own mask code builds
    packed: bool = False

    def level_for(self, layer: int) -> Level:
        current = self.levels[0]
        for level in self.levels:
            if level.layer <= layer:
                current = level
        return current
