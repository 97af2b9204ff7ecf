"""What the tools around the runtime need of a model family, declared next to its adapter.

An `Adapter` reads a model while it runs; a `FamilySpec` is the rest of the
family's knowledge: how to build a tiny random-weight model of it and
matching inputs without a processor (`vtprune.tiny`), how its batches split
into samples, the demo's processor inputs for a real photo (`vtprune.demo`),
and what ``vtprune bench`` and ``vtprune show`` can do with it. Every family
module defines one and sets it as its adapter's ``spec``, so a new family is
its module plus one row of `ADAPTERS`; the generic code reads the spec and
never branches on a family's name.

Nothing here imports a transformers model module at import time (``import
vtprune`` must work beside a broken torchvision): the config and model
classes are looked up when a tiny model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

VOCAB = 128
IMAGE_TOKEN = 100
VIDEO_TOKEN = 101
VISION_START = 102
VISION_END = 103


@dataclass
class Geometry:
    """Sizes of a tiny model. ``image_size``/``patch`` set the token grid."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    image_size: int = 32
    patch: int = 4


@dataclass
class SampleSpec:
    """One sample of a synthetic batch.

    ``images``: a list of image sizes in pixels ``(height, width)`` (LLaVA
    ignores the size: its images are always ``image_size`` square);
    ``videos``: ``(frames, height, width)`` in pixels (Qwen; LLaVA-OneVision reads only the frame count;
    families with ``FamilySpec.timestamp_tokens`` put a timestamp of text tokens before each temporal frame);
    ``prefix``/``question``: text tokens before the first and after the last image.
    """

    images: tuple[tuple[int, int], ...] = ()
    videos: tuple[tuple[int, int, int], ...] = ()
    prefix: int = 3
    question: int = 5


def text_kwargs(g: Geometry) -> dict:
    """The decoder config of a tiny model (every family's text side)."""
    return dict(
        vocab_size=VOCAB,
        hidden_size=g.hidden,
        intermediate_size=g.intermediate,
        num_hidden_layers=g.layers,
        num_attention_heads=g.heads,
        num_key_value_heads=g.kv_heads,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def vit_kwargs(g: Geometry) -> dict:
    """The square-image ViT of the LLaVA families (CLIP, SigLIP)."""
    return dict(
        hidden_size=g.vision_hidden,
        intermediate_size=2 * g.vision_hidden,
        num_hidden_layers=g.vision_layers,
        num_attention_heads=2,
        image_size=g.image_size,
        patch_size=g.patch,
    )


def placeholder_runs(flags: torch.Tensor) -> int:
    """Runs of True in a 1-D bool tensor (the placeholder spans of a row; text separates them in these specs)."""
    ids = flags.int()
    return int(((ids[1:] - ids[:-1]) == 1).sum()) + int(ids[0])


@dataclass
class TinyBatch:
    """What `vtprune.tiny.make_inputs` collects while it writes the prompts; a spec adds each image and video.

    ``pixels``/``videos``: one tensor per image / video; ``sizes``: image sizes ``[h, w]``; ``grids``/``vgrids``:
    ``[t, h, w]`` grids (the M-RoPE families); ``counts``: images per sample.
    """

    model: Any
    adapter: Any
    gen: torch.Generator
    pixels: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    sizes: list = field(default_factory=list)
    grids: list = field(default_factory=list)
    vgrids: list = field(default_factory=list)
    counts: list = field(default_factory=list)

    @property
    def vision(self):
        return self.model.config.vision_config

    def text(self, n: int) -> list[int]:
        """`n` random text token ids."""
        return torch.randint(3, 90, (n,), generator=self.gen).tolist()

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)


class FamilySpec:
    """A family's knowledge outside the runtime; each family module subclasses it (see the module docstring)."""

    #: the ``...ForConditionalGeneration`` class, by its name in ``transformers`` (looked up when needed)
    hf_class: ClassVar[str] = ""
    #: True where every image is one ``image_size`` square view whatever its size (LLaVA-1.5)
    square_images: ClassVar[bool] = False
    #: text tokens of the timestamp before every temporal frame of a video in the tiny inputs (0: none, the
    #: video is one vision span); Qwen3-VL's processor writes ``<1.0 seconds>``
    timestamp_tokens: ClassVar[int] = 0
    #: `Geometry` fields the demo changes for this family (its real view size)
    demo_geometry: ClassVar[dict[str, Any]] = {}
    #: config attributes the demo sets on the model (the released checkpoints' values)
    demo_config: ClassVar[dict[str, Any]] = {}
    #: True where ``vtprune bench`` also times the hand-written bare pipeline (``eval.bench._Bare``: LLaVA-1.5's)
    bench_bare: ClassVar[bool] = False
    #: True where ``vtprune show`` draws the kept patches (one view per image, `view_and_grid`)
    drawn: ClassVar[bool] = False
    #: True where `demo_video` builds video inputs (``vtprune show --video``, ``eval.video_bench``)
    video_demo: ClassVar[bool] = False
    #: frames one video slot holds (Qwen: 2, a temporal patch); a demo video's frame count is a multiple of it
    frames_per_slot: ClassVar[int] = 1

    # --- the tiny model -------------------------------------------------------
    def tiny_config(self, g: Geometry):
        """The config of a tiny random-weight model of this family with geometry `g`."""
        raise NotImplementedError

    def model_class(self) -> type[PreTrainedModel]:
        import transformers

        return getattr(transformers, self.hf_class)

    # --- tiny inputs (`vtprune.tiny.make_inputs`) -----------------------------
    def tiny_image(self, batch: TinyBatch, size: tuple[int, int], images_in_sample: int) -> list[int]:
        """Add one image of `size` (h, w) to `batch`; return its placeholder ids in the prompt."""
        raise NotImplementedError

    def tiny_video(self, batch: TinyBatch, frames: int, height: int, width: int) -> list[int]:
        """Add one video to `batch`; return its placeholder ids (and timestamps) in the prompt."""
        raise ValueError(f"{batch.adapter.model_type}: the tiny inputs have no videos for this family")

    def tiny_visual_inputs(self, batch: TinyBatch) -> dict[str, torch.Tensor]:
        """The model's visual inputs for the images and videos added to `batch`."""
        raise NotImplementedError

    def single_sample(self) -> SampleSpec:
        """One sample with one image (a non-square one where the family has image sizes)."""
        return SampleSpec(images=((32, 48),) if not self.square_images else ((32, 32),), question=6)

    def mixed_samples(self) -> list[SampleSpec]:
        """Unequal samples: different image sizes (where the family has them), two images, none, padding."""
        if self.square_images:
            return [
                SampleSpec(images=((32, 32),), question=4),
                SampleSpec(images=((32, 32), (32, 32)), question=7),
                SampleSpec(question=9),
            ]
        return [
            SampleSpec(images=((32, 48),), question=4),
            SampleSpec(images=((48, 32), (32, 32)), question=7),
            SampleSpec(question=9),
        ]

    # --- samples of a batch ---------------------------------------------------
    def alone_visual_inputs(self, batch: dict, b: int, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sample b's own visual inputs from `batch` (`mask`: its non-padding positions)."""
        raise NotImplementedError

    # --- the demo's photo -----------------------------------------------------
    def demo_video_side(self, model) -> int:
        """The side in pixels of a demo video's square frames."""
        return model.config.vision_config.image_size

    def demo_video(self, model, frames: list) -> dict:
        """Processor-equivalent inputs of one video (``frames``: HxWx3 uint8 arrays) in a short prompt."""
        raise NotImplementedError(f"{type(self).__name__} builds no demo video")

    def demo_image(self, model, adapter, image, pixels: int) -> tuple[dict, list[int]]:
        """The processor's outputs for one photo and the placeholder ids of the prompt; `pixels`: the
        resize target of the dynamic-resolution families."""
        raise NotImplementedError

    # --- ``vtprune show`` -----------------------------------------------------
    def view_and_grid(self, model, processor, inputs: dict, image):
        """The picture the model sees (H x W x 3 uint8) and its token grid (rows, cols); where `drawn`."""
        raise NotImplementedError
