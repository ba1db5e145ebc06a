"""GLM-4.1V (``Glm4vForConditionalGeneration``): a ViT at native resolution (learned position
embeddings resampled to each image's grid, plus 2D rotary positions), a strided convolution that
fuses each 2x2 block of patches into one token followed by an MLP merger, and a GLM-4 LM with
sandwich norms and multimodal rotary positions (M-RoPE) on part of each head.

Token layout: Qwen2-VL's arithmetic with GLM's tokens. The chat template writes
``<|begin_of_image|><|image|><|end_of_image|>`` per image; the processor expands the ``<|image|>``
into ``t * h * w / merge**2`` copies, where ``image_grid_thw[i] = (t, h, w)`` in patches (each
side resized to a multiple of patch * merge pixels). The run is row-major over the merged
``(h / merge) x (w / merge)`` grid: ``Glm4vImageProcessor.patchify`` orders patches as
``[h/merge, w/merge, merge, merge]``, the tower's ``downsample`` convolution fuses each run of
``merge**2`` consecutive patches into one token, and the LM's M-RoPE (Qwen2-VL's
``get_rope_index``, fed the processor's ``mm_token_type_ids``) gives the tokens (height, width)
positions in the same order. The begin/end tokens are template.

Sandwich norms: each decoder layer normalises the attention's output (``post_self_attn_layernorm``)
and the MLP's output (``post_mlp_layernorm``) before adding them to the residual stream, and its
pre-MLP norm is ``post_attention_layernorm``. So the writes are those norms' outputs, the residual
stream between attention and MLP enters ``post_attention_layernorm``, and a write is not linear in
the heads (as in Gemma 3).

``projector.hook_out`` is the merger's output, the features that replace the placeholder embeddings
(the downsample convolution before it is listed first).
"""
from __future__ import annotations

from .qwen2_vl import Qwen2VL


class Glm4v(Qwen2VL):
    name = "glm4v"
    hf_classes = ("Glm4vForConditionalGeneration",)
    model_types = ("glm4v",)
    lm_layers = "model.language_model.layers"
    lm_embed = "model.language_model.embed_tokens"
    lm_norm = "model.language_model.norm"
    # sandwich norms: the writes are the post-attention and post-MLP norms' outputs; the stream
    # between them enters the pre-MLP norm, which GLM names post_attention_layernorm
    lm_resid_mid = "post_attention_layernorm"
    lm_attn_write = "post_self_attn_layernorm"
    lm_mlp_write = "post_mlp_layernorm"
    # The vision config's ``depth`` is aliased as ``num_hidden_layers``: the base count works.
    vision_layers = "model.visual.blocks"
    projector = ("model.visual.downsample", "model.visual.merger")
    nonlinear_writes = "its sandwich norms make each write nonlinear in the heads"
    # image_layouts: Qwen2-VL's (image_grid_thw, spatial_merge_size, one contiguous run per image).
