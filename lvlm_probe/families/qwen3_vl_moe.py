"""Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``): Qwen3-VL (same vision tower, mergers,
DeepStack, interleaved M-RoPE and token layout) with a mixture-of-experts language model.

Token layout: Qwen3-VL's, i.e. Qwen2-VL's: one contiguous ``<|image_pad|>`` run per image holding
``t * h * w / merge**2`` tokens for ``image_grid_thw[i] = (t, h, w)``, row-major over the merged
``(h / merge) x (w / merge)`` grid, between ``<|vision_start|>`` and ``<|vision_end|>``.

Mixture of experts: in each layer whose index ``l`` has ``(l + 1) % decoder_sparse_step == 0`` and
is not in ``mlp_only_layers``, ``mlp`` is a sparse block (``Qwen3VLMoeTextSparseMoeBlock``): a
router ``mlp.gate`` picks ``num_experts_per_tok`` of ``num_experts`` experts per token and
``mlp.experts`` sums their outputs weighted by the renormalised top-k probabilities. The block
returns one ``[batch, seq, d_model]`` tensor, so ``blocks.{l}.hook_mlp_out`` is the whole MoE
write (all chosen experts, weighted), exactly as for a dense MLP. The router logits are the first
element of the tuple that ``mlp.gate`` returns (``(router_logits, top_k_weights, top_k_index)``,
flattened to ``[batch * seq, num_experts]``); lvlm_probe offers no hook name for them.

Routing is per token (the router reads only its own position's residual stream), so hiding
positions from attention removes them from the MoE layers as well, and direct logit attribution
holds: each expert's output is added to the residual stream.
"""
from __future__ import annotations

from .qwen3_vl import Qwen3VL


class Qwen3VLMoe(Qwen3VL):
    name = "qwen3_vl_moe"
    hf_classes = ("Qwen3VLMoeForConditionalGeneration",)
    model_types = ("qwen3_vl_moe",)
    # Module paths, image_layouts and image_injection_layers (DeepStack): Qwen3-VL's.
