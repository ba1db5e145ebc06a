"""Tiny AyaVisionForConditionalGeneration: SigLIP vision tower, a pixel-shuffle (2x2) SwiGLU
projector, a Cohere2 LM (parallel attention and MLP, sliding-window layers, a final logit scale),
dynamic crop tiles plus a thumbnail, and the Aya Vision chat template.

The image processor cuts an image into 1 to ``MAX_PATCHES`` tiles of the vision tower's input size
(the ``cols x rows`` arrangement whose aspect ratio is closest to the image's) and adds a thumbnail
when there is more than one tile; each tile is ``(TILE_SIZE / PATCH_SIZE / DOWNSAMPLE)**2`` = 3x3
tokens after the pixel shuffle."""
from __future__ import annotations

import torch
from transformers import (
    AyaVisionConfig,
    AyaVisionForConditionalGeneration,
    AyaVisionProcessor,
    Cohere2Config,
    GotOcr2ImageProcessor,
    SiglipVisionConfig,
)

from .sizes import PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "aya_vision"

TILE_SIZE = 48  # 6x6 patches per tile, 3x3 tokens after the 2x2 pixel shuffle
DOWNSAMPLE = 2
MIN_PATCHES = 1
MAX_PATCHES = 4  # the real checkpoints allow 12; few tiles keep the tiny model fast

# CohereLabs/aya-vision-*'s template (without its tool and document branches): BOS, each turn as
# <|START_OF_TURN_TOKEN|><|USER_TOKEN|> ... <|END_OF_TURN_TOKEN|> with each image as "<image>" in
# content order (the processor expands it), then the chatbot's turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' }}"
    "{% elif message['role'] == 'system' %}{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' }}"
    "{% else %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|END_OF_TURN_TOKEN|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>",
                  "<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>",
                  "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL"]


def build():
    tokenizer = build_tokenizer(SPECIAL_TOKENS, bos_token="<BOS_TOKEN>", eos_token="<|END_OF_TURN_TOKEN|>",
                                pad_token="<PAD>", add_bos=True)
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    text = Cohere2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         head_dim=head_dim, **TEXT)
    vision = SiglipVisionConfig(image_size=TILE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False,
                                **VISION)
    config = AyaVisionConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"),
        downsample_factor=DOWNSAMPLE, vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
    config.architectures = ["AyaVisionForConditionalGeneration"]
    model = AyaVisionForConditionalGeneration(config).eval()
    with torch.no_grad():  # ones and zeros from transformers: draw the projector's input scale
        norm = model.model.multi_modal_projector.layernorm
        norm.weight.normal_(mean=1.0, std=0.5)
        norm.bias.normal_(std=0.5)
    image_processor = GotOcr2ImageProcessor(
        size={"height": TILE_SIZE, "width": TILE_SIZE}, crop_to_patches=True,
        min_patches=MIN_PATCHES, max_patches=MAX_PATCHES,
    )
    processor = AyaVisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        img_size=TILE_SIZE, downsample_factor=DOWNSAMPLE, chat_template=CHAT_TEMPLATE,
    )
    return model, processor
