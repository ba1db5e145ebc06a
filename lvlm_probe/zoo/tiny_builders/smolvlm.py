"""Tiny SmolVLMForConditionalGeneration: Idefics3's architecture, SmolVLM's processor and template.

As for the tiny Idefics3, the image processor scales an image's longest edge to ``size`` and cuts it
into crops of ``max_image_size`` plus a global view: a 40x56 image becomes 3x3 crops, a 72x48 image
3x2, each ``IMAGE_SEQ_LEN`` = 2x2 tokens after pixel shuffle. The processor also needs a video
processor (and the ``num2words`` package), which the image prompts never use.
"""
from __future__ import annotations

from transformers import (
    LlamaConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
    SmolVLMVisionConfig,
)

# Same sizes and crop arithmetic as the tiny Idefics3, whose architecture SmolVLM shares.
from .idefics3 import IMAGE_SEQ_LEN, LONGEST_EDGE, SCALE_FACTOR, row_col_tokens
from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "smolvlm"


# HuggingFaceTB/SmolVLM2's template: "<|im_start|>User:<image>text<end_of_utterance>\nAssistant:".
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# The processor reads these names from the tokenizer, as the real tokenizer_config declares them.
NAMED_TOKENS = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}


def build():
    # The template writes BOS itself, so the tokenizer does not add a second one.
    tokenizer = build_tokenizer(
        [*NAMED_TOKENS.values(), *row_col_tokens()], bos_token="<|im_start|>", eos_token="<end_of_utterance>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>", extra_attributes=NAMED_TOKENS,
    )
    config = SmolVLMConfig(
        vision_config=SmolVLMVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION),
        text_config=LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                **TEXT),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=SCALE_FACTOR,
    )
    config.architectures = ["SmolVLMForConditionalGeneration"]
    model = SmolVLMForConditionalGeneration(config).eval()
    sizes = {"size": {"longest_edge": LONGEST_EDGE}, "max_image_size": {"longest_edge": IMAGE_SIZE}}
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(**sizes), tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(**sizes), image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor
