"""Tiny Mistral3ForConditionalGeneration: Pixtral vision tower, patch-merging projector, Mistral LM.

The Pixtral image processor keeps each image's aspect ratio: it scales an image down (never up)
so its longest edge fits ``LONGEST_EDGE``, then rounds each side up to whole ``PATCH_SIZE *
SPATIAL_MERGE_SIZE`` = 16 px tokens. A landscape 40x56 image becomes 48x64 px, a 3x4 grid of
``[IMG]`` tokens; a portrait 72x48 image 64x48 px (after scaling to 64x42), a 4x3 grid. Each row of
``[IMG]`` tokens is closed by ``[IMG_BREAK]``, the last by ``[IMG_END]``. The projector's patch
merger joins each 2x2 block of 8 px patches into one token, as the real checkpoints join 2x2 blocks
of 14 px patches.

transformers initialises no weight on the image path to zero (the projector's linear layers and
patch merger are drawn at random, its RMSNorm is ones), so nothing needs redrawing; the builder
checks this, so a future transformers that zero-initialises one cannot make the image checks pass
vacuously.
"""
from __future__ import annotations

from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "mistral3"

SPATIAL_MERGE_SIZE = 2
LONGEST_EDGE = 2 * IMAGE_SIZE  # 64 px: at most 4 tokens along a side

# mistralai/Mistral-Small-3.1-24B-Instruct-2503's template without its default system prompt:
# "<s>[INST]" + the user's content blocks in order ("[IMG]" for an image) + "[/INST]".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ '[SYSTEM_PROMPT]' + (message['content'] if message['content'] is string else message['content'][0]['text']) + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' -%}{{ '[INST]' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'text' -%}{{ block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] -%}{{ '[IMG]' }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{{ message['content'][0]['text'] }}{%- endif -%}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
SPECIALS = ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]


def build():
    # No BOS post-processor: the chat template writes "<s>" into the text.
    tokenizer = build_tokenizer(
        SPECIALS, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(image_size=LONGEST_EDGE, patch_size=PATCH_SIZE, **VISION),
        text_config=MistralConfig(
            vocab_size=len(tokenizer), head_dim=TEXT["hidden_size"] // TEXT["num_attention_heads"],
            sliding_window=None, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **TEXT,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=SPATIAL_MERGE_SIZE,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    config.architectures = ["Mistral3ForConditionalGeneration"]
    model = Mistral3ForConditionalGeneration(config).eval()
    projector = model.model.multi_modal_projector
    for name, param in projector.named_parameters():
        if not param.detach().abs().sum():  # a gate on the image path left at zero
            raise RuntimeError(f"transformers zero-initialises the projector's {name}; draw it at random")
    image_processor = PixtralImageProcessor(
        size={"longest_edge": LONGEST_EDGE}, patch_size={"height": PATCH_SIZE, "width": PATCH_SIZE},
    )
    processor = PixtralProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        spatial_merge_size=SPATIAL_MERGE_SIZE, chat_template=CHAT_TEMPLATE,
    )
    return model, processor

