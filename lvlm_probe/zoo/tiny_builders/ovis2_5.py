"""Tiny Ovis2_5ForConditionalGeneration: native-resolution SigLIP2-NaViT-style vision tower, the
visual tokenizer (a linear map of each 2x2 block of patches to a distribution over a visual
vocabulary) and the visual embedding table, Qwen3 LM, Qwen3's chat template.

Sizes keep the real checkpoint's ratios where they shape the layout: the window attention spans
``window_size / patch_size / merge_size = 3`` merged tokens per side as in Ovis2.5 (112 / 16 / 2),
so the tiny images already span several windows; the pixel budget allows 2x2 to 4x4 merged tokens
per image. The visual vocabulary has ``VISUAL_VOCAB`` entries plus the four indicator rows that
replace the image and video start/end tokens' embeddings.
"""
from __future__ import annotations

from transformers import (
    Ovis2_5Config,
    Ovis2_5ForConditionalGeneration,
    Ovis2_5ImageProcessor,
    Ovis2_5Processor,
    Ovis2_5VideoProcessor,
    Ovis2_5VisionConfig,
    Qwen3Config,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "ovis2_5"

MERGE = 2
# a budget of 32*32 to 64*64 pixels per image: 4 to 16 merged tokens of 16x16 pixels
PIXELS = {"shortest_edge": IMAGE_SIZE * IMAGE_SIZE, "longest_edge": 4 * IMAGE_SIZE * IMAGE_SIZE}
WINDOW = 3 * MERGE * PATCH_SIZE
VISUAL_VOCAB = 64
INDICATORS = 4

IMAGE, VIDEO = "<|image_pad|>", "<|video_pad|>"
IMAGE_START, IMAGE_END = "<ovis_image_start>", "<ovis_image_end>"
VIDEO_START, VIDEO_END = "<ovis_video_start>", "<ovis_video_end>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE, VIDEO,
                  IMAGE_START, IMAGE_END, VIDEO_START, VIDEO_END]

# Qwen3's template (Ovis2.5's language model), trimmed of tools and thinking: one
# <|im_start|>role ... <|im_end|> block per message, each image as one image token and a newline
# before the text (the processor expands it to start, visual atoms, end).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|image_pad|>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build():
    # Qwen's tokenizer adds no BOS; it pads with <|endoftext|>. The processor reads the named
    # visual tokens from the tokenizer.
    named = {"image_token": IMAGE, "video_token": VIDEO, "image_start_token": IMAGE_START,
             "image_end_token": IMAGE_END, "video_start_token": VIDEO_START, "video_end_token": VIDEO_END}
    tokenizer = build_tokenizer(SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                extra_attributes=named, chat_template=CHAT_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    vision = Ovis2_5VisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, spatial_merge_size=MERGE, window_size=WINDOW,
        layer_types=["window_attention", "full_attention"],  # both kinds, as in the real tower
        vocab_size=VISUAL_VOCAB + INDICATORS, num_visual_indicator_tokens=INDICATORS,
        max_position_embeddings=256, **VISION,
    )
    config = Ovis2_5Config(
        vision_config=vision,
        text_config=Qwen3Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, head_dim=16, **TEXT),
        image_token_id=ids(IMAGE), video_token_id=ids(VIDEO),
        image_start_token_id=ids(IMAGE_START), image_end_token_id=ids(IMAGE_END),
        video_start_token_id=ids(VIDEO_START), video_end_token_id=ids(VIDEO_END),
    )
    config.architectures = ["Ovis2_5ForConditionalGeneration"]
    model = Ovis2_5ForConditionalGeneration(config).eval()
    sizes = dict(size=PIXELS, patch_size=PATCH_SIZE, merge_size=MERGE)
    processor = Ovis2_5Processor(image_processor=Ovis2_5ImageProcessor(**sizes),
                                 video_processor=Ovis2_5VideoProcessor(**sizes),
                                 tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return model, processor
