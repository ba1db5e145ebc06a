"""Tiny PerceptionLMForConditionalGeneration: a timm Perception Encoder (PE-Lang ViT with a class
token, rotary position embeddings and layer scale) behind transformers' ``TimmWrapperModel``, a
two-layer MLP projector with 2x2 average pooling, a Llama LM, and Perception-LM's chat template.

The vision tower is the architecture the real checkpoints name (``vit_pe_lang_large_patch14_448``),
shrunk through ``model_args`` and built by timm with ``pretrained=False`` (nothing is downloaded).
The image processor cuts each image into a thumbnail plus up to ``MAX_TILES`` tiles of
``IMAGE_SIZE`` pixels; each tile's ``(IMAGE_SIZE / PATCH_SIZE)^2`` patches are pooled 2x2.
"""
from __future__ import annotations

from transformers import (
    LlamaConfig,
    PerceptionLMConfig,
    PerceptionLMForConditionalGeneration,
    PerceptionLMImageProcessor,
    PerceptionLMProcessor,
    PerceptionLMVideoProcessor,
    TimmWrapperConfig,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "perception_lm"

# Perception-LM-1B's template, trimmed of its video branch: BOS, the default system message, one
# header per message, the images' <|image|> markers before the text, <|eot_id|>, the assistant header.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = 'You are a helpful language and vision assistant. You are able to understand "
    "the visual content that the user provides, and assist the user with a variety of tasks using natural "
    "language.' %}"
    "{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- system_message }}"
    "{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<|image|>' }}"
    "{%- endfor %}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{- content['text'] | trim }}"
    "{%- endfor %}"
    "{{'<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|finetune_right_pad_id|>", "<|image|>", "<|video|>"]
# The real processor allows 36 tiles; 4 keeps the tiny sequences short (the 40x56 and 72x48 test
# images both become 2x2 tiles plus the thumbnail, other aspect ratios 1x3 or 3x1).
MAX_TILES = 4
POOLING = 2  # the real checkpoints' projector_pooling_ratio and processor pooling_ratio


def build():
    """The tiny model and its processor."""
    # Like Llama 3's tokenizer it prepends BOS; the template writes BOS too, and lvlm_probe then
    # tokenizes without special tokens (as for Llama 3.2 Vision).
    tokenizer = build_tokenizer(
        SPECIAL_TOKENS, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", add_bos=True, chat_template=CHAT_TEMPLATE,
        extra_attributes={"image_token": "<|image|>", "video_token": "<|video|>"},
    )
    vision = TimmWrapperConfig(
        architecture="vit_pe_lang_large_patch14_448",
        model_args=dict(
            embed_dim=VISION["hidden_size"], depth=VISION["num_hidden_layers"],
            num_heads=VISION["num_attention_heads"],
            mlp_ratio=VISION["intermediate_size"] / VISION["hidden_size"],
            patch_size=PATCH_SIZE, img_size=(IMAGE_SIZE, IMAGE_SIZE),
            ref_feat_shape=(IMAGE_SIZE // PATCH_SIZE, IMAGE_SIZE // PATCH_SIZE),
            global_pool="",  # every token out, as the real vision config asks
        ),
        do_pooling=False,
    )
    config = PerceptionLMConfig(
        vision_config=vision,
        text_config=LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                **TEXT),
        vision_use_cls_token=True,
        projector_pooling_ratio=POOLING,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
    )
    config.architectures = ["PerceptionLMForConditionalGeneration"]
    model = PerceptionLMForConditionalGeneration(config).eval()
    image_processor = PerceptionLMImageProcessor(
        tile_size=IMAGE_SIZE, max_num_tiles=MAX_TILES, vision_input_type="thumb+tile",
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    video_processor = PerceptionLMVideoProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = PerceptionLMProcessor(
        image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer,
        patch_size=PATCH_SIZE, pooling_ratio=POOLING, chat_template=CHAT_TEMPLATE,
    )
    return model, processor
