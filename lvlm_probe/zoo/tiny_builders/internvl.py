"""Tiny InternVLForConditionalGeneration: InternViT-style vision tower, pixel-shuffle projector,
Qwen2 LM, the InternVL3-hf chat template, and dynamic tiles plus a thumbnail.

The image processor cuts an image into 1 to ``MAX_PATCHES`` tiles of the vision tower's input size
(the arrangement whose aspect ratio is closest to the image's) and adds a thumbnail when there is
more than one tile. With ``MAX_PATCHES = 4`` a landscape 40x56 image becomes 2x2 tiles, a portrait
72x48 image 2 rows x 1 column and a 20x100 strip 1 row x 4 columns; each tile is
``IMAGE_SEQ_LEN`` = 2x2 tokens after the pixel shuffle.
"""
from __future__ import annotations

import torch
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    Qwen2Config,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "internvl"

DOWNSAMPLE_RATIO = 0.5
# Tokens per tile: (IMAGE_SIZE / PATCH_SIZE)^2 patches, merged 1 / DOWNSAMPLE_RATIO^2 at a time.
IMAGE_SEQ_LEN = int((IMAGE_SIZE // PATCH_SIZE) ** 2 * DOWNSAMPLE_RATIO**2)
MIN_PATCHES = 1
MAX_PATCHES = 4  # the real checkpoints allow 12; few tiles keep the tiny model fast

# OpenGVLab/InternVL3-1B-hf's template (without its default system turn): each image as
# "<IMG_CONTEXT>\n" before the text, then the assistant's turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                  "<video>"]


def build():
    """The tiny model and its processor (CLS dropped by the "default" strategy, as in the real one)."""
    named = {"start_image_token": "<img>", "end_image_token": "</img>",
             "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    tokenizer = build_tokenizer(SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                extra_attributes=named)
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION),
        text_config=Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, **TEXT),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=IMAGE_SEQ_LEN,
        downsample_ratio=DOWNSAMPLE_RATIO,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        # zero-initialised by transformers: without them every tile's patches start identical up to
        # their pixels, and the CLS token (which the patches attend to) carries nothing
        embeddings = model.model.vision_tower.embeddings
        embeddings.cls_token.normal_(std=0.02)
        embeddings.position_embeddings.normal_(std=0.02)
    image_processor = GotOcr2ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=True,
        min_patches=MIN_PATCHES, max_patches=MAX_PATCHES,
    )
    processor = InternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        image_seq_length=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor
