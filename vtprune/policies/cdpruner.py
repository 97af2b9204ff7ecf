"""CDPruner: conditional diversity by a determinantal point process, at the projector stage."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..checks import check_bool
from ..context import StageContext
from ..ops.dpp import (
    cdpruner_select,
    minmax_clip,
    minmax_llm,
    relevance_clip,
    relevance_llm,
    split_halves,
    view_budgets,
)
from .base import Policy, Selection, register

TEXT_SOURCES = ("llm", "clip")


def load_clip(path: str | os.PathLike) -> tuple[Any, Any]:
    """A CLIP model and its tokenizer from a local folder (no download is attempted beyond what HF caches allow)."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(path)
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(path)


@register
@dataclass(frozen=True)
class CDPruner(Policy):
    """Keep the tokens that maximise a conditional DPP: diverse among themselves and relevant to the question.

    Source: "Beyond Attention or Similarity: Maximizing Conditional Diversity
    for Token Pruning in MLLMs" (CDPruner, NeurIPS 2025), official code
    Theia-4869/CDPruner (``llava/model/llava_arch.py``,
    ``llava/model/multimodal_encoder/clip_encoder.py``); the LLM-embedding
    relevance, ``relevance_weight`` and ``split`` follow its OpenVINO GenAI
    port (``src/cpp/src/visual_language/cdpruner/``). Per image:
    S = cosine of the post-projector rows, relevance r in [0, 1], kernel
    ``L_ij = r_i S_ij r_j``, and the fast greedy MAP of the DPP
    (`vtprune.ops.dpp.dpp_greedy_map`), exactly ``keep`` picks, ascending.
    Needs no attention at all.

    Relevance (``text``):

    - ``"llm"`` (default, every family): cosine of each row with the mean of
      the question's LLM input embeddings, min-max ``(r - min) / (max - min + 1e-6)``
      over the image. OpenVINO averages every prompt position outside the
      vision span (system prompt and template too); vtprune only the
      question (the adapter's question span). No question tokens: r = 1
      (the kernel is S).
    - ``"clip"`` (llava, llava_next: the reference's setting): a CLIP model
      (``clip_model``: a loaded ``transformers.CLIPModel`` or a local path,
      with ``clip_tokenizer``, loaded from the path when omitted). Image:
      ``visual_projection(post_layernorm(layer -2 patch rows))`` in fp32.
      Text: the question decoded with the LLM tokenizer given to
      ``vtprune.wrap(..., tokenizer=...)``, tokenized without truncation,
      zero-padded to a multiple of the text tower's 77 positions and cut
      into segments, one projected embedding per segment. r = mean over
      segments of ``-cos`` (the authors' CLIP-specific sign), min-max
      ``(r - min + 1e-6) / (max - min)`` over all views of the image, as the
      reference. The reference also strips benchmark suffixes from the
      question; vtprune uses the question span as it is.

    Views: LLaVA-NeXT's base and high-resolution views, LLaVA-OneVision's
    views and a Qwen video's frames are separate DPPs with ``keep // views``
    each and the remainder to the base view (a view smaller than its share
    keeps all and passes the rest on, base view first); relevance is
    normalised over the whole image. Several images: each its own problem.

    Departures from the official code (all on purpose): fp32 throughout (the
    reference normalises in fp16); ties to the lowest index; a budget above
    the kernel's rank fills the remaining picks with the most relevant
    unpicked tokens (with a warning) where the reference picks NaN; on
    LLaVA-NeXT vtprune selects among the tokens HF keeps after unpadding (the
    reference budgets the forced 2x2 grid and loses the picks in the unpad
    margin) and keeps HF's packing; the LLaVA-1.5 reference flattens all
    images of a batch into one problem, vtprune selects per image; original
    positions (the reference renumbers, OpenVINO restarts the text at the
    last kept position + 1); on Qwen no sign flip and kernel r S r (the
    authors' advice, issue #7), OpenVINO's eps terms left out; OpenVINO
    rounds a fractional budget half away from zero, vtprune half to even.

    Parameters:
        keep: tokens per image (int) or fraction (float in (0, 1]); default 64.
        text: ``"llm"`` (default) or ``"clip"``.
        relevance_weight: w in [0, 1]; 1.0 (default) is the reference's kernel,
            w < 1 OpenVINO's blend ``(1 - w) S + w r_i S_ij r_j`` (its default 0.5).
        split: False (default); True is OpenVINO's split: the first ``n // 2``
            tokens of each view and the rest are separate problems (own
            relevance normalisation and kernel) with ``k // 2`` and the rest of
            the picks.
        clip_model: for ``text="clip"``, a loaded ``CLIPModel`` or a local path.
        clip_tokenizer: its tokenizer (loaded from ``clip_model`` when that is a path).
    """

    keep: int | float = 64
    text: str = "llm"
    relevance_weight: float = 1.0
    split: bool = False
    clip_model: Any = None
    clip_tokenizer: Any = None
    #: the CLIP model and tokenizer in use (loaded from the path, or the objects given); not compared
    _clip: tuple[Any, Any] | None = field(default=None, init=False, repr=False, compare=False)

    name: ClassVar[str] = "cdpruner"
    stage: ClassVar[str] = "projector"
    paper: ClassVar[str] = "CDPruner (NeurIPS 2025), code Theia-4869/CDPruner; OpenVINO GenAI port"
    rounding: ClassVar[str] = "round"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.text not in TEXT_SOURCES:
            raise ValueError(f"cdpruner: text must be one of {TEXT_SOURCES}; got {self.text!r}")
        w = self.relevance_weight
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(float(w)) or not 0 <= float(w) <= 1:
            raise ValueError(f"cdpruner: relevance_weight must be a number in [0, 1]; got {w!r}")
        self._set("relevance_weight", float(w))
        check_bool(self.name, "split", self.split)
        model, tokenizer = self.clip_model, self.clip_tokenizer
        if self.text == "llm":
            if model is not None or tokenizer is not None:
                raise ValueError("cdpruner: clip_model and clip_tokenizer are for text='clip'; text='llm' uses the LLM")
        else:
            if model is None:
                raise ValueError("cdpruner: text='clip' needs clip_model= (a loaded transformers.CLIPModel or a local path)")
            if isinstance(model, (str, os.PathLike)):
                loaded, loaded_tok = load_clip(model)
                model, tokenizer = loaded, tokenizer if tokenizer is not None else loaded_tok
            if not all(hasattr(model, a) for a in ("text_model", "vision_model", "visual_projection", "text_projection")):
                raise TypeError(
                    f"cdpruner: clip_model must be a transformers CLIPModel or a path to one; got {type(model).__name__}"
                )
            if tokenizer is None or not callable(tokenizer):
                raise ValueError("cdpruner: text='clip' with a loaded clip_model needs clip_tokenizer= (its tokenizer)")
        self._set("_clip", (model, tokenizer) if self.text == "clip" else None)

    def _clip_models(self) -> tuple[Any, Any]:
        """The CLIP model and tokenizer (``text="clip"``)."""
        assert self._clip is not None, "cdpruner: the CLIP model is loaded for text='clip' only"
        return self._clip

    def resolve(self, adapter) -> Policy:
        """Check ``text="clip"`` against the model: a CLIP family, matching widths and an LLM tokenizer to decode with."""
        if self.text != "clip":
            return self
        if not adapter.vision_cls:  # the CLIP towers (a CLS token) are what the reference's text tower pairs with
            from ..patches import ADAPTERS

            clip = tuple(t for t, cls in sorted(ADAPTERS.items()) if cls.vision_cls)
            raise ValueError(
                f"cdpruner: text='clip' pairs the CLIP ViT-L towers of {clip}; {adapter.model_type} has "
                "another vision encoder (use text='llm')"
            )
        model = self._clip_models()[0]
        width = adapter.config.vision_config.hidden_size
        if model.config.vision_config.hidden_size != width:
            raise ValueError(
                f"cdpruner: clip_model's vision width {model.config.vision_config.hidden_size} differs from this "
                f"model's vision tower ({width}); give the CLIP checkpoint the tower was taken from"
            )
        if getattr(adapter, "tokenizer", None) is None:
            raise ValueError(
                "cdpruner: text='clip' decodes the question for CLIP's text tower; give the LLM's tokenizer or "
                "processor: vtprune.wrap(model, 'cdpruner', text='clip', ..., tokenizer=processor)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in ("clip_model", "clip_tokenizer"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                out[key] = type(value).__name__
            elif value is not None:
                out[key] = str(value)
        return out

    # --- relevance ---------------------------------------------------------

    def _question_text(self, ctx: StageContext, b: int) -> str:
        ids = ctx.captured["input_ids"][b, ctx.layouts[b].question_positions.to(ctx.captured["input_ids"].device)]
        return ctx.adapter.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()

    @torch.no_grad()
    def _clip_text_embeds(self, ctx: StageContext, b: int) -> torch.Tensor:
        """Projected CLIP text embeddings of the sample's question, one per 77-position segment, memoised per sample."""
        key = ("cdpruner_clip_text", b)
        if key not in ctx._memo:
            model, tokenizer = self._clip_models()
            device = model.text_projection.weight.device
            width = model.config.text_config.max_position_embeddings
            tokens = tokenizer(text=[self._question_text(ctx, b)], return_tensors="pt")
            ids, mask = tokens["input_ids"], tokens.get("attention_mask", torch.ones_like(tokens["input_ids"]))
            segments = (ids.shape[1] - 1) // width + 1
            pad = width * segments - ids.shape[1]
            ids, mask = (torch.cat([t, t.new_zeros(t.shape[0], pad)], dim=1).reshape(-1, width).to(device) for t in (ids, mask))
            pooled = model.text_model(input_ids=ids, attention_mask=mask).pooler_output
            ctx._memo[key] = F.linear(pooled.float(), model.text_projection.weight.float())
        return ctx._memo[key]

    @torch.no_grad()
    def _clip_image_embeds(self, ctx: StageContext, b: int, i: int) -> torch.Tensor:
        model = self._clip_models()[0]
        norm = model.vision_model.post_layernorm
        device = norm.weight.device
        rows = ctx.pre_projector(b, i).to(device).float()
        rows = F.layer_norm(rows, norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
        return F.linear(rows, model.visual_projection.weight.float())

    def raw_relevance(self, ctx: StageContext, b: int, i: int, features: torch.Tensor) -> torch.Tensor | None:
        """Unnormalised relevance of image i's alive tokens ``(n,)``, or None when the sample has no question."""
        if ctx.question_seq_positions[b].numel() == 0:
            return None
        if self.text == "llm":
            return relevance_llm(features, ctx.question(b))
        raw = relevance_clip(self._clip_image_embeds(ctx, b, i), self._clip_text_embeds(ctx, b))
        return raw.to(features.device)

    def _normalise(self, raw: torch.Tensor | None, n: int, device) -> torch.Tensor:
        if raw is None:
            return torch.ones(n, device=device)
        return minmax_clip(raw) if self.text == "clip" else minmax_llm(raw)

    # --- selection -----------------------------------------------------------

    def select_image(self, ctx: StageContext, b: int, i: int, k: int) -> Selection:
        features = ctx.features(b, i)
        n, device = features.shape[0], features.device
        if k >= n:
            return Selection(torch.arange(n, device=device))
        raw = self.raw_relevance(ctx, b, i, features)
        relevance = None if self.split else self._normalise(raw, n, device)
        grids = ctx.layouts[b].images[i].grids
        if len(grids) > 1:  # alive tokens are ascending grid indices; sub-grids are consecutive ranges of them
            ends = torch.tensor([g.offset + g.size for g in grids], device=device)
            grid_of = torch.bucketize(ctx.alive[b][i].to(device), ends, right=True)
            sizes = torch.bincount(grid_of, minlength=len(grids)).tolist()
        else:
            sizes = [n]
        parts, start = [], 0
        for size, kv in zip(sizes, view_budgets(sizes, k)):
            view = slice(start, start + size)
            if kv >= size:
                parts.append(torch.arange(start, start + size, device=device))
            elif kv > 0 and relevance is not None:  # not split
                parts.append(cdpruner_select(features[view], relevance[view], kv, self.relevance_weight) + start)
            elif kv > 0:
                (n1, k1), (_, k2) = split_halves(size, kv)
                for lo, hi, kh in ((start, start + n1, k1), (start + n1, start + size, k2)):
                    half_raw = None if raw is None else raw[lo:hi]
                    rel = self._normalise(half_raw, hi - lo, device)
                    parts.append(cdpruner_select(features[lo:hi], rel, kh, self.relevance_weight) + lo)
            start += size
        return Selection(torch.sort(torch.cat(parts)).values)

    def describe(self) -> str:
        extra = "" if self.relevance_weight == 1.0 else f", relevance_weight={self.relevance_weight}"
        return f"cdpruner(text={self.text}{extra}{', split' if self.split else ''})"
