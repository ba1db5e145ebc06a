"""Tiny MiniCPMV4_6ForConditionalGeneration: a SigLIP-style NaViT vision tower (variable-size patch
grids, position embeddings looked up by nearest position), a window-attention merger after layer
``insert_layer_id`` that fuses each 2x2 block of patches, a 2x2 MLP merger into the LM's width, and
Qwen3.5's hybrid LM (Gated DeltaNet and gated full attention layers); the real processor with its
slicing image processor.

The image processor resizes each image to a source view of about ``SCALE_RESOLUTION`` pixels
squared and, when the image is larger than that, cuts a ``rows x cols`` grid of slices (at most
``MAX_SLICE_NUMS``) from a second resize. Every view becomes ``(h / 4) x (w / 4)`` tokens, its
``(h, w)`` in patches (``target_sizes``): sides are multiples of ``4 * PATCH_SIZE`` pixels.
"""
from __future__ import annotations

from transformers import (
    MiniCPMV4_6Config,
    MiniCPMV4_6ForConditionalGeneration,
    MiniCPMV4_6ImageProcessor,
    MiniCPMV4_6Processor,
    MiniCPMV4_6VideoProcessor,
)

from .qwen3_5 import text_config
from .sizes import PATCH_SIZE, VISION
from .tokenizer import build_tokenizer

FAMILY = "minicpmv4_6"

# Views of about 56x56 pixels (sides rounded to 32 or 64: 1 or 2 tokens): a 40x56 image keeps its
# source view alone, a 72x48 one is cut into 2x1 slices. The real checkpoints use 448 with patch 14
# (32x32 patches, 8x8 tokens) and up to 9 slices; four keep the tiny sequences short.
SCALE_RESOLUTION = 56
MAX_SLICE_NUMS = 4
VISION_IMAGE_SIZE = 64  # position-embedding table of 8x8 patches, looked up by nearest position
INSERT_LAYER_ID = 0  # the window merger after the first of the two vision layers (6 of 27 in the real one)

# The chat template of Qwen3.5, the language model, without its tools, video, reasoning-history and
# enable_thinking branches: each image as one <|image_pad|> in content order (the processor expands
# it into <image_id>k</image_id><image>...</image> and the slices), then the assistant's turn opened
# in thinking mode.
CHAT_TEMPLATE = (
    "{%- macro render_content(content) %}"
    "{%- if content is string %}{{- content }}"
    "{%- else %}{%- for item in content %}"
    "{%- if 'image' in item or 'image_url' in item or item.type == 'image' %}"
    "{{- '<|image_pad|>' }}"
    "{%- elif 'text' in item %}{{- item.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- endmacro %}"
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + render_content(messages[0].content)|trim + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- set content = render_content(message.content)|trim %}"
    "{%- if message.role == 'user' or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
         "image_start_token": "<image>", "image_end_token": "</image>",
         "slice_start_token": "<slice>", "slice_end_token": "</slice>",
         "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>"}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *NAMED.values(), "<think>", "</think>"]


def build_processor(tokenizer):
    """The real processor: slices and source view sized as the vision tower needs (16x mode)."""
    sizes = {"scale_resolution": SCALE_RESOLUTION, "max_slice_nums": MAX_SLICE_NUMS,
             "patch_size": PATCH_SIZE}
    return MiniCPMV4_6Processor(image_processor=MiniCPMV4_6ImageProcessor(**sizes),
                                video_processor=MiniCPMV4_6VideoProcessor(**sizes),
                                tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build():
    """The tiny model and processor: LM layer 0 is Gated DeltaNet, layer 1 full attention."""
    tokenizer = build_tokenizer(SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                extra_attributes=NAMED)
    ids = tokenizer.convert_tokens_to_ids
    vision = {**VISION, "image_size": VISION_IMAGE_SIZE, "patch_size": PATCH_SIZE}
    config = MiniCPMV4_6Config(text_config=text_config(tokenizer), vision_config=vision,
                               insert_layer_id=INSERT_LAYER_ID, image_size=SCALE_RESOLUTION,
                               image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"))
    config.architectures = ["MiniCPMV4_6ForConditionalGeneration"]
    # Nothing gates the image: the mergers' weights are drawn (only biases and norm shifts start at 0).
    model = MiniCPMV4_6ForConditionalGeneration(config).eval()
    return model, build_processor(tokenizer)
