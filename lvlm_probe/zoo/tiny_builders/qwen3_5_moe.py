"""Tiny Qwen3_5MoeForConditionalGeneration: the tiny Qwen3.5 (Qwen3-VL-like vision tower without
DeepStack, one Gated DeltaNet and one gated full-attention layer, the Qwen3-VL processor and the
Qwen3.5 chat template) whose MLPs are sparse mixture-of-experts blocks with a gated shared expert.

Qwen/Qwen3.5-*-A*B checkpoints ship the same processor, tokens and chat template as the dense
ones, so those come from the Qwen3.5 builder."""
from __future__ import annotations

from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

from .qwen2_vl import token_ids
from .qwen3_5 import build_processor, build_qwen3_5_tokenizer, text_config, vision_config
from .sizes import TEXT

FAMILY = "qwen3_5_moe"

# Four experts of half the dense MLP's width, two chosen per token, and a shared expert of the
# same width (the real checkpoints: 256 experts, 8 per token, one shared expert).
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": TEXT["intermediate_size"] // 2,
       "shared_expert_intermediate_size": TEXT["intermediate_size"] // 2}


def build():
    """The tiny model and processor: LM layer 0 is Gated DeltaNet, layer 1 full attention, and
    both MLPs are MoE blocks."""
    tokenizer = build_qwen3_5_tokenizer()
    text = {key: value for key, value in text_config(tokenizer).items() if key != "intermediate_size"}
    config = Qwen3_5MoeConfig(text_config={**text, **MOE}, vision_config=vision_config(),
                              **token_ids(tokenizer))
    config.architectures = ["Qwen3_5MoeForConditionalGeneration"]
    model = Qwen3_5MoeForConditionalGeneration(config).eval()
    return model, build_processor(tokenizer)
