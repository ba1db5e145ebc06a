"""Tiny Idefics2ForConditionalGeneration: SigLIP-style vision tower, Perceiver resampler, Mistral LM.

The image processor keeps each image's aspect ratio: it scales an image down so its longest edge
fits ``LONGEST_EDGE`` and up so its shortest edge reaches ``SHORTEST_EDGE``, and pads the batch's
images to a common size (the vision tower masks the padding patches). With image splitting, as in
HuggingFaceM4/idefics2-8b, each image is first cut into its four quarters, and the quarters and the
whole image are five views. A 40x56 image becomes a 34x48 px view (a 4x6 grid of 8 px patches), a
72x48 image a 48x32 px view (6x4); the Perceiver resampler turns every view into
``N_LATENTS`` latent queries, which replace that many ``<image>`` placeholders.

transformers initialises the resampler's latent queries to ones: every query would then read the
image in the same way and give the same output, so the builder draws them at random.
"""
from __future__ import annotations

import torch
from transformers import (
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics2ImageProcessor,
    Idefics2PerceiverConfig,
    Idefics2Processor,
    Idefics2VisionConfig,
    MistralConfig,
)

from .sizes import PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "idefics2"

N_LATENTS = 4  # queries per view (idefics2-8b: 64)
SHORTEST_EDGE = 16
LONGEST_EDGE = 48  # at most 6 patches along a side

# HuggingFaceM4/idefics2-8b's template: "User:<image>text<end_of_utterance>\nAssistant:"; the
# tokenizer adds BOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build():
    # Mistral's tokenizer prepends BOS; idefics2-8b pads with <unk>. The processor registers
    # <fake_token_around_image>, <image> and <end_of_utterance> as special tokens itself; they are
    # trained in too, so they already have ids and the vocabulary does not grow.
    tokenizer = build_tokenizer(
        ["<fake_token_around_image>", "<image>", "<end_of_utterance>"], bos_token="<s>",
        eos_token="</s>", pad_token="<unk>", unk_token="<unk>", add_bos=True,
    )
    image_processor = Idefics2ImageProcessor(
        size={"shortest_edge": SHORTEST_EDGE, "longest_edge": LONGEST_EDGE}, do_image_splitting=True,
    )
    processor = Idefics2Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=N_LATENTS,
        chat_template=CHAT_TEMPLATE,
    )
    heads = TEXT["num_attention_heads"]
    config = Idefics2Config(
        vision_config=Idefics2VisionConfig(image_size=LONGEST_EDGE, patch_size=PATCH_SIZE, **VISION),
        perceiver_config=Idefics2PerceiverConfig(
            hidden_size=TEXT["hidden_size"], resampler_n_latents=N_LATENTS, resampler_depth=2,
            resampler_n_heads=heads, resampler_head_dim=TEXT["hidden_size"] // heads,
            num_key_value_heads=TEXT["num_key_value_heads"],
        ),
        text_config=MistralConfig(
            vocab_size=len(tokenizer), head_dim=TEXT["hidden_size"] // heads, sliding_window=None,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **TEXT,
        ),
        image_token_id=processor.image_token_id,
    )
    config.architectures = ["Idefics2ForConditionalGeneration"]
    model = Idefics2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # ones from transformers: identical queries (see the module docstring)
        model.model.connector.perceiver_resampler.latents.normal_()
    return model, processor
