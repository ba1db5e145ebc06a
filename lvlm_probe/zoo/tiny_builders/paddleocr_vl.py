"""Tiny PaddleOCRVLForConditionalGeneration, a model with no family adapter (the generic adapter
reads it): a NaViT-style SigLIP tower at native resolution, a projector that merges 2x2 patches, an
ERNIE-4.5 LM with multimodal rotary positions, and the PaddleOCR-VL template. Each image is one run
of ``<|IMAGE_PLACEHOLDER|>`` tokens whose grid the processor reports in ``image_grid_thw``."""
from __future__ import annotations

from transformers import (
    PaddleOCRVLConfig,
    PaddleOCRVLForConditionalGeneration,
    PaddleOCRVLImageProcessor,
    PaddleOCRVLProcessor,
)

from .qwen2_vl import MAX_PIXELS, MERGE_SIZE, MIN_PIXELS, MROPE_SECTION
from .sizes import PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "paddleocr_vl"
GENERIC = True  # no family adapter: loads through the generic one

# PaddlePaddle/PaddleOCR-VL's template: "User: <image>{text}\nAssistant: ", each image framed by
# <|IMAGE_START|> ... <|IMAGE_END|>.
CHAT_TEMPLATE = (
    "{%- if not add_generation_prompt is defined -%}{%- set add_generation_prompt = true -%}{%- endif -%}"
    "{{- '<|begin_of_sentence|>' -}}"
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{{- 'User: ' -}}"
    "{%- for content in message['content'] -%}{%- if content['type'] == 'image' -%}"
    "{{- '<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>' -}}{%- endif -%}{%- endfor -%}"
    "{%- for content in message['content'] -%}{%- if content['type'] == 'text' -%}"
    "{{- content['text'] -}}{%- endif -%}{%- endfor -%}{{- '\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'Assistant: ' + message['content'][0]['text'] + '</s>' -}}"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)
SPECIAL_TOKENS = ["<|begin_of_sentence|>", "</s>", "<unk>", "<|IMAGE_START|>",
                  "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_END|>", "<|video_pad|>"]


def build():
    named = {"image_token": "<|IMAGE_PLACEHOLDER|>", "video_token": "<|video_pad|>"}
    tokenizer = build_tokenizer(SPECIAL_TOKENS, bos_token="<|begin_of_sentence|>", eos_token="</s>",
                                pad_token="<unk>", unk_token="<unk>", extra_attributes=named)
    tokenizer.image_token_id = tokenizer.convert_tokens_to_ids("<|IMAGE_PLACEHOLDER|>")
    ids = tokenizer.convert_tokens_to_ids
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": 5e5, "mrope_section": MROPE_SECTION}
    text = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "head_dim": head_dim, "rope_parameters": rope, "tie_word_embeddings": False, **TEXT}
    vision = {**VISION, "patch_size": PATCH_SIZE, "image_size": 4 * PATCH_SIZE,
              "spatial_merge_size": MERGE_SIZE}
    config = PaddleOCRVLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                               image_token_id=ids("<|IMAGE_PLACEHOLDER|>"),
                               video_token_id=ids("<|video_pad|>"),
                               vision_start_token_id=ids("<|IMAGE_START|>"),
                               vision_end_token_id=ids("<|IMAGE_END|>"))
    config.architectures = ["PaddleOCRVLForConditionalGeneration"]
    model = PaddleOCRVLForConditionalGeneration(config).eval()
    image_processor = PaddleOCRVLImageProcessor(patch_size=PATCH_SIZE, temporal_patch_size=1,
                                                merge_size=MERGE_SIZE, min_pixels=MIN_PIXELS,
                                                max_pixels=MAX_PIXELS)
    processor = PaddleOCRVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=CHAT_TEMPLATE)
    return model, processor
