"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP vision tower, MLP projector, Llama LM.

Each image becomes (image_size / patch_size)^2 placeholder tokens (CLS dropped by the "default"
feature-select strategy), one fixed square grid."""
from __future__ import annotations

from .base import Family


class Llava(Family):
    name = "llava"
    hf_classes = ("LlavaForConditionalGeneration",)
    model_types = ("llava",)
    lm_layers = "model.language_model.layers"
    vision_layers = "model.vision_tower.encoder.layers"
    projector = ("model.multi_modal_projector",)
