"""Tiny Gemma3ForConditionalGeneration: SigLIP vision tower, pooled projector, Gemma 3 LM.

Each image becomes ``<start_of_image>`` + ``mm_tokens_per_image`` soft tokens + ``<end_of_image>``.
The projector average-pools the (IMAGE_SIZE / PATCH_SIZE)^2 = 4x4 patch grid with a 2x2 kernel
into a 2x2 grid, as the real checkpoints pool 64x64 patches into 16x16 tokens. transformers
initialises the projector's input projection to zeros, which would make every image embed to zero
(the image could not change any output); the tiny model draws it at random instead.
"""
from __future__ import annotations

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "gemma3"
MM_TOKENS_PER_IMAGE = 4

# google/gemma-3-*-it's template (system prompt folded into the first user turn, "assistant" shown
# as "model", one <start_of_image> per image item, text items trimmed).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def build():
    # No BOS post-processor: the chat template writes "<bos>" into the text.
    tokenizer = build_tokenizer(
        ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_attributes={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                          "image_token": "<image_soft_token>"},
        chat_template=CHAT_TEMPLATE,
    )
    image_processor = Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=CHAT_TEMPLATE, image_seq_length=MM_TOKENS_PER_IMAGE)
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer), head_dim=head_dim, query_pre_attn_scalar=head_dim,
        # One sliding and one global layer, as in the real 5:1 pattern; the window is shorter than
        # a two-image prompt so the sliding mask actually cuts.
        layer_types=["sliding_attention", "full_attention"], sliding_window=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT,
    )
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION),
        text_config=text,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    )
    config.architectures = ["Gemma3ForConditionalGeneration"]
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # zero-initialised by transformers: the image would not reach the LM
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=VISION["hidden_size"] ** -0.5)
    return model, processor
