"""Tiny Llama4ForConditionalGeneration: unfold-patch vision tower with a pixel-shuffle adapter, a
linear projector, and a Llama 4 LM whose layer 0 is dense with chunked RoPE attention and layer 1
a mixture of experts (shared expert plus routed experts) with NoPE full attention, as the real
checkpoints interleave them; the Llama-4 chat template.

The image processor fits an image onto a canvas of up to ``MAX_PATCHES`` tiles of ``IMAGE_SIZE``
pixels (the canvas that needs the least upscaling, else the least downscaling, padded to whole
tiles) and adds a global view when there is more than one tile. Each tile is ``(IMAGE_SIZE /
PATCH_SIZE)^2`` patches, merged 2x2 by the pixel shuffle into a 2x2 grid of ``<|patch|>`` tokens.
"""
from __future__ import annotations

from transformers import (
    Llama4Config,
    Llama4ForConditionalGeneration,
    Llama4ImageProcessor,
    Llama4Processor,
    Llama4TextConfig,
    Llama4VisionConfig,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "llama4"

MAX_PATCHES = 4  # the real checkpoints allow 16; few tiles keep the sequences short
PIXEL_SHUFFLE_RATIO = 0.5
# Shorter than the tiny prompts with an image, so the chunked layer's mask really is local.
ATTENTION_CHUNK_SIZE = 16

# meta-llama/Llama-4-Scout-17B-16E-Instruct's template without tools and the date preamble: BOS, an
# optional system turn, one header per message with images as <|image|> markers before the text,
# <|eot|>, then the assistant header.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set system_message = messages[0]['content'] | trim %}"
    "{% else %}{% set system_message = messages[0]['content'][0]['text'] | trim %}{% endif %}"
    "{{ '<|header_start|>system<|header_end|>\n\n' + system_message + '<|eot|>' }}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|eot|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|header_start|>assistant<|header_end|>\n\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad|>", "<|header_start|>",
                  "<|header_end|>", "<|eom|>", "<|eot|>", "<|python_start|>", "<|python_end|>",
                  "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
                  "<|tile_y_separator|>"]


def build():
    """The tiny model and its processor."""
    # Like the real tokenizer it prepends BOS; the adapter passes add_special_tokens=False because
    # the template writes BOS itself.
    tokenizer = build_tokenizer(SPECIAL_TOKENS, bos_token="<|begin_of_text|>", eos_token="<|eot|>",
                                pad_token="<|finetune_right_pad|>", add_bos=True,
                                chat_template=CHAT_TEMPLATE)
    width = VISION["hidden_size"]
    # The adapter's MLP reads the pixel-shuffled states (width / ratio^2 channels) through a layer
    # sized by the vision config's intermediate_size, and its output feeds the projector.
    merged = int(width / PIXEL_SHUFFLE_RATIO**2)
    vision = Llama4VisionConfig(
        hidden_size=width, num_hidden_layers=VISION["num_hidden_layers"],
        num_attention_heads=VISION["num_attention_heads"], intermediate_size=merged,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, pixel_shuffle_ratio=PIXEL_SHUFFLE_RATIO,
        projector_input_dim=width, projector_output_dim=width, vision_output_dim=width,
    )
    text = Llama4TextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT["hidden_size"],
        intermediate_size=TEXT["intermediate_size"], intermediate_size_mlp=TEXT["intermediate_size"],
        num_hidden_layers=TEXT["num_hidden_layers"], num_attention_heads=TEXT["num_attention_heads"],
        num_key_value_heads=TEXT["num_key_value_heads"],
        head_dim=TEXT["hidden_size"] // TEXT["num_attention_heads"],
        max_position_embeddings=TEXT["max_position_embeddings"],
        num_local_experts=4, num_experts_per_tok=1, moe_layers=[1],
        no_rope_layers=[1, 0],  # 1 = RoPE (and chunked attention), 0 = NoPE (full attention)
        attention_chunk_size=ATTENTION_CHUNK_SIZE,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Llama4Config(
        vision_config=vision, text_config=text,
        boi_token_index=tokenizer.convert_tokens_to_ids("<|image_start|>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<|image_end|>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<|patch|>"),
    )
    config.architectures = ["Llama4ForConditionalGeneration"]
    model = Llama4ForConditionalGeneration(config).eval()
    # The real processor rescales and normalises in bfloat16 (the checkpoints' dtype) and returns
    # bfloat16 pixels, which a float32 model cannot take when the processor is called directly.
    # Rescaling alone stays in float32: pixels in [0, 1] instead of [-1, 1], a constant shift that
    # a random patch embedding does not care about.
    image_processor = Llama4ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                           max_patches=MAX_PATCHES, do_normalize=False)
    processor = Llama4Processor(image_processor=image_processor, tokenizer=tokenizer,
                                patch_size=PATCH_SIZE, pixel_shuffle_ratio=PIXEL_SHUFFLE_RATIO,
                                chat_template=CHAT_TEMPLATE)
    return model, processor

