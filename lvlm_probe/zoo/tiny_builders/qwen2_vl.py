"""Tiny Qwen2VLForConditionalGeneration: ViT with 2D rotary positions, 2x2 patch merger, Qwen2 LM
with multimodal rotary positions (M-RoPE), and the Qwen2-VL chat template."""
from __future__ import annotations

from transformers import (
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from .sizes import PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "qwen2_vl"

# Qwen/Qwen2-VL-*-Instruct's template: a default system turn, each image as
# <|vision_start|><|image_pad|><|vision_end|> in content order, the text, then the assistant's turn.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
MERGE_SIZE = 2
# smart_resize rounds each side to a multiple of patch * merge (16 px) and keeps the area between
# these bounds: images of 40-80 px give grids of 2-5 merged tokens a side.
MIN_PIXELS = 32 * 32
MAX_PIXELS = 80 * 80
# M-RoPE splits each head's rotary frequencies among (temporal, height, width); the real models use
# [16, 24, 24] for head_dim 128, this is the same proportion for head_dim 16 (sum = head_dim / 2).
MROPE_SECTION = [2, 3, 3]


def build_qwen_tokenizer():
    """The tokenizer shared by the Qwen2-VL and Qwen2.5-VL tiny models (no BOS, like Qwen2's)."""
    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
             "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}
    return build_tokenizer(SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           extra_attributes=named)


def text_config(tokenizer) -> dict:
    """Text-model settings shared by both Qwen VL tiny models."""
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    assert sum(MROPE_SECTION) == head_dim // 2, "mrope_section must sum to head_dim / 2"
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": MROPE_SECTION}
    return {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
            "rope_parameters": rope, **TEXT}


def token_ids(tokenizer) -> dict:
    """The config's ids of the image, video and vision-boundary tokens."""
    ids = tokenizer.convert_tokens_to_ids
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"),
            "vision_end_token_id": ids("<|vision_end|>")}


def build_processor(processor_cls, tokenizer):
    """The real processor with small resize bounds; patch and merge sizes match the vision tower."""
    sizes = {"patch_size": PATCH_SIZE, "temporal_patch_size": 2, "merge_size": MERGE_SIZE,
             "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    return processor_cls(image_processor=Qwen2VLImageProcessor(**sizes),
                         video_processor=Qwen2VLVideoProcessor(**sizes),
                         tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build():
    tokenizer = build_qwen_tokenizer()
    vision = {
        "depth": VISION["num_hidden_layers"], "embed_dim": VISION["hidden_size"],
        "num_heads": VISION["num_attention_heads"],
        "mlp_ratio": VISION["intermediate_size"] // VISION["hidden_size"],
        "hidden_size": TEXT["hidden_size"],  # the merger's output width: the LM's residual width
        "patch_size": PATCH_SIZE, "temporal_patch_size": 2, "spatial_merge_size": MERGE_SIZE,
    }
    config = Qwen2VLConfig(text_config=text_config(tokenizer), vision_config=vision,
                           **token_ids(tokenizer))
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    model = Qwen2VLForConditionalGeneration(config).eval()
    return model, build_processor(Qwen2VLProcessor, tokenizer)
