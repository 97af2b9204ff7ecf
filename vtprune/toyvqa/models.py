"""Tiny LLaVA-1.5 and Qwen2.5-VL models built from the real HF classes, with processors.

The models are small enough to train on a CPU but keep the original
geometry where it matters for pruning: the LLaVA model sees 336 px images as
24x24 = 576 visual tokens (CLIP ViT, patch 14, ``vision_feature_layer=-2``,
``"default"`` strategy), the Qwen2.5-VL model sees 448 px images as 32x32
patches merged 2x2 into 256 visual tokens.

Processors use the PIL image-processor backends (torchvision is not a
dependency). ``Qwen2_5_VLProcessor`` expects a video processor, which needs
torchvision in transformers 5.x, so :func:`build_processor` and
:func:`load_processor` construct it with explicit components and no video
processor (see :func:`_tolerate_missing_video_processor`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)

from vtprune.checks import BadValue
from vtprune.toyvqa.vocab import ARCHS, build_tokenizer

IMAGE_SIZE: dict[str, int] = {"llava": 336, "qwen2_5_vl": 448}
#: Side, in pixels, of the image region behind one visual token of the LLM.
TOKEN_CELL: dict[str, int] = {"llava": 14, "qwen2_5_vl": 28}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Model sizes; kept small so a step takes about a second on one CPU thread.
SIZES: dict[str, dict[str, int]] = {
    "llava": {
        "vit_width": 128,
        "vit_layers": 4,
        "vit_heads": 4,
        "llm_width": 128,
        "llm_layers": 4,
        "llm_heads": 4,
    },
    "qwen2_5_vl": {
        "vit_width": 96,
        "vit_layers": 3,
        "vit_heads": 4,
        "llm_width": 128,
        "llm_layers": 4,
        "llm_heads": 4,
    },
}


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise BadValue(f"unknown arch {arch!r}; expected one of {ARCHS}")


def build_model(arch: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised (seeded) toy model of ``arch``."""
    _check_arch(arch)
    torch.manual_seed(seed)
    s = SIZES[arch]
    vocab = len(tokenizer)
    common = {
        "vocab_size": vocab,
        "hidden_size": s["llm_width"],
        "intermediate_size": 3 * s["llm_width"],
        "num_hidden_layers": s["llm_layers"],
        "num_attention_heads": s["llm_heads"],
        "num_key_value_heads": s["llm_heads"],
        "max_position_embeddings": 2048,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "llava":
        vision = CLIPVisionConfig(
            hidden_size=s["vit_width"],
            intermediate_size=4 * s["vit_width"],
            num_hidden_layers=s["vit_layers"],
            num_attention_heads=s["vit_heads"],
            image_size=IMAGE_SIZE[arch],
            patch_size=14,
            projection_dim=s["vit_width"],
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(**common),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            projector_hidden_act="gelu",
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_seq_length=576,
            tie_word_embeddings=False,
        )
        model = LlavaForConditionalGeneration(config)
        _init_sincos_positions(model.model.vision_tower.embeddings.position_embedding.weight, 336 // 14)
    else:
        head_dim = s["llm_width"] // s["llm_heads"]
        quarter = head_dim // 8
        text = {
            **common,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [
                    head_dim // 2 - 4 * quarter,
                    2 * quarter,
                    2 * quarter,
                ],
            },
        }
        vision = {
            "depth": s["vit_layers"],
            "hidden_size": s["vit_width"],
            "intermediate_size": 3 * s["vit_width"],
            "num_heads": s["vit_heads"],
            "out_hidden_size": s["llm_width"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [s["vit_layers"] - 1],
        }
        ids = {
            t: tokenizer.convert_tokens_to_ids(t)
            for t in (
                "<|image_pad|>",
                "<|video_pad|>",
                "<|vision_start|>",
                "<|vision_end|>",
            )
        }
        config = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=False,
        )
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes (grid*grid, dim), as in MAE (He et al., 2022)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angle = coord[:, None] * omega[None, :]
        parts += [angle.sin(), angle.cos()]
    codes = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(codes, (0, dim - codes.shape[1]))


@torch.no_grad()
def _init_sincos_positions(weight: torch.Tensor, grid: int) -> None:
    """Start the CLIP position embeddings (CLS first) from 2-D sine-cosine codes.

    With the default small random init the patch content swamps the position
    signal, and the tiny ViT never learnt where things are (needed for object
    shapes and left/right). The embeddings stay trainable.
    """
    weight[0].zero_()
    weight[1:] = sincos_2d(grid, weight.shape[1])


def build_image_processor(arch: str):
    """The PIL-backend image processor of ``arch`` at the toy geometry."""
    _check_arch(arch)
    size = IMAGE_SIZE[arch]
    if arch == "llava":
        return CLIPImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            do_center_crop=True,
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )
    return Qwen2VLImageProcessorPil(
        min_pixels=size * size,
        max_pixels=size * size,
        size={"shortest_edge": size * size, "longest_edge": size * size},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


@contextlib.contextmanager
def _tolerate_missing_video_processor():
    """Let ``ProcessorMixin`` accept ``video_processor=None``.

    transformers 5.x type-checks every processor component; without
    torchvision there is no video processor class to check a None against,
    and building ``Qwen2_5_VLProcessor`` fails. Images-only use never touches
    the video processor, so the check is skipped for a None argument while
    the processor is constructed (class-level, restored on exit).
    """
    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, argument_name, argument):
        if argument is None:
            return None
        return original(self, argument_name, argument)

    ProcessorMixin.check_argument_for_proper_class = check
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def build_processor(arch: str, tokenizer: PreTrainedTokenizerFast | None = None) -> ProcessorMixin:
    """The processor of ``arch`` (tokenizer, PIL image processor, chat template)."""
    _check_arch(arch)
    tokenizer = tokenizer or build_tokenizer(arch)
    image_processor = build_image_processor(arch)
    if arch == "llava":
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            image_token="<image>",
            num_additional_image_tokens=1,
            chat_template=tokenizer.chat_template,
        )
    with _tolerate_missing_video_processor():
        return Qwen2_5_VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=tokenizer.chat_template,
        )


def arch_of(path: str | Path) -> str:
    """The toy arch of a saved model folder, from its ``config.json``."""
    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    if model_type not in ARCHS:
        raise BadValue(f"{path} holds a {model_type!r} model; expected one of {ARCHS}")
    return model_type


def load_processor(path: str | Path) -> ProcessorMixin:
    """Load a saved toy processor offline.

    ``AutoProcessor.from_pretrained(path)`` works for the LLaVA folder; for
    Qwen2.5-VL it needs torchvision (for the video processor) in transformers
    5.x, so the processor is rebuilt from its saved tokenizer and image
    processor instead.
    """
    from transformers import AutoProcessor

    saved = Path(path) / "processor_config.json"
    classes = {"LlavaProcessor": "llava", "Qwen2_5_VLProcessor": "qwen2_5_vl"}
    arch = classes.get(json.loads(saved.read_text()).get("processor_class", "")) if saved.is_file() else None
    arch = arch or arch_of(path)
    if arch == "llava":
        # the PIL backend the model was trained with: where torchvision is installed, transformers would
        # otherwise pick the torchvision backend, whose resize differs in the last bits
        return AutoProcessor.from_pretrained(str(path), backend="pil")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
    with _tolerate_missing_video_processor():
        return Qwen2_5_VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=tokenizer.chat_template,
        )


def model_class(arch: str) -> type[PreTrainedModel]:
    """The HF class of ``arch``."""
    _check_arch(arch)
    return LlavaForConditionalGeneration if arch == "llava" else Qwen2_5_VLForConditionalGeneration


def save_processor(processor: ProcessorMixin, path: str | Path) -> None:
    """Save a toy processor so :func:`load_processor` (and ``AutoProcessor``) can load it.

    ``ProcessorMixin.save_pretrained`` cannot save a processor whose video
    processor is None, so for Qwen2.5-VL the tokenizer, image processor and a
    minimal ``processor_config.json`` are written one by one.
    """
    path = Path(path)
    if isinstance(processor, LlavaProcessor):
        processor.save_pretrained(str(path))
        return
    path.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(str(path))
    processor.image_processor.save_pretrained(str(path))
    (path / "processor_config.json").write_text(json.dumps({"processor_class": type(processor).__name__}, indent=2) + "\n")
    (path / "chat_template.jinja").write_text(processor.chat_template)
