"""Qwen3.5-MoE (``Qwen3_5MoeForConditionalGeneration``): Qwen3.5 (same vision tower and merger, no
DeepStack, the same token layout, the same hybrid of Gated DeltaNet and gated full-attention
layers, zero-centred RMSNorms) with a mixture-of-experts MLP in every layer.

Token layout: Qwen2-VL's. One contiguous ``<|image_pad|>`` run per image, between
``<|vision_start|>`` and ``<|vision_end|>``, of ``t * h * w / merge**2`` tokens for
``image_grid_thw[i] = (t, h, w)``, row-major over the merged ``(h / merge) x (w / merge)`` grid.

Mixture of experts: each layer's ``mlp`` (``Qwen3_5MoeSparseMoeBlock``) adds a shared expert
(``mlp.shared_expert``, scaled by ``sigmoid(mlp.shared_expert_gate(x))``) to the router's top
``num_experts_per_tok`` of ``num_experts`` experts (``mlp.experts``, weighted by the renormalised
top-k probabilities). The block returns one ``[batch, seq, d_model]`` tensor, so
``blocks.{l}.hook_mlp_out`` is the whole MoE write. The router logits are the first element of the
tuple ``mlp.gate`` returns (``(router_logits, top_k_weights, top_k_index)``, flattened to
``[batch * seq, num_experts]``); lvlm_probe offers no hook name for them. Routing is per token, so
hiding positions needs nothing beyond Qwen3.5's (masked keys in full attention, cut out of the
linear attention).
"""
from __future__ import annotations

from .qwen3_5 import Qwen3_5


class Qwen3_5Moe(Qwen3_5):
    name = "qwen3_5_moe"
    hf_classes = ("Qwen3_5MoeForConditionalGeneration",)
    model_types = ("qwen3_5_moe",)
    # Module paths, layouts, unmasked_mixing_layers, nonlinear_writes and the norm offset: Qwen3.5's.
