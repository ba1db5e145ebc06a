"""Tiny JanusForConditionalGeneration: SigLIP-like vision tower, two-layer MLP aligner, Llama LM, and
the image-generation parts (a VQ-VAE, generation embeddings, aligner and head) at their smallest.

For understanding, the image processor scales an image so its longest edge is ``IMAGE_SIZE`` and
pads it to a square (centred, in the mean colour), as Janus-Pro does at 384 px. The vision tower
reads the square as a ``(IMAGE_SIZE / PATCH_SIZE)^2`` = 4x4 patch grid without a class token, and
the aligner maps every patch state to one ``<image_placeholder>`` position: ``NUM_IMAGE_TOKENS`` per
image (576 = 24x24 in the real checkpoint), framed by ``<begin_of_image>`` / ``<end_of_image>``.

The VQ-VAE only encodes and decodes images for generation; it is built with one resolution level
of 32 channels (its GroupNorms need multiples of 32) and a codebook of 32 entries, so the checkpoint
stays small. transformers initialises no weight on the understanding path to zero (the tower's and
aligner's linear weights are drawn, biases zero, LayerNorms ones), so nothing is redrawn.
"""
from __future__ import annotations

from transformers import (
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessor,
    JanusProcessor,
    JanusVisionConfig,
    JanusVQVAEConfig,
    LlamaConfig,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "janus"

NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
BOS, EOS, PAD = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<\uff5c\u2581pad\u2581\uff5c>"
IMAGE, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
SPECIAL_TOKENS = [IMAGE, BOI, EOI, "<|User|>", "<|Assistant|>", "<patch_placeholder>"]

# deepseek-community/Janus-Pro-1B's template: "<|User|>: " + the content (an image is
# "<image_placeholder>", with a newline between it and its neighbours) + "\n\n", then "<|Assistant|>:".
# The processor prepends the default system prompt and the tokenizer BOS.
CHAT_TEMPLATE = (
    "{% set seps = ['\n\n', '<\uff5cend\u2581of\u2581sentence\uff5c>'] %}{% set i = 0 %}"
    "{% for message in messages %}{% if message['role']|lower == 'user' %}<|User|>: "
    "{% elif message['role']|lower == 'assistant' %}<|Assistant|>:"
    "{% if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' "
    "and message['content'][0]['text']=='') %} {% endif %}"
    "{% else %}{{ message['role'].capitalize() }}: {% endif %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{% if not loop.first %}{{ '\n' }}{% endif %}<image_placeholder>"
    "{% if not loop.last %}{{ '\n' }}{% endif %}"
    "{% elif content['type'] == 'text' %}{% set text = content['text'] %}"
    "{% if loop.first %}{% set text = text.lstrip() %}{% endif %}"
    "{% if loop.last %}{% set text = text.rstrip() %}{% endif %}"
    "{% if not loop.first and message['content'][loop.index0-1]['type'] == 'text' %}{{ ' ' + text }}"
    "{% else %}{{ text }}{% endif %}{% endif %}{% endfor %}"
    "{% if not loop.last or add_generation_prompt %}{% if message['role']|lower == 'user' %}"
    "{{ seps[0] }}{% else %}{{ seps[1] }}{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)


def build():
    # The checkpoint's tokenizer prepends BOS and names the image and image-boundary tokens (the
    # processor reads tokenizer.image_token, boi_token and eoi_token).
    tokenizer = build_tokenizer(
        SPECIAL_TOKENS, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token="<unk>",
        extra_attributes={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},
        chat_template=CHAT_TEMPLATE, add_bos=True,
    )
    hidden = TEXT["hidden_size"]
    vision = JanusVisionConfig(
        hidden_size=VISION["hidden_size"], num_hidden_layers=VISION["num_hidden_layers"],
        num_attention_heads=VISION["num_attention_heads"],
        mlp_ratio=VISION["intermediate_size"] / VISION["hidden_size"],
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=hidden, depth=2,
        num_image_tokens=NUM_IMAGE_TOKENS,
    )
    vq = JanusVQVAEConfig(
        embed_dim=8, num_embeddings=32, latent_channels=32, base_channels=32, channel_multiplier=[1],
        num_res_blocks=1, projection_dim=hidden, image_token_embed_dim=hidden,
    )
    config = JanusConfig(
        vision_config=vision, vq_config=vq,
        text_config=LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                **TEXT),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
    )
    config.architectures = ["JanusForConditionalGeneration"]
    model = JanusForConditionalGeneration(config).eval()
    image_processor = JanusImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                               num_image_tokens=NUM_IMAGE_TOKENS, use_default_system_prompt=True)
    return model, processor
