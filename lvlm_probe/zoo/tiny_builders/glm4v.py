"""Tiny Glm4vForConditionalGeneration (GLM-4.1V): a ViT at native resolution (learned position
embeddings resampled to each image's grid, plus 2D rotary positions), a 2x2 strided-convolution
downsample and an MLP merger, a GLM-4 LM with sandwich norms and multimodal rotary positions
(M-RoPE) on half of each head, and the GLM-4.1V chat template."""
from __future__ import annotations

from transformers import (
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vImageProcessor,
    Glm4vProcessor,
    Glm4vVideoProcessor,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "glm4v"

# zai-org/GLM-4.1V-9B-Thinking's template (without the assistant's metadata branch): "[gMASK]<sop>",
# each turn as <|role|>, each image as <|begin_of_image|><|image|><|end_of_image|> in content
# order, then "<|assistant|>\n".
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for msg in messages %}"
    "{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}"
    "{%- elif msg.role == 'user' %}<|user|>{{ '\n' }}"
    "{%- if msg.content is string %}{{ msg.content }}"
    "{%- else %}{%- for item in msg.content %}"
    "{%- if item.type == 'video' or 'video' in item %}<|begin_of_video|><|video|><|end_of_video|>"
    "{%- elif item.type == 'image' or 'image' in item %}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item.type == 'text' %}{{ item.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{%- elif msg.role == 'assistant' %}<|assistant|>\n{{ msg.content }}"
    "{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|image|>",
                  "<|begin_of_video|>", "<|end_of_video|>", "<|video|>"]
MERGE_SIZE = 2
# smart_resize rounds each side to a multiple of patch * merge (16 px) and bounds
# temporal_patch_size * height * width (2 frames): images of 40-80 px give grids of 2-5 merged
# tokens a side, the same as the Qwen2-VL tiny model's.
MIN_PIXELS = 2 * 32 * 32
MAX_PIXELS = 2 * 80 * 80
# The real models rotate half of each head (partial_rotary_factor 0.5) and split those frequencies
# [8, 12, 12] among (temporal, height, width); head_dim 16 rotates 8 dims = 4 frequencies here
# (the section must sum to head_dim * partial_rotary_factor / 2).
PARTIAL_ROTARY_FACTOR = 0.5
MROPE_SECTION = [2, 1, 1]


def build_glm_tokenizer(special_tokens=SPECIAL_TOKENS):
    """GLM's special tokens, no BOS (the template writes "[gMASK]<sop>"), <|endoftext|> as EOS and
    padding; the processor finds the image and video placeholders by name."""
    named = {"image_token": "<|image|>", "video_token": "<|video|>"}
    return build_tokenizer(special_tokens, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                           extra_attributes=named)


def text_config(tokenizer) -> dict:
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    assert sum(MROPE_SECTION) == int(head_dim * PARTIAL_ROTARY_FACTOR) // 2
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": MROPE_SECTION,
            "partial_rotary_factor": PARTIAL_ROTARY_FACTOR}
    return {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "rope_parameters": rope, **TEXT}


def vision_config() -> dict:
    return {
        "depth": VISION["num_hidden_layers"], "hidden_size": VISION["hidden_size"],
        "num_heads": VISION["num_attention_heads"],
        # the merger's inner width (the tower's MLPs are out_hidden_size wide in transformers)
        "intermediate_size": VISION["intermediate_size"],
        "out_hidden_size": TEXT["hidden_size"],  # the merger's output: the LM's residual width
        # the learned position table is (IMAGE_SIZE / PATCH_SIZE)^2 = 4x4, resampled per image
        "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "temporal_patch_size": 2,
        "spatial_merge_size": MERGE_SIZE,
    }


def token_ids(tokenizer) -> dict:
    """The config's ids of the image and video placeholders and their boundary tokens."""
    ids = tokenizer.convert_tokens_to_ids
    return {"image_token_id": ids("<|image|>"), "video_token_id": ids("<|video|>"),
            "image_start_token_id": ids("<|begin_of_image|>"),
            "image_end_token_id": ids("<|end_of_image|>"),
            "video_start_token_id": ids("<|begin_of_video|>"),
            "video_end_token_id": ids("<|end_of_video|>")}


def processor_parts():
    """The real image and video processors with small resize bounds; patch and merge sizes match
    the vision tower."""
    sizes = {"patch_size": PATCH_SIZE, "temporal_patch_size": 2, "merge_size": MERGE_SIZE,
             "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}}
    return Glm4vImageProcessor(**sizes), Glm4vVideoProcessor(**sizes)


def build():
    tokenizer = build_glm_tokenizer()
    config = Glm4vConfig(text_config=text_config(tokenizer), vision_config=vision_config(),
                         **token_ids(tokenizer))
    config.architectures = ["Glm4vForConditionalGeneration"]
    model = Glm4vForConditionalGeneration(config).eval()
    image_processor, video_processor = processor_parts()
    processor = Glm4vProcessor(image_processor=image_processor, video_processor=video_processor,
                               tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return model, processor
