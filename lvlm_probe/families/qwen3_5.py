"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``): Qwen3-VL's vision side without DeepStack (a ViT
at native resolution with learned, resampled and 2D rotary positions, one 2x2 patch merger) and a
hybrid language model: most layers are Gated DeltaNet linear attention, every
``full_attention_interval``-th one (``config.text_config.layer_types``) gated full attention.

Token layout: Qwen2-VL's. ``image_grid_thw[i] = (t, h, w)`` in patches; the image's single run of
``<|image_pad|>`` tokens, between ``<|vision_start|>`` and ``<|vision_end|>``, holds
``t * h * w / merge**2`` tokens, row-major over the merged ``(h / merge) x (w / merge)`` grid (the
processor's patch order, the merger's fusing of ``merge**2`` consecutive patches and the LM's
interleaved M-RoPE positions agree). The chat template opens the assistant's turn in thinking mode
(``<|im_start|>assistant\\n<think>\\n``): those tokens are template positions before the answer.

Linear-attention layers (``unmasked_mixing_layers``): ``linear_attn`` (``Qwen3_5GatedDeltaNet``)
runs a causal depthwise convolution (kernel ``linear_conv_kernel_dim``) over the q/k/v
projections, then a gated delta-rule recurrence whose state carries every earlier position; no
attention mask reaches it (padding only zeroes its inputs). They have no ``self_attn``, no heads to
read patterns from and no q/k/v hooks. Hiding positions there runs ``linear_attn`` on the visible
positions alone (it is causal and reads no position index), which removes them exactly; attention
knockout, which hides keys from some queries only, raises for windows over these layers.

Full-attention layers: ``self_attn`` projects queries together with a per-head output gate
(``q_proj`` gives ``2 * head_dim`` per head), normalises q and k, rotates the first
``partial_rotary_factor`` of each head by M-RoPE and multiplies the attention output by
``sigmoid(gate)`` before ``o_proj``. ``hook_z`` (``o_proj``'s input) is after the gate.

The RMSNorms (the final one included) scale by ``1 + weight``: ``final_norm_weight_offset`` is 1.

``nonlinear_writes``: direct logit attribution splits each head's write as pattern x values
through the out-projection, which leaves out the sigmoid gate of the query, and the linear-attention
layers have no pattern to split.
"""
from __future__ import annotations

from .qwen2_vl import Qwen2VL


class Qwen3_5(Qwen2VL):
    name = "qwen3_5"
    hf_classes = ("Qwen3_5ForConditionalGeneration",)
    model_types = ("qwen3_5",)
    lm_layers = "model.language_model.layers"
    lm_embed = "model.language_model.embed_tokens"
    lm_norm = "model.language_model.norm"
    lm_mixer = "linear_attn"
    lm_q_gate = True  # q_proj gives query and output gate per head: no hook_q
    # The vision config's ``depth`` is aliased as ``num_hidden_layers``: the base count works.
    vision_layers = "model.visual.blocks"
    projector = ("model.visual.merger",)
    # image_layouts: Qwen2-VL's (image_grid_thw, spatial_merge_size, one contiguous run per image).
    nonlinear_writes = (
        "its full-attention output is multiplied by a sigmoid gate of the query before the "
        "out-projection, and its linear-attention (Gated DeltaNet) layers have no attention pattern")

    def final_norm_weight_offset(self, norm) -> float:
        """Qwen3.5's RMSNorm is zero-centred: it scales by ``1 + weight``."""
        return 1.0

    def unmasked_mixing_layers(self, config) -> list[int]:
        """The Gated DeltaNet layers: ``layer_types[i] == "linear_attention"``."""
        return [i for i, kind in enumerate(self.text_config(config).layer_types)
                if kind == "linear_attention"]
