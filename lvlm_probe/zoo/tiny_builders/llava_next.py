"""Tiny LlavaNextForConditionalGeneration: CLIP vision tower, MLP projector, Mistral LM, the
llava-v1.6-mistral template, and anyres pinpoints scaled from the real checkpoint's."""
from __future__ import annotations

from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    MistralConfig,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "llava_next"

# llava-v1.6-mistral's pinpoints are multiples of its 336-pixel tile: 1x2, 2x1, 2x2, 3x1, 1x3 tiles.
# The same multiples of the tiny tile keep the same choice of resolutions.
PINPOINTS = [[IMAGE_SIZE * h, IMAGE_SIZE * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]

# llava-hf/llava-v1.6-mistral-7b-hf's template: "[INST] <image>\n{text} [/INST]".
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> ' }}"
    "{% endif %}{% endfor %}"
)


def build():
    """The tiny model and its processor (CLS dropped by the "default" strategy, as in the real one)."""
    tokenizer = build_tokenizer(
        ["<image>"], bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_attributes={"image_token": "<image>"}, add_bos=True,
    )
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION),
        text_config=MistralConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **TEXT),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config.architectures = ["LlavaNextForConditionalGeneration"]
    model = LlavaNextForConditionalGeneration(config).eval()
    # The pinpoints must agree between the image processor (which cuts the tiles) and the config
    # (which the model uses to reassemble them).
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor
