"""Tiny Gemma4ForConditionalGeneration: a Gemma 4 vision encoder at native aspect ratio, a
normalised linear embedder, and a Gemma 4 LM with per-layer embeddings.

The image processor resizes each image, keeping its aspect ratio, to the largest size whose sides
are multiples of ``pooling_kernel_size * patch_size`` pixels and whose patch count fits
``max_soft_tokens * pooling_kernel_size**2`` (70 soft tokens is the smallest budget the processor
accepts); the vision tower pools each ``k x k`` block of patches into one soft token. So an image
becomes ``<|image>`` + ``(h / k) x (w / k)`` soft tokens + ``<image|>``, and the grid depends on the
image's shape. Here ``k = 3`` as in the real checkpoints, with 8-pixel patches.

The LM keeps the parts that set Gemma 4 apart: sandwich norms, per-layer embeddings (a per-token
input that each layer adds after its MLP), a sliding and a full attention layer (the full one with
its proportional, partial rotary embedding), and a final logit soft cap.

The attention has the real checkpoints' shapes: full-attention heads twice as wide
(``global_head_dim``) with their own key/value head count (``num_global_key_value_heads``) and no
value projection (``attention_k_eq_v``: the keys double as values), and a third, KV-shared full
layer (``num_kv_shared_layers=1``) that has no key or value projection and attends with layer 1's
keys and values. The audio tower is left out (the config allows it). transformers initialises the vision patch embedder's position
table to ones, which gives every patch the same position embedding; the tiny model draws it.
"""
from __future__ import annotations

import torch
from transformers import (
    Gemma4AudioFeatureExtractor,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4ImageProcessor,
    Gemma4Processor,
    Gemma4TextConfig,
    Gemma4VideoProcessor,
    Gemma4VisionConfig,
)

from .sizes import PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "gemma4"
POOLING_KERNEL_SIZE = 3
MAX_SOFT_TOKENS = 70  # the smallest budget Gemma4ImageProcessor accepts
# Patch coordinates reach (MAX_SOFT_TOKENS * POOLING_KERNEL_SIZE) - 1 along a very elongated image.
POSITION_EMBEDDING_SIZE = 256

# google/gemma-4-E2B-it's template, trimmed of its tool, thinking and audio/video branches: an
# optional system turn, ``<|turn>role\n ... <turn|>\n`` per message ("assistant" shown as "model"),
# one ``<|image|>`` per image item, text items trimmed.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] in ['system', 'developer'] -%}"
    "{{ '<|turn>system\n' }}"
    "{%- if messages[0]['content'] is string -%}{{ messages[0]['content'] | trim }}"
    "{%- else -%}{{ messages[0]['content'][0]['text'] | trim }}{%- endif -%}"
    "{{ '<turn|>\n' }}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<|turn>' + role + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|image|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<turn|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\n' }}{%- endif -%}"
)


def build():
    """``(model, processor)`` with the real checkpoints' attention shapes (see the module docstring)."""
    # No BOS post-processor: the chat template writes "<bos>" into the text.
    tokenizer = build_tokenizer(
        ["<|turn>", "<turn|>", "<|image>", "<|image|>", "<image|>", "<|audio>", "<|audio|>",
         "<audio|>", "<|video|>"],
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_attributes={"boi_token": "<|image>", "image_token": "<|image|>", "eoi_token": "<image|>",
                          "boa_token": "<|audio>", "audio_token": "<|audio|>", "eoa_token": "<audio|>"},
        chat_template=CHAT_TEMPLATE,
    )
    images = dict(patch_size=PATCH_SIZE, max_soft_tokens=MAX_SOFT_TOKENS,
                  pooling_kernel_size=POOLING_KERNEL_SIZE)
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(**images),
        tokenizer=tokenizer,
        video_processor=Gemma4VideoProcessor(**images),
        chat_template=CHAT_TEMPLATE,
        image_seq_length=MAX_SOFT_TOKENS,
    )
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    # As in the real checkpoints: full-attention heads twice as wide as sliding ones (512 vs 256
    # there) with their own key/value head count, keys doubling as values; the last layer reuses
    # layer 1's keys and values (the last layer must be a full one).
    attention = dict(global_head_dim=2 * head_dim, num_global_key_value_heads=1, attention_k_eq_v=True,
                     num_kv_shared_layers=1, num_hidden_layers=3,
                     layer_types=["sliding_attention", "full_attention", "full_attention"])
    text = Gemma4TextConfig(
        vocab_size=len(tokenizer), vocab_size_per_layer_input=len(tokenizer),
        hidden_size_per_layer_input=16, head_dim=head_dim,
        # the window is shorter than a two-image prompt so the sliding mask actually cuts
        sliding_window=32, final_logit_softcapping=30.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **{**TEXT, **attention},
    )
    vision = Gemma4VisionConfig(
        patch_size=PATCH_SIZE, pooling_kernel_size=POOLING_KERNEL_SIZE,
        position_embedding_size=POSITION_EMBEDDING_SIZE,
        num_key_value_heads=VISION["num_attention_heads"],
        head_dim=VISION["hidden_size"] // VISION["num_attention_heads"], **VISION,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None,
        boi_token_id=ids("<|image>"), eoi_token_id=ids("<image|>"), image_token_id=ids("<|image|>"),
        video_token_id=ids("<|video|>"), boa_token_id=ids("<|audio>"), eoa_token_index=ids("<audio|>"),
        audio_token_id=ids("<|audio|>"),
    )
    config.architectures = ["Gemma4ForConditionalGeneration"]
    model = Gemma4ForConditionalGeneration(config).eval()
    with torch.no_grad():  # initialised to ones: every patch would get the same position embedding
        model.model.vision_tower.patch_embedder.position_embedding_table.normal_(std=0.02)
        for layer in model.model.language_model.layers:  # ones: each layer's output rescale
            layer.layer_scalar.uniform_(0.5, 1.5)
    return model, processor
