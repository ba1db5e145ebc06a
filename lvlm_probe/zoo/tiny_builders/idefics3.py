"""Tiny Idefics3ForConditionalGeneration: SigLIP-style vision tower, pixel-shuffle connector, Llama LM.

Images are split into crops of the vision tower's input size plus a global view, as the real
checkpoints do: the image processor first scales an image's longest edge to ``size`` (up or down),
then stretches it to whole multiples of ``max_image_size`` and cuts it into crops. With
``size = 3 * max_image_size`` a landscape 40x56 image becomes 3x3 crops and a portrait 72x48 image
3x2 crops, each crop ``IMAGE_SEQ_LEN`` = 2x2 tokens after the connector's pixel shuffle.
"""
from __future__ import annotations

from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "idefics3"

SCALE_FACTOR = 2
# Tokens per crop: (IMAGE_SIZE / PATCH_SIZE)^2 patches, merged SCALE_FACTOR^2 at a time.
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
MAX_SPLITS = 3  # crops along an image's longest side
LONGEST_EDGE = MAX_SPLITS * IMAGE_SIZE

# HuggingFaceM4/Idefics3-8B-Llama3's template: "User:<image>text<end_of_utterance>\nAssistant:".
CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'].capitalize() }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def row_col_tokens(max_splits: int = MAX_SPLITS) -> list[str]:
    """The ``<row_i_col_j>`` tokens that mark crops, for every crop position the processor can emit."""
    return [f"<row_{i}_col_{j}>" for i in range(1, max_splits + 1) for j in range(1, max_splits + 1)]


def build():
    specials = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>",
                *row_col_tokens()]
    # The template writes BOS itself, so the tokenizer does not add a second one.
    tokenizer = build_tokenizer(
        specials, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        pad_token="<|reserved_special_token_0|>", unk_token="<unk>",
    )
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION),
        text_config=LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                **TEXT),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=SCALE_FACTOR,
    )
    config.architectures = ["Idefics3ForConditionalGeneration"]
    model = Idefics3ForConditionalGeneration(config).eval()
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": IMAGE_SIZE},
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor
