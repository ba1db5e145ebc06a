"""Tiny Qwen3_5ForConditionalGeneration: Qwen3-VL's vision side without DeepStack (ViT with learned,
resampled and 2D rotary positions, one 2x2 patch merger) and a hybrid LM: Gated DeltaNet layers
(linear attention behind a causal short convolution, ``linear_attn``) interleaved with gated full
attention layers (``self_attn``, q/k norms, partial interleaved M-RoPE), zero-centred RMSNorms; the
Qwen3-VL processor and the Qwen3.5 chat template.

The real checkpoints put one full-attention layer after every three linear ones
(``full_attention_interval`` 4); with two layers the tiny model has one of each, linear first."""
from __future__ import annotations

from transformers import (
    Qwen2VLImageProcessor,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from .qwen2_vl import MAX_PIXELS, MERGE_SIZE, MIN_PIXELS, token_ids
from .qwen3_vl import NUM_POSITION_EMBEDDINGS
from .sizes import PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "qwen3_5"

# Qwen/Qwen3.5-*'s template without its tools, video, reasoning-history and enable_thinking branches:
# no default system turn, each image as <|vision_start|><|image_pad|><|vision_end|> in content order,
# the user's content trimmed, then the assistant's turn opened in thinking mode (the default).
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}"
    "{%- macro render_content(content) %}"
    "{%- if content is string %}{{- content }}"
    "{%- else %}{%- for item in content %}"
    "{%- if 'image' in item or 'image_url' in item or item.type == 'image' %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Picture ' ~ image_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
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
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<think>", "</think>"]
# Full attention: 4 heads of 32 (the real models' heads are wider than d_model / heads too), a
# quarter of each head rotated (partial_rotary_factor 0.25: 4 frequencies), interleaved M-RoPE
# with temporal frequencies 0 and 3, height 1, width 2 (the real [11, 11, 10] of 32).
HEAD_DIM = 32
MROPE_SECTION = [2, 1, 1]
# Gated DeltaNet: 2 key heads and 4 value heads of 16, kernel-4 causal convolution (the real
# checkpoints: 16 key heads, 32-64 value heads of 128, kernel 4).
LINEAR = {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
          "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4}
LAYER_TYPES = ["linear_attention", "full_attention"]


def build_qwen3_5_tokenizer():
    """Qwen3.5's special tokens (no BOS; <|im_end|> ends a turn); <think> and </think> stay whole."""
    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
             "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}
    return build_tokenizer(SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           extra_attributes=named)


def text_config(tokenizer) -> dict:
    """The hybrid LM's settings, shared with the MoE variant."""
    assert sum(MROPE_SECTION) == HEAD_DIM // 4 // 2, "mrope_section must sum to rotary dim / 2"
    rope = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
            "mrope_section": MROPE_SECTION, "mrope_interleaved": True}
    return {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None, "head_dim": HEAD_DIM,
            "rope_parameters": rope, "layer_types": LAYER_TYPES, **LINEAR, **TEXT}


def vision_config() -> dict:
    return {
        "depth": VISION["num_hidden_layers"], "hidden_size": VISION["hidden_size"],
        "intermediate_size": VISION["intermediate_size"],
        "num_heads": VISION["num_attention_heads"],
        "out_hidden_size": TEXT["hidden_size"],  # the merger's output: the LM's residual width
        "patch_size": PATCH_SIZE, "temporal_patch_size": 2, "spatial_merge_size": MERGE_SIZE,
        "num_position_embeddings": NUM_POSITION_EMBEDDINGS,
    }


def build_processor(tokenizer):
    """The real (Qwen3-VL) processor with small resize bounds and the Qwen3.5 chat template; patch
    and merge sizes match the vision tower."""
    sizes = {"patch_size": PATCH_SIZE, "temporal_patch_size": 2, "merge_size": MERGE_SIZE}
    pixels = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    video = Qwen3VLVideoProcessor(size={"shortest_edge": MIN_PIXELS, "longest_edge": 4 * MAX_PIXELS},
                                  **sizes)
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes, **pixels),
                            video_processor=video, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build():
    """The tiny model and processor: LM layer 0 is Gated DeltaNet, layer 1 full attention."""
    tokenizer = build_qwen3_5_tokenizer()
    config = Qwen3_5Config(text_config=text_config(tokenizer), vision_config=vision_config(),
                           **token_ids(tokenizer))
    config.architectures = ["Qwen3_5ForConditionalGeneration"]
    model = Qwen3_5ForConditionalGeneration(config).eval()
    return model, build_processor(tokenizer)
