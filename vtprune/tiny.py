"""Small random-weight models of every supported family, built from configs (no downloads).

Used by the tests, the demo and the CPU benchmark. ``tiny_model(family)``
gives a model with real geometry knobs (image size, patch size, widths) and
``make_inputs`` builds matching inputs (placeholder tokens, pixel values,
grid metadata) without a processor.
"""

from __future__ import annotations

import torch

from .patches import ADAPTERS, family_spec, supported_model_types
from .patches.family import (  # noqa: F401  (the tiny models' vocabulary, re-exported)
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    VOCAB,
    Geometry,
    SampleSpec,
    TinyBatch,
)

#: the tiny models follow the one table of supported model types (each family's spec builds its config)
FAMILIES = tuple(supported_model_types())
#: the M-RoPE (Qwen) families
QWEN = tuple(t for t, adapter in ADAPTERS.items() if adapter.mrope)


def tiny_config(family: str, geometry: Geometry | None = None):
    """The config of a tiny model of `family` (its `FamilySpec.tiny_config`)."""
    return family_spec(family).tiny_config(geometry or Geometry())


def tiny_model(
    family: str, geometry: Geometry | None = None, attn: str = "sdpa", seed: int = 0, dtype: torch.dtype = torch.float32
):
    """A random-weight model of `family` in eval mode (deterministic for a seed)."""
    config = tiny_config(family, geometry)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = family_spec(family).model_class()._from_config(config, attn_implementation=attn, dtype=dtype)
    return model.eval()


def make_inputs(model, specs: list[SampleSpec], seed: int = 0, pad_left: bool = True) -> dict:
    """Inputs for a tiny model: placeholder tokens, pixels and grid metadata, left padding.

    The prompts are written here; each image and video comes from the family's
    `FamilySpec` (`tiny_image`, `tiny_video`, `tiny_visual_inputs`).
    """
    from .patches import adapter_for

    adapter = adapter_for(model)
    spec = adapter.spec
    batch = TinyBatch(model, adapter, torch.Generator().manual_seed(seed))
    rows = []
    for sample in specs:
        ids = [1] + batch.text(sample.prefix)
        batch.counts.append(len(sample.images))
        for size in sample.images:
            ids += spec.tiny_image(batch, size, len(sample.images))
            ids += batch.text(2)
        for t, h, w in sample.videos:
            ids += spec.tiny_video(batch, t, h, w)
            ids += batch.text(2)
        ids += batch.text(sample.question)
        rows.append(ids)

    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(width - len(r), width) if pad_left else slice(0, len(r))
        input_ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
    out = {"input_ids": input_ids, "attention_mask": mask, **spec.tiny_visual_inputs(batch)}
    if adapter.mrope:
        out["mm_token_type_ids"] = ((input_ids == IMAGE_TOKEN).long() + 2 * (input_ids == VIDEO_TOKEN).long()).int()
    return out


# ---------------------------------------------------------------- batches and their samples, for checks
def single_spec(family: str) -> SampleSpec:
    """One sample with one image (the family's `FamilySpec.single_sample`)."""
    return family_spec(family).single_sample()


def mixed_specs(family: str) -> list[SampleSpec]:
    """Unequal samples: different image sizes (where the family has them), two images, none, padding."""
    return family_spec(family).mixed_samples()


def sample_alone(batch, b, family):
    """Sample b of a batch as a batch of one (padding removed, its own pixels and grids)."""
    mask = batch["attention_mask"][b].bool()
    ids = batch["input_ids"][b][mask].unsqueeze(0)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = batch["mm_token_type_ids"][b][mask].unsqueeze(0)
    out.update(family_spec(family).alone_visual_inputs(batch, b, mask))
    return out


def patch_positions(model, batch, b: int = 0) -> torch.Tensor:
    """Positions of sample b's patch tokens, found independently of the adapters.

    Visual placeholders from the token ids; for LLaVA-NeXT the newline rows
    (LLaVA-OneVision: also the one after a multi-image view or a video) are
    dropped by recognising the learned ``image_newline`` vector in the
    language model's input.
    """
    ids = batch["input_ids"][b]
    visual = torch.nonzero((ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)).flatten()
    newline = getattr(getattr(model, "model", model), "image_newline", None)
    if newline is None:
        return visual
    embeds = lm_input_embeds(model, batch)
    return visual[~(embeds[b, visual] == newline).all(-1)]


def lm_input_embeds(model, batch) -> torch.Tensor:
    """The merged input embeddings the language model receives for `batch` (before any pruning)."""
    seen: dict[str, torch.Tensor] = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.update(e=kw["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen["e"]
