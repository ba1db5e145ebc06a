"""Tiny Molmo2ForConditionalGeneration: a ViT over overlapping square crops, an attention-pooling
adapter that merges each 2x2 window of patches into one token, a Qwen3-style LM, and the
allenai/Molmo2 chat template (images first, then the user's turn).

Crops are ``CROP`` = 5 x 5 patches of ``PATCH_SIZE`` pixels (odd, as the real 27 x 27, so the
pooling pads the patch grid); neighbouring crops overlap by ``MARGINS`` patches, so each crop
contributes a 3 x 3 patch window to the stitched high-resolution grid. ``MAX_CROPS`` = 4 keeps the
sequences short: a 40x56 image is tiled 1 x 2 crops (5 x 8 patches, 3 x 4 tokens), a 72x48 image
2 x 2 crops (8 x 8 patches, 4 x 4 tokens); the low-resolution view of every image is 3 x 3 tokens.
"""
from __future__ import annotations

import torch
from transformers import (
    Molmo2AdapterConfig,
    Molmo2Config,
    Molmo2ForConditionalGeneration,
    Molmo2ImageProcessor,
    Molmo2Processor,
    Molmo2TextConfig,
    Molmo2VideoProcessor,
    Molmo2VisionConfig,
)

from .sizes import PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "molmo2"

CROP = 5 * PATCH_SIZE  # crop side in pixels: 5 x 5 patches
MARGINS = [1, 1]  # overlap of neighbouring crops, in patches (left/top, right/bottom)
POOLING = [2, 2]  # patches merged into one token (rows, cols)
MAX_CROPS = 4  # the real checkpoints allow 8

# allenai/Molmo2-8B's template without its video, subtitle and demo-style branches: all images
# before the first turn ("<|image|>", or "Image i<|image|>" for each of several), then ChatML turns.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}{% if message['content'] is not string %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{% set image_count.value = image_count.value + 1 %}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if image_count.value == 1 %}{{ '<|image|>' }}"
    "{% elif image_count.value > 1 %}{% for i in range(image_count.value) %}"
    "{{ 'Image ' ~ (i + 1) ~ '<|image|>' }}{% endfor %}{% endif %}"
    "{% for message in messages %}{% set role = message['role'].lower() %}"
    "{% if message['content'] is string %}{% set text_content = message['content'] %}{% else %}"
    "{% set m = namespace(text='') %}{% for content in message['content'] %}"
    "{% if content['type'] == 'text' %}{% set m.text = m.text ~ ('' if not m.text else ' ') ~ content['text'] %}"
    "{% endif %}{% endfor %}{% set text_content = m.text %}{% endif %}"
    "{% if role == 'user' %}{% if not loop.first %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>user\\n' }}{{ text_content }}{{ '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>assistant\\n' }}{{ text_content }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

IMAGE_TOKENS = ["<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>",
                "<im_end>", "<frame_end>", "<im_low>"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image|>", "<|video|>", *IMAGE_TOKENS]


def build():
    """The tiny model and its processor (the checkpoint's processor settings: column tokens after
    each high-resolution row, none in the low-resolution view)."""
    tokenizer = build_tokenizer(
        SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>",
        extra_attributes={"image_token": "<|image|>", "video_token": "<|video|>"},
    )
    ids = dict(zip(IMAGE_TOKENS, tokenizer.convert_tokens_to_ids(IMAGE_TOKENS)))
    vision = {**VISION, "head_dim": VISION["hidden_size"] // VISION["num_attention_heads"]}
    text = {**TEXT, "head_dim": TEXT["hidden_size"] // TEXT["num_attention_heads"]}
    config = Molmo2Config(
        vision_config=Molmo2VisionConfig(image_size=[CROP, CROP], patch_size=PATCH_SIZE,
                                         num_key_value_heads=VISION["num_attention_heads"], **vision),
        # the last and the first ViT layer, as the checkpoint reads two layers (24 and 18 of 25)
        adapter_config=Molmo2AdapterConfig(
            vision_feature_layer=[-1, -2], hidden_size=VISION["hidden_size"],
            num_attention_heads=VISION["num_attention_heads"],
            num_key_value_heads=VISION["num_attention_heads"], head_dim=vision["head_dim"],
            intermediate_size=TEXT["intermediate_size"], text_hidden_size=TEXT["hidden_size"],
        ),
        text_config=Molmo2TextConfig(vocab_size=len(tokenizer), additional_vocab_size=0, **text),
        image_start_token_id=ids["<im_start>"],
        low_res_image_start_token_id=ids["<low_res_im_start>"],
        image_end_token_id=ids["<im_end>"],
        image_patch_id=ids["<im_patch>"],
        frame_start_token_id=ids["<frame_start>"],
        frame_end_token_id=ids["<frame_end>"],
    )
    config.architectures = ["Molmo2ForConditionalGeneration"]
    model = Molmo2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # At transformers' std of 0.02, the pooling attention's value/output projections and the
        # gated MLP after it shrink the image features to ~1e-8 of a token embedding, and the image
        # would not reach the answer: draw the adapter at unit gain (std 1 / sqrt(fan_in)).
        for linear in model.model.multi_modal_projector.modules():
            if isinstance(linear, torch.nn.Linear):
                linear.weight.normal_(std=linear.in_features**-0.5)
    image_processor = Molmo2ImageProcessor(
        size={"height": CROP, "width": CROP}, patch_size=PATCH_SIZE, max_crops=MAX_CROPS,
        overlap_margins=MARGINS, pooling_size=POOLING,
    )
    video_processor = Molmo2VideoProcessor(size={"height": CROP, "width": CROP}, patch_size=PATCH_SIZE,
                                           pooling_size=POOLING)
    processor = Molmo2Processor(
        image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE, image_use_col_tokens=True, use_single_crop_col_tokens=False,
        use_single_crop_start_token=True,
    )
    return model, processor
