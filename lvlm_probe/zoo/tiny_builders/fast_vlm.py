"""Tiny FastVlmForConditionalGeneration: a timm FastViT (the hybrid convolution/attention tower the
real checkpoints name, ``fastvit_mci3``) behind transformers' ``TimmWrapperModel``, a two-layer MLP
projector, a Qwen2 LM, FastVLM's chat template and LLaVA's processor.

The tower is built by timm with ``pretrained=False`` (nothing is downloaded), shrunk through
``model_args`` to two stages: a RepMixer stage at the stem's stride 4 and an attention stage after
one more stride-2 downsample, so the tower's total stride is ``PATCH_SIZE`` (8; 64 in the real
tower) and each ``IMAGE_SIZE`` image becomes ``(IMAGE_SIZE / PATCH_SIZE)^2`` features, each the
tower's final convolution's ``2 x`` widened channels. Like the real config it is built in timm's
``inference_mode`` (re-parameterised single-branch convolutions).
"""
from __future__ import annotations

import torch
from transformers import (
    CLIPImageProcessor,
    FastVlmConfig,
    FastVlmForConditionalGeneration,
    LlavaProcessor,
    Qwen2Config,
    TimmWrapperConfig,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "fast_vlm"

# apple/FastVLM's template: the default system message, ChatML turns, "<image>\n" per image item in
# the order the content lists them, then the text.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{- '<image>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
# Stage widths: the last is the vision width; the final convolution doubles it (``cls_ratio``).
EMBED_DIMS = (VISION["hidden_size"] // 2, VISION["hidden_size"])
CLS_RATIO = 2


def build():
    """The tiny model and its processor (every feature of the tower's last map kept: "full")."""
    tokenizer = build_tokenizer(
        SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_attributes={"image_token": "<image>"}, chat_template=CHAT_TEMPLATE,
    )
    vision = TimmWrapperConfig(
        architecture="fastvit_mci3",
        model_args=dict(
            inference_mode=True,
            layers=[1] * VISION["num_hidden_layers"],
            embed_dims=list(EMBED_DIMS),
            mlp_ratios=[VISION["intermediate_size"] / VISION["hidden_size"]] * 2,
            downsamples=[False, True],
            se_downsamples=[False, False],
            token_mixers=["repmixer", "attention"],
            cls_ratio=CLS_RATIO,
        ),
        hidden_size=EMBED_DIMS[-1] * CLS_RATIO,
        do_pooling=True,
        global_pool="avg",
    )
    config = FastVlmConfig(
        vision_config=vision,
        text_config=Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, **TEXT),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    config.architectures = ["FastVlmForConditionalGeneration"]
    model = FastVlmForConditionalGeneration(config).eval()
    _draw_tower(model)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full", num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def _draw_tower(model) -> None:
    """Draw the tower's weights at a scale that carries the image through it.

    transformers initialises every convolution and linear layer of the timm model with
    ``N(0, 0.02)`` (the real checkpoints load trained weights over it), which shrinks the signal at
    every layer until the features are ~1e-10 and the image cannot change the answer; and timm
    starts every block's layer scale at 1e-5, which makes each block nearly the identity. Draw the
    weights with a fan-in scale (unit-variance outputs) and the layer scales around 1."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.model.vision_tower.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / fan_in ** 0.5)
        for name, param in model.model.vision_tower.named_parameters():
            if "layer_scale" in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
