"""Tiny VipLlavaForConditionalGeneration: CLIP vision tower whose CLS-dropped features are taken from
several layers and concatenated, a projector with a LayerNorm over the concatenation, a Llama LM,
and the ViP-LLaVA prompt format."""
from __future__ import annotations

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaProcessor,
    VipLlavaConfig,
    VipLlavaForConditionalGeneration,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "vipllava"

# llava-hf/vip-llava-*-hf's prompt: the Vicuna system sentence, "###Human: ", one "<image>\n" per
# image, the text, then "###Assistant:".
CHAT_TEMPLATE = (
    "{{ \"A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions.\" }}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '###Human: ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}"
    "{% elif message['role'] == 'assistant' %}{{ '###Assistant: ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '###Assistant:' }}{% endif %}"
)
# The checkpoints concatenate hidden states (-2, -5, -8, -11, 6) of a 24-layer tower; the tiny
# tower's 3 hidden states (embeddings, layer 0, layer 1) are all taken, in a mixed order with
# negative and positive indices as there: layer 0's output, the embeddings, layer 1's output.
VISION_FEATURE_LAYERS = [-2, 0, 2]


def build():
    tokenizer = build_tokenizer(
        ["<image>"], bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_attributes={"image_token": "<image>"}, add_bos=True,
    )
    config = VipLlavaConfig(
        vision_config=CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION),
        text_config=LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                **TEXT),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layers=VISION_FEATURE_LAYERS,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    config.architectures = ["VipLlavaForConditionalGeneration"]
    model = VipLlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # ones and zeros from transformers: draw the projector's input scale
        norm = model.model.multi_modal_projector.projector_layernorm
        norm.weight.normal_(mean=1.0, std=0.5)
        norm.bias.normal_(std=0.5)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    # The model always drops CLS ([:, 1:]); "default" with one additional token gives the
    # processor the same count: (image / patch)**2 placeholders per image.
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor
