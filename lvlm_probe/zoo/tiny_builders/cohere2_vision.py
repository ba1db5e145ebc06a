"""Tiny Cohere2VisionForConditionalGeneration: SigLIP vision tower, pixel-shuffle SwiGLU projector,
Cohere2 LM (parallel attention and MLP blocks, a sliding-window layer then a full-attention layer,
tied embeddings), the Command A Vision chat template, and dynamic tiles plus a thumbnail.

The image processor cuts an image into 1 to ``MAX_PATCHES`` tiles of the vision tower's input size
(the arrangement needing the least upscaling, else the least downscaling) and adds a thumbnail
when there is more than one tile. Each tile is ``TILE_SIDE x TILE_SIDE`` tokens after the
projector's 2x2 pixel shuffle, followed by one line-break token.
"""
from __future__ import annotations

from transformers import (
    Cohere2Config,
    Cohere2VisionConfig,
    Cohere2VisionForConditionalGeneration,
    Cohere2VisionImageProcessor,
    Cohere2VisionProcessor,
    SiglipVisionConfig,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "cohere2_vision"

DOWNSAMPLE_FACTOR = 2
# Tokens per tile side: the tower's patches per side merged DOWNSAMPLE_FACTOR at a time. The image
# processor calls this its patch_size (16 in the real checkpoint: 512 px / 16 px / 2).
TILE_SIDE = IMAGE_SIZE // PATCH_SIZE // DOWNSAMPLE_FACTOR
MAX_PATCHES = 4  # the real checkpoint allows 12; few tiles keep the sequences short
SLIDING_WINDOW = 16  # shorter than the tiny prompts with an image, so the window really cuts

# CohereLabs/command-a-vision-07-2025's template without its default system preamble, tools,
# documents and thinking: BOS, one turn per message (images as <image> before the text), then the
# chatbot's turn opened with <|START_RESPONSE|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|START_OF_TURN_TOKEN|>' }}"
    "{% if message['role'] == 'user' %}{{ '<|USER_TOKEN|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|CHATBOT_TOKEN|>' }}"
    "{% else %}{{ '<|SYSTEM_TOKEN|>' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|END_OF_TURN_TOKEN|>' }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>' }}{% endif %}"
)

SPECIAL_TOKENS = ["<BOS_TOKEN>", "<EOS_TOKEN>", "<PAD>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
                  "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|START_RESPONSE|>",
                  "<|END_RESPONSE|>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_LINE_BREAK|>", "<image>"]


def build():
    """The tiny model and its processor."""
    # The processor reads these four names from the tokenizer, as the checkpoint's declares them.
    named = {"boi_token": "<|START_OF_IMG|>", "eoi_token": "<|END_OF_IMG|>", "image_token": "<image>",
             "img_line_break_token": "<|IMG_LINE_BREAK|>"}
    # Like the real tokenizer it prepends BOS; the template writes BOS itself.
    tokenizer = build_tokenizer(SPECIAL_TOKENS, bos_token="<BOS_TOKEN>", eos_token="<|END_OF_TURN_TOKEN|>",
                                pad_token="<PAD>", extra_attributes=named, add_bos=True,
                                chat_template=CHAT_TEMPLATE)
    text = Cohere2Config(
        vocab_size=len(tokenizer), hidden_size=TEXT["hidden_size"], intermediate_size=TEXT["intermediate_size"],
        num_hidden_layers=TEXT["num_hidden_layers"], num_attention_heads=TEXT["num_attention_heads"],
        num_key_value_heads=TEXT["num_key_value_heads"],
        max_position_embeddings=TEXT["max_position_embeddings"],
        layer_types=["sliding_attention", "full_attention"], sliding_window=SLIDING_WINDOW,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Cohere2VisionConfig(
        vision_config=SiglipVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION),
        text_config=text,
        downsample_factor=DOWNSAMPLE_FACTOR,
        alignment_intermediate_size=2 * TEXT["intermediate_size"],  # split in halves by the SwiGLU
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    config.architectures = ["Cohere2VisionForConditionalGeneration"]
    model = Cohere2VisionForConditionalGeneration(config).eval()
    image_processor = Cohere2VisionImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=True, min_patches=1,
        max_patches=MAX_PATCHES, patch_size=TILE_SIDE,
    )
    processor = Cohere2VisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                       chat_template=CHAT_TEMPLATE)
    return model, processor
