"""ViP-LLaVA (``VipLlavaForConditionalGeneration``): LLaVA-1.5 with image features taken from several
CLIP layers (``config.vision_feature_layers``, indices into the tower's hidden states, the
embeddings being 0), CLS dropped from each and concatenated along the feature axis, and a
projector that applies a LayerNorm to the concatenation before its two linear layers.

The layout is LLaVA-1.5's: each image is resized and centre-cropped to the tower's square input
and becomes one run of ``(image_size / patch_size)**2`` ``<image>`` tokens, one per patch, in the
tower's row-major patch order (the concatenation is per position, so it keeps the order). So
the module paths and the fixed square grid are those of :class:`~.llava.Llava`.
"""
from __future__ import annotations

from .llava import Llava


class VipLlava(Llava):
    name = "vipllava"
    hf_classes = ("VipLlavaForConditionalGeneration",)
    model_types = ("vipllava",)
