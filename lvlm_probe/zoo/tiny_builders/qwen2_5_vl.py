"""Tiny Qwen2_5_VLForConditionalGeneration: Qwen2-VL's design with a windowed-attention ViT
(RMSNorm, SwiGLU) and the same processor, tokenizer and chat template."""
from __future__ import annotations

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from .qwen2_vl import MERGE_SIZE, build_processor, build_qwen_tokenizer, text_config, token_ids
from .sizes import PATCH_SIZE, TEXT, VISION

FAMILY = "qwen2_5_vl"


def build():
    tokenizer = build_qwen_tokenizer()
    vision = {
        "depth": VISION["num_hidden_layers"], "hidden_size": VISION["hidden_size"],
        "intermediate_size": VISION["intermediate_size"],
        "num_heads": VISION["num_attention_heads"],
        "out_hidden_size": TEXT["hidden_size"],  # the merger's output: the LM's residual width
        "patch_size": PATCH_SIZE, "temporal_patch_size": 2, "spatial_merge_size": MERGE_SIZE,
        # windows of 32 px (2x2 merged tokens), so 40-80 px images span several windows; the last
        # block attends over the whole image, as the real models' full-attention blocks do
        "window_size": 2 * PATCH_SIZE * MERGE_SIZE,
        "fullatt_block_indexes": [VISION["num_hidden_layers"] - 1],
    }
    config = Qwen2_5_VLConfig(text_config=text_config(tokenizer), vision_config=vision,
                              **token_ids(tokenizer))
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    return model, build_processor(Qwen2_5_VLProcessor, tokenizer)
