"""LLaVA-OneVision-1.5 (``LlavaOnevision15ForConditionalGeneration``): despite the name, Qwen2-VL's
token layout, not LLaVA-OneVision's anyres tiles. A RICE ViT at native resolution (a CLS token
prepended to each image inside the tower and dropped before the merger, 2D rotary positions), a
merger that fuses each 2x2 block of patches into one token, and a Qwen3 LM with plain 1D rotary
positions (no M-RoPE: ``position_ids`` are ``arange`` over the sequence).

The processor (the Qwen2-VL image processor, ``temporal_patch_size`` 1) resizes each image so its
sides are multiples of patch * merge pixels and reports ``image_grid_thw[i] = (1, h, w)`` in
patches; the image's single ``<|image_pad|>`` run between ``<|vision_start|>`` and
``<|vision_end|>`` holds ``h * w / merge**2`` tokens, row-major over the ``(h / merge) x
(w / merge)`` merged grid: the processor emits ``merge**2`` consecutive patches per merged cell,
cells row-major, and the merger fuses each such run. So the layout is Qwen2-VL's, read from the
same ``image_grid_thw`` and ``vision_config.spatial_merge_size``.
"""
from __future__ import annotations

from .qwen2_vl import Qwen2VL


class LlavaOnevision15(Qwen2VL):
    name = "llava_onevision1_5"
    hf_classes = ("LlavaOnevision15ForConditionalGeneration",)
    model_types = ("llava_onevision1_5",)
    # Module paths are Qwen2-VL's: ``model.language_model.layers`` (Qwen3 decoder layers, whose
    # q/k norms sit inside self_attn), ``model.visual.blocks`` and ``model.visual.merger``; the
    # vision config's ``depth`` is aliased as ``num_hidden_layers``.
