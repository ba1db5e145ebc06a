"""Tiny DeepseekVLForConditionalGeneration: SigLIP vision tower, two-layer MLP aligner, Llama LM.

The image processor scales an image so its longest edge is ``IMAGE_SIZE`` and pads it to a square
(centred, in the mean colour), as deepseek-vl-1.3b-chat does at 384 px. The vision tower reads the
square as a ``(IMAGE_SIZE / PATCH_SIZE)^2`` = 4x4 patch grid without a class token, and the aligner
maps every patch state to one ``<image_placeholder>`` position: ``NUM_IMAGE_TOKENS`` per image
(576 = 24x24 in the real checkpoint).

transformers initialises no weight on the image path to zero (SigLIP's and the aligner's linear
weights are drawn, its biases are zero and its LayerNorms are ones), so nothing is redrawn.
"""
from __future__ import annotations

from transformers import (
    DeepseekVLConfig,
    DeepseekVLForConditionalGeneration,
    DeepseekVLImageProcessor,
    DeepseekVLProcessor,
    LlamaConfig,
    SiglipVisionConfig,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "deepseek_vl"

NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
BOS, EOS, IMAGE = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<image_placeholder>"

# deepseek-community/deepseek-vl-1.3b-chat's template: its system prompt, then "User: " + the
# content (an image is "<image_placeholder>") + "\n\n", then "Assistant:"; the tokenizer adds BOS.
CHAT_TEMPLATE = (
    "{% set seps = ['\n\n', '<\uff5cend\u2581of\u2581sentence\uff5c>'] %}{% set i = 0 %}"
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language.\n\n"
    "{% for message in messages %}{% if message['role']|lower == 'user' %}User: "
    "{% elif message['role']|lower == 'assistant' %}Assistant:"
    "{% if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' "
    "and message['content'][0]['text']=='') %} {% endif %}"
    "{% else %}{{ message['role'].capitalize() }}: {% endif %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image_placeholder>"
    "{% elif content['type'] == 'text' %}{% set text = content['text'] %}"
    "{% if loop.first %}{% set text = text.lstrip() %}{% endif %}"
    "{% if loop.last %}{% set text = text.rstrip() %}{% endif %}"
    "{% if not loop.first and message['content'][loop.index0-1]['type'] == 'text' %}{{ ' ' + text }}"
    "{% else %}{{ text }}{% endif %}{% endif %}{% endfor %}"
    "{% if not loop.last or add_generation_prompt %}{% if message['role']|lower == 'user' %}"
    "{{ seps[0] }}{% else %}{{ seps[1] }}{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build():
    # The checkpoint's tokenizer prepends BOS, pads with EOS and names the image token (the
    # processor reads tokenizer.image_token).
    tokenizer = build_tokenizer(
        [IMAGE], bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token="<unk>",
        extra_attributes={"image_token": IMAGE}, chat_template=CHAT_TEMPLATE, add_bos=True,
    )
    config = DeepseekVLConfig(
        vision_config=SiglipVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False,
                                         **VISION),
        text_config=LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                **TEXT),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
    )
    config.architectures = ["DeepseekVLForConditionalGeneration"]
    model = DeepseekVLForConditionalGeneration(config).eval()
    image_processor = DeepseekVLImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = DeepseekVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=CHAT_TEMPLATE, num_image_tokens=NUM_IMAGE_TOKENS)
    return model, processor
