"""Tiny Qwen3VLForConditionalGeneration: ViT with learned (resampled) and 2D rotary positions, 2x2
patch merger, a Qwen3 LM (q/k norms) with interleaved multimodal rotary positions (M-RoPE), and the
Qwen3-VL chat template.

DeepStack: vision layer 0's features, through their own merger, are added to the image positions
after LM layer 0 (the adapter's ``image_injection_layers``)."""
from __future__ import annotations

from transformers import (
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from .qwen2_vl import MAX_PIXELS, MERGE_SIZE, MIN_PIXELS, build_qwen_tokenizer, token_ids
from .sizes import PATCH_SIZE, TEXT, VISION

FAMILY = "qwen3_vl"

# Qwen/Qwen3-VL-*-Instruct's template (without tools and thinking): no default system turn, each
# image as <|vision_start|><|image_pad|><|vision_end|> in content order, then the assistant's turn.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The learned vision position table is a square grid (8 x 8) bilinearly resampled to each image.
NUM_POSITION_EMBEDDINGS = 64
# Interleaved M-RoPE: of each head's head_dim / 2 rotary frequencies, every third from index 1 (up to
# 3 * section[1]) rotates with the height position, every third from index 2 (up to 3 * section[2])
# with the width, the rest with the temporal one. The real models use [24, 20, 20] for 64
# frequencies; for head_dim 16 (8 frequencies) [3, 3, 2] gives time 0, 3, 6, height 1, 4, 7 and
# width 2, 5.
MROPE_SECTION = [3, 3, 2]


def build_processor(tokenizer):
    """The real processor with small resize bounds; patch and merge sizes match the vision tower."""
    sizes = {"patch_size": PATCH_SIZE, "temporal_patch_size": 2, "merge_size": MERGE_SIZE}
    pixels = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    video = Qwen3VLVideoProcessor(size={"shortest_edge": MIN_PIXELS, "longest_edge": 4 * MAX_PIXELS},
                                  **sizes)
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes, **pixels),
                            video_processor=video, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build():
    """The tiny model and processor, with one DeepStack merger (vision layer 0's output, added at
    the image positions after LM layer 0)."""
    tokenizer = build_qwen_tokenizer()
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    assert sum(MROPE_SECTION) == head_dim // 2, "mrope_section must sum to head_dim / 2"
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": MROPE_SECTION,
            "mrope_interleaved": True}
    text = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None, "head_dim": head_dim,
            "rope_parameters": rope, **TEXT}
    vision = {
        "depth": VISION["num_hidden_layers"], "hidden_size": VISION["hidden_size"],
        "intermediate_size": VISION["intermediate_size"],
        "num_heads": VISION["num_attention_heads"],
        "out_hidden_size": TEXT["hidden_size"],  # the mergers' output: the LM's residual width
        "patch_size": PATCH_SIZE, "temporal_patch_size": 2, "spatial_merge_size": MERGE_SIZE,
        "num_position_embeddings": NUM_POSITION_EMBEDDINGS,
        # DeepStack from the first vision layer: its merger's output is added after LM layer 0
        "deepstack_visual_indexes": [0],
    }
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **token_ids(tokenizer))
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    model = Qwen3VLForConditionalGeneration(config).eval()
    return model, build_processor(tokenizer)
