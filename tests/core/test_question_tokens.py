"""The adapters hand text-conditioned policies the user's question, not the chat template around it."""

from __future__ import annotations

import torch
from helpers import model_for

from vtprune.patches import adapter_for
from vtprune.tiny import IMAGE_TOKEN, VISION_END, VISION_START


class WordTokenizer:
    """A stand-in tokenizer: one id per known word."""

    vocab = {"ASSISTANT:": 50, " ASSISTANT:": 51, "<|im_end|>": 60, " <|im_end|>": 61}

    def encode(self, text, add_special_tokens=False):
        return [self.vocab[text]] if text in self.vocab else [99, 98]


def _question(adapter, ids):
    ids = torch.tensor(ids)
    images = adapter.find_images({"image_grid_thw": torch.tensor([[1, 4, 4]])}, ids, {"image": 0, "video": 0})
    return adapter.question_positions(ids, images, torch.ones(len(ids), dtype=torch.bool)).tolist()


def test_llava_question_stops_at_the_assistant_marker_with_a_tokenizer():
    adapter = adapter_for(model_for("llava"))
    prompt = [1, 7, 8] + [IMAGE_TOKEN] * 64 + [13, 21, 22, 23, 51, 30]
    start = 3 + 64
    assert _question(adapter, prompt) == list(range(start, start + 6))  # no tokenizer: everything after the image
    adapter.set_tokenizer(WordTokenizer())
    assert _question(adapter, prompt) == list(range(start, start + 4))  # "\n q1 q2 q3", not " ASSISTANT: x"


def test_qwen_question_excludes_vision_frame_tokens_and_stops_at_end_of_turn():
    adapter = adapter_for(model_for("qwen2_5_vl"))
    prompt = [1, 7, VISION_START] + [IMAGE_TOKEN] * 4 + [VISION_END, 21, 22, 2, 5, 6]  # 2 = the tiny model's eos
    assert _question(adapter, prompt) == [8, 9]
    adapter.set_tokenizer(WordTokenizer())
    prompt[10] = 60  # <|im_end|> as a template marker
    assert _question(adapter, prompt) == [8, 9]
