"""Tiny Lfm2VlForConditionalGeneration: a SigLIP2 NaFlex vision tower (native aspect ratio, learned
positions resampled to each view's patch grid, padded patches masked), a pixel-unshuffle projector
(2x2 patches per token, LayerNorm, 2-layer MLP) and the LFM2 hybrid LM: gated short-convolution
layers (``conv``) and grouped-query attention layers (``self_attn``, q/k norms); the LFM2-VL chat
template and the real processor, tiles plus a thumbnail.

Image sizes are scaled down with the patch: 8 px patches, 32 px tiles (2x2 tokens each), at most
``MAX_IMAGE_TOKENS`` tokens for an image that is not tiled (or for a thumbnail). An image whose size
rounded to 16 px exceeds ``MAX_IMAGE_TOKENS * 16**2 * MAX_PIXELS_TOLERANCE`` pixels is tiled into
``MIN_TILES..MAX_TILES`` tiles: a 40x56 image is one 2x4 token grid, a 72x48 image two tiles (2
rows, 1 column) plus a 3x2 thumbnail.

The real checkpoints start with conv layers and put attention at a few indices
(``full_attn_idxs``); with two layers the tiny model has one of each, conv first.
"""
from __future__ import annotations

import torch
from transformers import (
    Lfm2Config,
    Lfm2VlConfig,
    Lfm2VlForConditionalGeneration,
    Lfm2VlImageProcessor,
    Lfm2VlProcessor,
    Siglip2VisionConfig,
)

from .sizes import PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "lfm2_vl"

DOWNSAMPLE = 2  # the projector's pixel unshuffle: 2x2 patches per token
TILE_SIZE = 32  # pixels per tile side: (32 / 8)^2 patches, 2x2 tokens
MIN_TILES, MAX_TILES = 2, 4  # the real processor allows 2..10
MIN_IMAGE_TOKENS, MAX_IMAGE_TOKENS = 2, 9  # the real ones: 64..256
MAX_PIXELS_TOLERANCE = 1.0  # the real one is 2.0; 1.0 tiles the suite's 72x48 image
POSITION_GRID = 16  # SigLIP2's learned position embeddings: a 4x4 grid, resampled per view
LAYER_TYPES = ["conv", "full_attention"]
CONV_KERNEL = 3  # conv_L_cache of the real checkpoints

# LiquidAI/LFM2-VL-1.6B's template without its tools branch: BOS, an optional system turn, each
# image as <image> in content order, then the assistant's turn.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system_prompt='', content='') -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set ns.system_prompt = messages[0]['content'] -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- if ns.system_prompt -%}"
    "{{- '<|im_start|>system\\n' + ns.system_prompt + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- set content = message['content'] -%}"
    "{%- if content is not string -%}"
    "{%- set ns.content = '' -%}"
    "{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.content = ns.content + '<image>' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.content = ns.content + item['text'] -%}"
    "{%- else -%}{%- set ns.content = ns.content + item | tojson -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = ns.content -%}"
    "{%- endif -%}"
    "{{- content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# The tile markers <|img_row_R_col_C|> (1-based) of every arrangement of up to MAX_TILES tiles.
TILE_MARKERS = [f"<|img_row_{r}_col_{c}|>" for r in range(1, MAX_TILES + 1)
                for c in range(1, MAX_TILES + 1)]
SPECIAL_TOKENS = ["<|pad|>", "<|startoftext|>", "<|im_start|>", "<|im_end|>", "<image>",
                  "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>", *TILE_MARKERS]


def build():
    """The tiny model and processor: LM layer 0 is a short convolution, layer 1 attention."""
    named = {"image_token": "<image>", "image_start_token": "<|image_start|>",
             "image_end_token": "<|image_end|>", "image_thumbnail_token": "<|img_thumbnail|>"}
    tokenizer = build_tokenizer(SPECIAL_TOKENS, bos_token="<|startoftext|>", eos_token="<|im_end|>",
                                pad_token="<|pad|>", extra_attributes=named)
    text = Lfm2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      layer_types=LAYER_TYPES, conv_L_cache=CONV_KERNEL, conv_bias=False,
                      block_auto_adjust_ff_dim=False, tie_word_embeddings=True, **TEXT)
    vision = Siglip2VisionConfig(patch_size=PATCH_SIZE, num_patches=POSITION_GRID,
                                 vision_use_head=False, **VISION)
    config = Lfm2VlConfig(vision_config=vision, text_config=text,
                          image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                          downsample_factor=DOWNSAMPLE, projector_hidden_size=TEXT["hidden_size"],
                          tie_word_embeddings=True)
    config.architectures = ["Lfm2VlForConditionalGeneration"]
    model = Lfm2VlForConditionalGeneration(config).eval()
    with torch.no_grad():
        # the projector's LayerNorm starts as the identity (weight 1, bias 0): draw it, so its
        # scale and shift are real parameters, as in a trained checkpoint
        norm = model.model.multi_modal_projector.layer_norm
        norm.weight.normal_(1.0, 0.1)
        norm.bias.normal_(std=0.1)
    image_processor = Lfm2VlImageProcessor(
        downsample_factor=DOWNSAMPLE, encoder_patch_size=PATCH_SIZE, tile_size=TILE_SIZE,
        size={"height": TILE_SIZE, "width": TILE_SIZE}, min_tiles=MIN_TILES, max_tiles=MAX_TILES,
        min_image_tokens=MIN_IMAGE_TOKENS, max_image_tokens=MAX_IMAGE_TOKENS,
        max_pixels_tolerance=MAX_PIXELS_TOLERANCE, do_image_splitting=True, use_thumbnail=True,
    )
    processor = Lfm2VlProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=CHAT_TEMPLATE)
    return model, processor
