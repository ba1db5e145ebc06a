"""Tiny Glm46VForConditionalGeneration (GLM-4.6V-Flash): GLM-4.1V's vision tower, merger and dense
GLM-4 LM (built from the ``glm4v_vision`` and ``glm4v_text`` sub-configs the model resolves through
the auto classes), GLM-4.6V's processor classes and the GLM-4.6V chat template. Sizes, resize
bounds, rotary split and tokenizer are GLM-4.1V's tiny model's."""
from __future__ import annotations

from transformers import (
    Glm46VConfig,
    Glm46VForConditionalGeneration,
    Glm46VImageProcessor,
    Glm46VProcessor,
    Glm46VVideoProcessor,
)

from .glm4v import (
    MAX_PIXELS,
    MERGE_SIZE,
    MIN_PIXELS,
    build_glm_tokenizer,
    text_config,
    token_ids,
    vision_config,
)
from .sizes import PATCH_SIZE

FAMILY = "glm46v"

# zai-org/GLM-4.6V-Flash's template without tools and thinking (enable_thinking left undefined):
# "[gMASK]<sop>", each turn as <|role|> and a newline, each image as
# <|begin_of_image|><|image|><|end_of_image|> in content order, and the assistant's turn opened by
# "<|assistant|>" alone (GLM-4.1V's adds a newline).
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}<|system|>\n{{ m.content }}"
    "{%- elif m.role == 'user' %}<|user|>{{ '\n' }}"
    "{%- if m.content is string %}{{ m.content }}"
    "{%- else %}{%- for item in m.content %}"
    "{%- if item.type == 'video' or 'video' in item %}<|begin_of_video|><|video|><|end_of_video|>"
    "{%- elif item.type == 'image' or 'image' in item %}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item.type == 'text' %}{{ item.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{%- elif m.role == 'assistant' %}<|assistant|>\n{{ m.content }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)


def build():
    tokenizer = build_glm_tokenizer()
    config = Glm46VConfig(text_config=text_config(tokenizer), vision_config=vision_config(),
                          **token_ids(tokenizer))
    config.architectures = ["Glm46VForConditionalGeneration"]
    model = Glm46VForConditionalGeneration(config).eval()
    sizes = {"patch_size": PATCH_SIZE, "temporal_patch_size": 2, "merge_size": MERGE_SIZE,
             "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}}
    processor = Glm46VProcessor(image_processor=Glm46VImageProcessor(**sizes),
                                video_processor=Glm46VVideoProcessor(**sizes),
                                tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return model, processor
