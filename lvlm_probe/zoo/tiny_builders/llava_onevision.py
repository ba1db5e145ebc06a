"""Tiny LlavaOnevisionForConditionalGeneration: SigLIP vision tower, MLP projector, Qwen2 LM, the
llava-onevision-qwen2 template, and anyres-max-9 pinpoints scaled from the real checkpoint's."""
from __future__ import annotations

from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "llava_onevision"

# The real pinpoints are every (h, w) of 1..6 tiles of 384 pixels; 36 tiles exceed the 9-tile budget
# of "anyres_max_9", so large images exercise the model's downscaling of the tile grid.
PINPOINTS = [[IMAGE_SIZE * h, IMAGE_SIZE * w] for h in range(1, 7) for w in range(1, 7)]
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # per tile: SigLIP has no CLS token

# llava-hf/llava-onevision-qwen2-*-ov-hf's template: images first, then "\n" + text.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
    "{{ '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build():
    """The tiny model and its processor (all patch features kept: the "full" strategy)."""
    tokenizer = build_tokenizer(
        ["<|im_start|>", "<image>", "<video>"], eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_attributes={"image_token": "<image>", "video_token": "<video>"},
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                                         vision_use_head=False, **VISION),
        text_config=Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, **TEXT),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    siglip_norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=PINPOINTS, **siglip_norm),
        video_processor=LlavaOnevisionVideoProcessor(size=size, **siglip_norm),
        tokenizer=tokenizer, num_image_tokens=N_IMAGE_TOKENS, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=CHAT_TEMPLATE,
    )
    return model, processor
