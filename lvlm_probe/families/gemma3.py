"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP vision tower, pooled projector, Gemma 3 LM.

The chat template writes one ``<start_of_image>`` (BOI) per image; the processor expands it into
``\\n\\n <BOI> <image_soft_token> x mm_tokens_per_image <EOI> \\n\\n``. The soft tokens are the
placeholders whose embeddings are replaced; the projector average-pools the vision tower's patch grid
into sqrt(mm_tokens_per_image) x sqrt(mm_tokens_per_image) tokens, row-major, so each image is one
square grid. BOI, EOI and the newlines are template.

Pan-and-scan (``do_pan_and_scan=True``, off by default in ``Gemma3Processor``) adds one more soft-token
run per crop, but the processor drops ``num_crops`` from its output, so which runs are crops of which
image (and where each crop lies) cannot be read from the processed inputs: such inputs raise a
:class:`LayoutError` instead of being laid out wrongly.
"""
from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageLayout, grid_from_run
from .base import Family


class Gemma3(Family):
    name = "gemma3"
    bidirectional_attention = True  # the image tokens attend to each other both ways
    hf_classes = ("Gemma3ForConditionalGeneration",)
    model_types = ("gemma3",)
    lm_layers = "model.language_model.layers"
    lm_embed = "model.language_model.embed_tokens"
    lm_norm = "model.language_model.norm"
    # sandwich norms: the attention output is normalised (post_attention_layernorm) before it is
    # added, so the residual stream between attention and MLP enters pre_feedforward_layernorm
    lm_resid_mid = "pre_feedforward_layernorm"
    lm_attn_write = "post_attention_layernorm"
    lm_mlp_write = "post_feedforward_layernorm"
    vision_layers = "model.vision_tower.encoder.layers"
    projector = ("model.multi_modal_projector",)
    nonlinear_writes = "its sandwich norms make each write nonlinear in the heads"

    # Gemma3Processor accepts text-only prompts and several images per prompt. It nests a flat
    # image list as one prompt's images (make_nested_list_of_images), so it needs one list per prompt.
    requires_image = False
    multi_image = True
    nested_images = True

    def image_token_id(self, config, processor) -> int:
        """The soft image token (``config.image_token_index``).

        ``processor.image_token_id`` is the BOI token, which the processor expands and which keeps
        its own embedding, so it must not be used here.
        """
        return int(config.image_token_index)

    def processor_images(self, images: list[list[Any]]) -> Any:
        """One list of images per prompt, or None for text-only batches (the image processor fails
        on a batch of empty lists instead of skipping it)."""
        return images if any(images) else None

    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """One square grid per image from its run of ``mm_tokens_per_image`` soft tokens.

        Raises:
            LayoutError: if the soft tokens do not form exactly one contiguous run of
                ``mm_tokens_per_image`` per image (e.g. pan-and-scan crops were added).
        """
        per_image = int(config.mm_tokens_per_image)
        side = math.isqrt(per_image)
        if side * side != per_image:
            raise LayoutError(f"mm_tokens_per_image={per_image} is not a square number of tokens")
        n_images = len(image_ids)
        if placeholders.numel() != n_images * per_image:
            runs, rest = divmod(placeholders.numel(), per_image)
            raise LayoutError(
                f"example {example} holds {placeholders.numel()} image soft tokens for {n_images} "
                f"image(s); expected {n_images} x mm_tokens_per_image={per_image}"
                + (f" ({runs} runs: pan-and-scan crops? lay out with do_pan_and_scan=False)"
                   if not rest and runs > n_images else "")
            )
        layouts = []
        for k, run in enumerate(placeholders.split(per_image) if n_images else []):
            # A run broken by other tokens would mean the soft tokens are not one image's grid.
            if int(run[-1] - run[0]) != per_image - 1:
                raise LayoutError(
                    f"example {example}, image {k}: its {per_image} soft tokens are not contiguous "
                    f"(positions {run[0].item()}..{run[-1].item()})"
                )
            layouts.append(ImageLayout(index=k, grids=(grid_from_run(run, side, side),)))
        return layouts
