"""Tiny MllamaForConditionalGeneration: tiled vision tower with a global encoder, Llama LM whose
layer 1 is a gated cross-attention layer, Llama-3.2-Vision-style chat template.

transformers initialises the cross-attention layer's two tanh gates to zero, which makes the layer
the identity (the image could not change any output); the tiny model opens them at random instead,
as trained checkpoints have them.
"""
from __future__ import annotations

import torch
from transformers import (
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessor,
    MllamaProcessor,
    MllamaTextConfig,
    MllamaVisionConfig,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "mllama"

# Llama-3.2-Vision-Instruct's template without the system/date preamble and tool handling: BOS, one
# header per message, images as <|image|> markers before the text, <|eot_id|>, the assistant header.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|image|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "<|python_tag|>"]
MAX_TILES = 4  # the real checkpoints' value; the default supported_aspect_ratios assume it


def build():
    # Like the real tokenizer, it prepends BOS (so the adapter passes add_special_tokens=False, as
    # the model card does, to avoid a second BOS after the template's).
    tokenizer = build_tokenizer(
        SPECIAL_TOKENS, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", add_bos=True, chat_template=CHAT_TEMPLATE,
    )
    text = dict(TEXT, num_hidden_layers=3)  # self, cross, self: layer 0 stays a self-attention layer
    config = MllamaConfig(
        vision_config=MllamaVisionConfig(
            hidden_size=VISION["hidden_size"], intermediate_size=VISION["intermediate_size"],
            num_hidden_layers=VISION["num_hidden_layers"],
            attention_heads=VISION["num_attention_heads"],  # Mllama's name for num_attention_heads
            num_global_layers=1, intermediate_layers_indices=[1],
            vision_output_dim=VISION["hidden_size"] * 2,  # last state + one intermediate layer
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, max_num_tiles=MAX_TILES,
        ),
        text_config=MllamaTextConfig(
            vocab_size=len(tokenizer), cross_attention_layers=[1],
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **text,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    config.architectures = ["MllamaForConditionalGeneration"]
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():  # zero-initialised by transformers: the image would not reach the text
        for layer in config.text_config.cross_attention_layers:
            block = model.model.language_model.layers[layer]
            block.cross_attn_attn_gate.uniform_(0.5, 1.0)
            block.cross_attn_mlp_gate.uniform_(0.5, 1.0)
    image_processor = MllamaImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=MAX_TILES
    )
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=CHAT_TEMPLATE)
    return model, processor
