"""What a policy sees when it selects: the typed meeting point of policies and adapters.

A policy knows nothing about model families; an adapter knows nothing about
policies. The runtime builds one `StageContext` per stage call and the policy
asks it for features by (sample, image).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .layout import SampleLayout
from .ops.probe import shift_rotary

if TYPE_CHECKING:  # pragma: no cover
    from .patches.base import Adapter


class NotCaptured(LookupError):
    """A policy asked the `StageContext` for a model signal its `Signals` did not declare (a bug in the policy)."""


@dataclass
class LayerCall:
    """One call of a vision-encoder layer, as its forward pre-hook saw it (captured in prefill)."""

    args: tuple
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> torch.Tensor:
        """The layer's input hidden states."""
        return self.args[0] if self.args else self.kwargs["hidden_states"]


@dataclass
class StageContext:
    """Inputs of one pruning stage for the whole batch.

    ``stage`` is ``"vision"``, ``"projector"`` or ``"llm"``; ``layer`` is the
    decoder layer the sequence is pruned before (``llm`` only).
    ``hidden`` is the sequence as it enters that point, ``(B, L, D)``:
    merged input embeddings for vision/projector, the input of decoder layer
    ``layer`` for llm. ``alive[b][i]`` are the grid indices (within image i's
    own patch tokens, ascending) still present; ``seq_positions[b][i]`` are
    where those tokens sit in ``hidden`` now. Rows a policy inserted inside
    the LLM (SparseVLM's merged tokens) follow the image's kept tokens and are
    named N + g in ``alive`` (N the image's token count, g the grid index of
    the token each stands at): never a grid index.
    """

    stage: str
    layer: int | None
    layouts: list[SampleLayout]
    hidden: torch.Tensor
    alive: list[list[torch.Tensor]]
    seq_positions: list[list[torch.Tensor]]
    question_seq_positions: list[torch.Tensor]
    adapter: Adapter
    captured: dict[str, Any] = field(default_factory=dict)
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_q: dict[int, torch.Tensor] = field(default_factory=dict)
    position_embeddings: Any = None
    mask2d: torch.Tensor | None = None
    #: ``(layer, part) -> (B, L)``: the policy's `sub_block_statistic` of each observed
    #: sub-block so far in this prefill, aligned with ``hidden`` (llm stage)
    sub_block_stats: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    #: the language model's declared extra inputs (``adapter.sequence_tensors``) as the prefill got them,
    #: before any prune (vision/projector stages): e.g. Qwen3-VL's DeepStack features (`feature_levels`)
    extras: dict[str, Any] = field(default_factory=dict)
    #: (llm stage) a progressive policy's values of this prefill, kept from one of its prune points to the next
    prefill_memo: dict[Any, Any] = field(default_factory=dict)
    _memo: dict[Any, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.layouts)

    def num_images(self, b: int) -> int:
        return len(self.layouts[b].images)

    def num_media(self, b: int) -> int:
        """Images and videos of sample b's prompt: `num_images`, except inside one vision-encoder call (only the
        media of that call's kind are laid out there; ``layouts[b].images[i].index`` is each one's place among all)."""
        return self.num_images(b)

    def alive_rank(self, b: int, i: int) -> torch.Tensor:
        """Image i's grid index -> its place among the image's alive tokens, -1 where no longer alive; ``(N,)``."""
        alive = self.alive[b][i]
        n = self.layouts[b].images[i].num_tokens
        own = torch.nonzero(alive < n).flatten()  # rows inserted inside the LLM stand beyond the grid (N + g)
        rank = torch.full((n,), -1, dtype=torch.long, device=alive.device)
        rank[alive[own]] = own
        return rank

    def features(self, b: int, i: int) -> torch.Tensor:
        """Current features of image i's alive tokens, ``(n, D)`` (post-projector at the projector stage)."""
        return self.hidden[b].index_select(0, self.seq_positions[b][i])  # one gather of rows (indexing: slower)

    def features_view(self, b: int, i: int) -> torch.Tensor:
        """`features`, as a view of ``hidden`` where image i's alive tokens are consecutive (no copy): read only."""
        return token_rows(self.hidden[b], self.seq_positions[b][i])

    def pre_projector(self, b: int, i: int) -> torch.Tensor:
        """Vision-encoder features of image i's alive tokens before the projector, ``(n, D')``."""
        feats = self.adapter.pre_projector_features(self.captured, self.layouts, b, i)
        return feats[self.alive[b][i].to(feats.device)]

    def feature_levels(self, b: int, i: int) -> list[torch.Tensor]:
        """Image i's alive rows of every per-token feature level the model carries beside the sequence.

        The adapter's ``rows_of`` extras (Qwen3-VL: the DeepStack features,
        one ``(n_visual, D)`` tensor per tapped ViT block, rows of its
        visual-position mask), each level's rows of image i's tokens in the
        tokens' order, ``(n, D)`` each. Empty where the model has none.
        Vision/projector stages (before the sequence is shortened).
        """
        levels = []
        for spec in self.adapter.sequence_tensors:
            value = self.extras.get(spec.name) if spec.rows_of else None
            mask = self.extras.get(spec.rows_of) if spec.rows_of else None
            if value is None or mask is None:
                continue
            if mask.dim() == 3:  # (B, L, D) as some models pass it: any channel tells
                mask = mask[..., 0]
            mask = mask.bool()
            row = torch.cumsum(mask.flatten().long(), 0) - 1  # row of each sequence position, row-major
            index = row[b * mask.shape[1] + self.seq_positions[b][i].to(row.device)]
            values = value if isinstance(value, (list, tuple)) else [value]
            levels += [v.index_select(spec.dim, index.to(v.device)) for v in values]
        return levels

    def write_feature_levels(self, b: int, i: int, index: torch.Tensor, values: list[torch.Tensor]) -> None:
        """Replace the rows of image i's alive tokens ``index`` in every feature level by ``values``.

        ``values``: one ``(k, D')`` tensor per level, in `feature_levels`'s
        order. The levels are copied on the first write of a stage (the
        model's own tensors are never written). Vision/projector stages.
        """
        if self.stage == "llm":
            raise RuntimeError("feature levels are rewritten only at the vision and projector stages")
        written = self._memo.setdefault("levels_written", set())
        values = list(values)
        for spec in self.adapter.sequence_tensors:
            value = self.extras.get(spec.name) if spec.rows_of else None
            mask = self.extras.get(spec.rows_of) if spec.rows_of else None
            if value is None or mask is None:
                continue
            if mask.dim() == 3:
                mask = mask[..., 0]
            row = torch.cumsum(mask.bool().flatten().long(), 0) - 1
            rows = row[b * mask.shape[1] + self.seq_positions[b][i][index.to(self.seq_positions[b][i].device)].to(row.device)]
            single = not isinstance(value, (list, tuple))
            levels = [value] if single else list(value)
            if spec.name not in written:
                levels = [t.clone() for t in levels]
                written.add(spec.name)
            for t in levels:
                t.index_copy_(spec.dim, rows.to(t.device), values.pop(0).to(t).movedim(0, spec.dim))
            self.extras[spec.name] = levels[0] if single else type(value)(levels)
        if values:
            raise RuntimeError(f"{len(values)} feature-level values left over: the model carries fewer levels")

    def question(self, b: int) -> torch.Tensor:
        """Current features of the sample's question tokens, ``(m, D)``."""
        return self.hidden[b].index_select(0, self.question_seq_positions[b])

    def layer_input(self, layer: int) -> torch.Tensor:
        """Hidden states entering decoder ``layer`` (captured during this prefill), ``(B, L, D)``."""
        if layer not in self.layer_inputs:
            raise NotCaptured(
                f"the input of decoder layer {layer} was not captured; a policy lists the layers it reads "
                f"in `Signals.decoder_inputs` (captured here: {sorted(self.layer_inputs)})"
            )
        return self.layer_inputs[layer]

    def queries(self, layer: int, b: int, i: int) -> torch.Tensor:
        """Pre-RoPE queries of decoder ``layer`` for image i's alive tokens, ``(n, heads, head_dim)``.

        Taken from the layer's own ``q_proj`` output in this prefill (listed in
        the policy's `Signals.decoder_queries`), so nothing is recomputed.
        """
        if layer not in self.layer_q:
            raise NotCaptured(
                f"the queries of decoder layer {layer} were not captured; a policy lists the layers it reads "
                f"in `Signals.decoder_queries` (captured here: {sorted(self.layer_q)})"
            )
        q = self.layer_q[layer][b, self.seq_positions[b][i]]
        return self.adapter.decoder_queries(layer, q)

    def attention_rows(self, layer: int, hidden: torch.Tensor, b: int, rows: torch.Tensor) -> torch.Tensor:
        """Causal attention of sample b's query ``rows`` to every key in decoder ``layer``, mean over heads, ``(n, L)`` fp32.

        Recomputed by the attention probe from ``hidden`` ``(L, D)`` (the
        layer's input for this sample) with this point's rotary tables and
        padding, so the model's own attention never returns weights.
        """
        return self.adapter.attention_rows(layer, hidden, self.rotary(b), rows, self.valid(b))

    def layer_keys(self, layer: int, b: int, origin: int | None = None) -> torch.Tensor:
        """Post-RoPE keys of decoder ``layer`` for sample b at this point, ``(L, kv_heads, head_dim)`` fp32.

        From the layer's captured input (listed in the policy's
        `layer_inputs_needed`) and this point's rotary tables: valid when no
        prune point lies between that layer and this one. With ``origin`` (a
        sequence index) every position is counted from that token's, so the
        keys do not depend on how the batch is padded.
        """
        rotary = self.rotary(b)
        if origin is not None:
            rotary = shift_rotary(*rotary, origin)
        return self.adapter.layer_keys(layer, self.layer_input(layer)[b], rotary)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The language model's final norm applied to ``hidden`` (DART's duplication features)."""
        return self.adapter.final_norm(hidden)

    def tokens_after(self, b: int, i: int) -> torch.Tensor:
        """Current positions of sample b's real tokens after image i's span (text, later images), ascending.

        Counted from the input: the valid tokens after the span, less the
        later images' tokens already pruned (only visual tokens ever leave).
        """
        layout = self.layouts[b]
        valid = torch.nonzero(self.valid(b)).flatten()
        end = layout.images[i].span[1]
        count = int(layout.valid[end:].sum())
        for j in range(i + 1, len(layout.images)):
            count -= layout.images[j].num_tokens - int(self.alive[b][j].numel())
        return valid[valid.numel() - count :] if count > 0 else valid[:0]

    def vision_attention(self, b: int, i: int, layer: int) -> torch.Tensor:
        """Attention each of image i's alive patch tokens receives in vision-encoder ``layer`` (0-based).

        Summed over all queries of the layer's attention (CLS included; Qwen:
        the queries of the same window or image), mean over heads, CLS column
        dropped, Qwen merge units averaged; recomputed by the ViT probe from the
        layer's captured input (listed in the policy's `Signals.vision_inputs`),
        once per batch.
        """
        return self._vision_values("received", self.adapter.vision_attention_received, b, i, layer)

    def vision_frame_saliency(self, b: int, i: int, layer: int) -> torch.Tensor:
        """FastVID's Qwen saliency of image i's alive tokens in vision ``layer`` (0-based), ``(n,)`` fp32.

        Per frame and head, the mean of the frame's rotated queries against
        each merge unit's mean rotated key, softmax over the frame's units,
        mean over heads (Qwen vision towers; window order undone).
        """
        return self._vision_values("frame_query", self.adapter.vision_frame_query_attention, b, i, layer)

    def vision_cls_attention(self, b: int, i: int, layer: int) -> torch.Tensor:
        """Attention the CLS token pays each of image i's alive patch tokens in vision ``layer`` (0-based).

        Summed over heads, softmax over every token of the crop (CLS
        included); CLIP encoders only (``adapter.vision_cls``).
        """
        return self._vision_values("cls", self.adapter.vision_cls_attention, b, i, layer)

    def vision_cls_feature(self, b: int, i: int, layer: int) -> torch.Tensor:
        """The CLS token's hidden state entering vision ``layer`` (0-based) for image i, ``(D',)``.

        The output of layer ``layer - 1``: with ``layer`` one past the
        scoring layer, the CLS row of the same hidden states the visual
        features come from (CLIP encoders, ``adapter.vision_cls``).
        """
        calls = self.captured.get("vision_layers", {}).get(layer)
        if not calls:
            raise NotCaptured(f"vision layer {layer} was not captured; list it in the policy's `Signals.vision_inputs`")
        return self.adapter.vision_cls_feature(self.captured, self.layouts, b, i, calls)

    def vision_keys(self, b: int, i: int, layer: int) -> torch.Tensor:
        """Keys of image i's alive patch tokens in vision ``layer`` (0-based), mean over heads, ``(n, head_dim)``.

        As the layer computes them (Qwen: after the vision RoPE, the 4 patches
        of each merge unit averaged).
        """
        return self._vision_values("keys", self.adapter.vision_keys, b, i, layer)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The model's projector applied to pre-projector rows (as `pre_projector` gives them)."""
        return self.adapter.project(features)

    def _vision_values(self, what: str, probe, b: int, i: int, layer: int) -> torch.Tensor:
        per_call = self._vision_per_call(what, layer, probe)
        values = self.adapter.vision_token_values(self.captured, self.layouts, b, i, per_call)
        return values[self.alive[b][i].to(values.device)]

    def vision_ran_on(self, layer: int) -> tuple | list:
        """``(grid, keep)`` per encoder call: the units vision ``layer`` (0-based) ran on, where an encoder-side
        prune (PixelPrune; ``vit_layer=k`` from layer k on) ran it on fewer than every patch; empty otherwise."""
        kept = self.captured.get("pixel_keep") or ()
        if layer < self.captured.get("pixel_keep_layer", 0):  # before a vit_layer prune: PixelPrune's units, if any
            kept = self.captured.get("pixel_keep_first") or ()
        return kept

    def _vision_per_call(self, what: str, layer: int, probe) -> list[torch.Tensor]:
        """``probe(layer, call)`` of every captured call of vision-encoder ``layer``, memoised for the batch."""
        if (what, layer) not in self._memo:
            calls = self.captured.get("vision_layers", {}).get(layer)
            if not calls:
                raise NotCaptured(f"vision layer {layer} was not captured; list it in the policy's `Signals.vision_inputs`")
            values = [probe(layer, call) for call in calls]
            # an encoder-side prune (PixelPrune; vit_layer=k from layer k on) ran these layers on the kept units:
            # back to one row per patch
            for c, (grid, keep) in enumerate(self.vision_ran_on(layer)[: len(values)]):
                values[c] = self.adapter.full_vit_rows(values[c], grid, keep)
            self._memo[(what, layer)] = values
        return self._memo[(what, layer)]

    def rotary(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of sample b at this point of the sequence, ``(L, head_dim)`` each (llm stage)."""
        if self.position_embeddings is None:
            raise NotCaptured("position embeddings are only available at the llm stage")
        return tuple(t[b if t.shape[0] > 1 else 0] for t in self.position_embeddings)

    def valid(self, b: int) -> torch.Tensor:
        """Non-padding positions of sample b in the current sequence, ``(L,)`` bool."""
        if self.mask2d is None:
            return torch.ones(self.hidden.shape[1], dtype=torch.bool, device=self.hidden.device)
        return self.mask2d[b].bool()

    def after_images(self, b: int) -> torch.Tensor:
        """Positions of sample b's tokens from the end of its last image span to the end of the prompt.

        Only visual patch tokens are ever pruned, so these tokens are the last
        valid ones of the current sequence, as many as after the span in the
        input (LLaVA-NeXT newlines are inside the span; Qwen's vision-end token
        follows it). Empty for a sample without images.
        """
        layout = self.layouts[b]
        valid = torch.nonzero(self.valid(b)).flatten()
        if not layout.images:
            return valid[:0]
        end = max(img.span[1] for img in layout.images)
        count = int(layout.valid[end:].sum())
        return valid[valid.numel() - count :]


def token_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, positions)``, or the same rows as a view of `x` where `positions` are consecutive
    ascending (an image's tokens before any prune: no copy of the features). Read only."""
    n = positions.numel()
    if n > 1 and x.device.type == "cpu" and positions.device == x.device:
        first = int(positions[0])
        if int(positions[-1]) - first == n - 1 and bool((positions.diff() == 1).all()):
            return x.narrow(0, first, n)
    return x.index_select(0, positions)
