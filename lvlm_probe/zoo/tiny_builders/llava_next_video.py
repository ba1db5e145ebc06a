"""Tiny LlavaNextVideoForConditionalGeneration, a model with no family adapter (the generic adapter
reads it): LLaVA-NeXT's anyres tiles with newline tokens, so each image is one run of ``<image>``
tokens that is not a square grid (the generic adapter keeps it as non-spatial tokens)."""
from __future__ import annotations

from transformers import (
    CLIPVisionConfig,
    LlavaNextImageProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaNextVideoVideoProcessor,
    MistralConfig,
)

from .llava_next import CHAT_TEMPLATE, PINPOINTS
from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "llava_next_video"
GENERIC = True  # no family adapter: loads through the generic one


def build():
    tokenizer = build_tokenizer(
        ["<image>", "<video>"], bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_attributes={"image_token": "<image>", "video_token": "<video>"}, add_bos=True,
    )
    config = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION),
        text_config=MistralConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **TEXT),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    config.architectures = ["LlavaNextVideoForConditionalGeneration"]
    model = LlavaNextVideoForConditionalGeneration(config).eval()
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = LlavaNextVideoProcessor(
        image_processor=LlavaNextImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop,
                                                image_grid_pinpoints=PINPOINTS),
        video_processor=LlavaNextVideoVideoProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop),
        tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return model, processor
