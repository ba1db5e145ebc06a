"""Tiny LlavaOnevision15ForConditionalGeneration: a RICE ViT (CLS token, 2D rotary positions) at
native resolution, a 2x2 patch merger (LayerNorm then MLP), a Qwen3 LM with plain 1D rotary
positions, and the Qwen2-VL-style chat template of the LLaVA-OneVision-1.5 Instruct checkpoints.

The checkpoints' processor is transformers' shared ``Exaone4_5_Processor`` around the Qwen2-VL image
processor: each image becomes ``prod(image_grid_thw) / merge**2`` ``<|image_pad|>`` tokens."""
from __future__ import annotations

from transformers import (
    Exaone4_5_Processor,
    LlavaOnevision15Config,
    LlavaOnevision15ForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from .qwen2_vl import MAX_PIXELS, MERGE_SIZE, MIN_PIXELS, build_qwen_tokenizer, token_ids
from .sizes import PATCH_SIZE, TEXT, VISION

FAMILY = "llava_onevision1_5"

# lmms-lab/LLaVA-OneVision-1.5-*-Instruct's template (Qwen2-VL's): a default system turn, each
# image as <|vision_start|><|image_pad|><|vision_end|> in content order, the text, then the
# assistant's turn.
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


def build():
    tokenizer = build_qwen_tokenizer()
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    text = {"model_type": "qwen3", "vocab_size": len(tokenizer), "head_dim": head_dim,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
            **TEXT}
    vision = {
        "depth": VISION["num_hidden_layers"], "hidden_size": VISION["hidden_size"],
        "intermediate_size": VISION["intermediate_size"],
        "num_heads": VISION["num_attention_heads"],
        "out_hidden_size": TEXT["hidden_size"],  # the merger's output: the LM's residual width
        "patch_size": PATCH_SIZE, "spatial_merge_size": MERGE_SIZE,
    }
    config = LlavaOnevision15Config(text_config=text, vision_config=vision, **token_ids(tokenizer))
    config.architectures = ["LlavaOnevision15ForConditionalGeneration"]
    model = LlavaOnevision15ForConditionalGeneration(config).eval()
    # The vision tower has no temporal patches; the Qwen2-VL processors still stack 2 frames per
    # patch, so the tower's Conv2d over 3 * patch**2 inputs needs temporal_patch_size 1.
    sizes = {"patch_size": PATCH_SIZE, "temporal_patch_size": 1, "merge_size": MERGE_SIZE}
    processor = Exaone4_5_Processor(
        image_processor=Qwen2VLImageProcessor(**sizes, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        video_processor=Qwen2VLVideoProcessor(**sizes, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
    )
    return model, processor
