"""Tiny Qwen3VLMoeForConditionalGeneration: the tiny Qwen3-VL (ViT with learned and 2D rotary
positions, 2x2 patch merger, one DeepStack merger, interleaved M-RoPE, the Qwen3-VL processor and
chat template) whose LM layers each hold a sparse mixture-of-experts block instead of a dense MLP.

Qwen/Qwen3-VL-30B-A3B-Instruct ships the same processor class and chat template as the dense
Qwen3-VL checkpoints, so both come from the Qwen3-VL builder."""
from __future__ import annotations

from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

from .qwen2_vl import MERGE_SIZE, build_qwen_tokenizer, token_ids
from .qwen3_vl import MROPE_SECTION, NUM_POSITION_EMBEDDINGS, build_processor
from .sizes import PATCH_SIZE, TEXT, VISION

FAMILY = "qwen3_vl_moe"

# Four experts of half the dense MLP's width, two chosen per token, in every layer (the real
# checkpoints: 128 experts, 8 per token, every layer sparse).
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": TEXT["intermediate_size"] // 2,
       "decoder_sparse_step": 1, "mlp_only_layers": []}


def build():
    """The tiny model and processor: every LM layer's ``mlp`` is a sparse MoE block; one DeepStack
    merger (vision layer 0's output, added at the image positions after LM layer 0)."""
    tokenizer = build_qwen_tokenizer()
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    assert sum(MROPE_SECTION) == head_dim // 2, "mrope_section must sum to head_dim / 2"
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": MROPE_SECTION,
            "mrope_interleaved": True}
    text = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None, "head_dim": head_dim,
            "rope_parameters": rope, **TEXT, **MOE}
    vision = {
        "depth": VISION["num_hidden_layers"], "hidden_size": VISION["hidden_size"],
        "intermediate_size": VISION["intermediate_size"],
        "num_heads": VISION["num_attention_heads"],
        "out_hidden_size": TEXT["hidden_size"],  # the mergers' output: the LM's residual width
        "patch_size": PATCH_SIZE, "temporal_patch_size": 2, "spatial_merge_size": MERGE_SIZE,
        "num_position_embeddings": NUM_POSITION_EMBEDDINGS,
        "deepstack_visual_indexes": [0],
    }
    config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, **token_ids(tokenizer))
    config.architectures = ["Qwen3VLMoeForConditionalGeneration"]
    model = Qwen3VLMoeForConditionalGeneration(config).eval()
    return model, build_processor(tokenizer)
