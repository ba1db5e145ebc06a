"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's token layout and module paths,
with a windowed-attention vision tower (RMSNorm, SwiGLU) whose merger is ``model.visual.merger``.

The windowed attention reorders patches inside the vision tower only: the features reach the LM in
row-major order, so the sequence grids are Qwen2-VL's. But the reordering is undone *after* the
merger module (``merged[argsort(window_index)]`` in ``Qwen2_5_VisionTransformerPretrainedModel``):
outputs of ``model.visual.blocks[i]`` and of ``model.visual.merger`` are in window order (windows
row-major, row-major merged cells inside each window, ``merge**2`` patches per cell), not in the
order of the image's grid."""
from __future__ import annotations

from .qwen2_vl import Qwen2VL


class Qwen2_5_VL(Qwen2VL):
    name = "qwen2_5_vl"
    hf_classes = ("Qwen2_5_VLForConditionalGeneration",)
    model_types = ("qwen2_5_vl",)
