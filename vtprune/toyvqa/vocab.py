"""The toy word-level tokenizer and the prompt format of each architecture."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from vtprune.toyvqa.questions import ANSWERS, PLURAL
from vtprune.toyvqa.scene import COLOR_NAMES, SHAPES

ARCHS: tuple[str, ...] = ("llava", "qwen2_5_vl")
SPECIALS: tuple[str, ...] = (
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<image>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_WORDS = [
    "USER",
    "ASSISTANT",
    "user",
    "assistant",
    "system",
    ":",
    "?",
    ".",
    ",",
    "what",
    "color",
    "colour",
    "is",
    "the",
    "there",
    "a",
    "how",
    "many",
    "are",
    "on",
    "left",
    "or",
    "right",
    "at",
    "top",
    "bottom",
    "character",
    "written",
    "in",
    "image",
    "letter",
    "digit",
    "shown",
    "of",
]

#: Chat templates in the style of each original model (single image + text turns).
CHAT_TEMPLATES: dict[str, str] = {
    "llava": (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
    "qwen2_5_vl": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}


def prompt(arch: str, question: str) -> str:
    """The single-turn prompt for ``question`` (what the chat template renders)."""
    if arch == "llava":
        return f"USER: <image>\n{question} ASSISTANT:"
    if arch == "qwen2_5_vl":
        return f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def follow_up(arch: str, question: str) -> str:
    """A later user turn (no image) in a packed multi-question training sequence."""
    if arch == "llava":
        return f" USER: {question} ASSISTANT:"
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def end_of_answer(arch: str) -> str:
    """The token that ends an answer (the generation stop token)."""
    return "</s>" if arch == "llava" else "<|im_end|>"


def vocabulary() -> list[str]:
    """All tokens, specials first, in id order."""
    words = list(_WORDS) + list(COLOR_NAMES) + list(SHAPES) + list(PLURAL.values()) + list(ANSWERS)
    seen: dict[str, None] = dict.fromkeys(SPECIALS)
    for w in words:
        seen.setdefault(w, None)
    return list(seen)


def token_ids(tokenizer: PreTrainedTokenizerFast, tokens: list[str]) -> list[int]:
    """`convert_tokens_to_ids` of a list of tokens (transformers types one token's and a list's result alike)."""
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert isinstance(ids, list)
    return ids


def build_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer (left padding, BOS prepended) for ``arch``."""
    vocab = {t: i for i, t in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    eos = end_of_answer(arch)
    extra = {"image_token": "<image>"} if arch == "llava" else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token=eos,
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        chat_template=CHAT_TEMPLATES[arch],
        model_max_length=4096,
        extra_special_tokens=extra,
    )
