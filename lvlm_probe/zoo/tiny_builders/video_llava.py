"""Tiny VideoLlavaForConditionalGeneration, a model with no family adapter (the generic adapter
reads it): CLIP image and video towers (``image_tower``, ``video_tower``), an MLP projector and a
Llama LM, with the Video-LLaVA template. One square grid of ``<image>`` tokens per image."""
from __future__ import annotations

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
    VideoLlavaProcessor,
    VideoLlavaVideoProcessor,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "video_llava"
GENERIC = True  # no family adapter: loads through the generic one

# LanguageBind/Video-LLaVA-7B-hf's prompt format: "USER: <image>\n{text} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build():
    tokenizer = build_tokenizer(
        ["<image>", "<video>"], bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_attributes={"image_token": "<image>", "video_token": "<video>"}, add_bos=True,
    )
    side = IMAGE_SIZE // PATCH_SIZE
    config = VideoLlavaConfig(
        vision_config=CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION),
        text_config=LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                **TEXT),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_seq_length=side * side,
    )
    config.architectures = ["VideoLlavaForConditionalGeneration"]
    model = VideoLlavaForConditionalGeneration(config).eval()
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop),
        video_processor=VideoLlavaVideoProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop),
        tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return model, processor
