"""PaliGemma (``PaliGemmaForConditionalGeneration``): SigLIP vision tower, linear projector, Gemma LM.

There is no chat template. The processor takes ``<image>`` tokens followed by the bare prompt,
expands each ``<image>`` into ``image_seq_length`` placeholders, inserts BOS after the last one and
appends a newline: ``<image> x N <bos> prompt \\n``. Each image is one fixed square grid of
(image_size / patch_size)^2 tokens, so the base class's layout applies.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Family


class PaliGemma(Family):
    name = "paligemma"
    bidirectional_attention = True  # the prefix (image and prompt) attends both ways
    hf_classes = ("PaliGemmaForConditionalGeneration",)
    model_types = ("paligemma",)
    lm_layers = "model.language_model.layers"
    lm_embed = "model.language_model.embed_tokens"
    lm_norm = "model.language_model.norm"
    vision_layers = "model.vision_tower.encoder.layers"
    projector = ("model.multi_modal_projector",)

    # PaliGemmaProcessor.validate_inputs raises without images; several images per prompt are
    # accepted (each "<image>" is expanded and the model fills them in order).
    requires_image = True
    multi_image = True

    def final_logit_softcap(self, config) -> float | None:
        """PaliGemma's forward soft-caps the logits with its text config's
        ``final_logit_softcapping`` (None for Gemma 1 language models)."""
        return getattr(self.text_config(config), "final_logit_softcapping", None)

    def continued_input(self, key: str, value: Tensor, added: int) -> Tensor:
        """The continuation is the suffix (``token_type_ids`` 1): it attends causally, the prefix
        both ways, as PaliGemma's ``generate`` marks its new tokens."""
        if key == "token_type_ids":
            return torch.cat([value, value.new_ones((len(value), added))], dim=1)
        return super().continued_input(key, value, added)

    def format_prompt(self, processor, prompt: str, n_images: int) -> str:
        """``<image>`` once per image, then the bare prompt.

        Writing the image tokens ourselves keeps the processor off its warning path (which infers
        them); the processor then adds BOS after the last image token and the trailing newline.
        """
        return processor.image_token * n_images + prompt
