"""FastVLM (``FastVlmForConditionalGeneration``): a timm FastViT (FastViTHD, ``fastvit_mci3``)
behind ``TimmWrapperModel``, a two-layer MLP projector, a Qwen2 LM, and LLaVA's processor.

The tower is a hybrid of convolution (RepMixer) and attention stages that downsample the image by a
total stride (64 in the real checkpoints); its output is the final convolution's feature map
``[channels, H / stride, W / stride]``, which ``get_image_features`` flattens row by row into
features (the "full" strategy: no class token, nothing dropped). The processor resizes and
centre-crops each image to one fixed square and writes ``(H / patch_size) * (W / patch_size)``
``<image>`` placeholders for it, ``patch_size`` being the tower's stride; so each image is one run
of placeholders, one fixed row-major grid, with no separators (the template writes ``<image>\\n``,
the newline is a text token).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageLayout, grid_from_run
from .base import Family, split_evenly


class FastVlm(Family):
    name = "fast_vlm"
    hf_classes = ("FastVlmForConditionalGeneration",)
    model_types = ("fast_vlm",)
    lm_layers = "model.language_model.layers"
    # TimmWrapperModel holds the timm FastViT; its stages (each a downsample and blocks) are the
    # tower's layers: the stage outputs are the tower's successive feature maps.
    vision_layers = "model.vision_tower.timm_model.stages"
    projector = ("model.multi_modal_projector",)

    def n_vision_layers(self, config) -> int:
        """A timm config has no ``num_hidden_layers``: the stages are a model argument, or, where the
        config keeps the architecture's own, the architecture's (built on the meta device)."""
        vision = self.vision_config(config)
        args = dict(vision.model_args or {})
        if "layers" in args:
            return len(args["layers"])
        import timm

        with torch.device("meta"):
            tower = timm.create_model(vision.architecture, pretrained=False, **args)
        return len(tower.stages)

    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """One ``(H / patch_size) x (W / patch_size)`` row-major grid per image, ``H x W`` the
        processed image (``pixel_values``) and ``patch_size`` the processor's count of the tower's
        stride.

        Raises:
            LayoutError: if the placeholders do not split into one such grid per image.
        """
        if not image_ids:
            return split_evenly(placeholders, 0)
        height, width = (int(n) for n in inputs["pixel_values"].shape[-2:])
        rows, cols = height // processor.patch_size, width // processor.patch_size
        runs = split_evenly(placeholders, len(image_ids))
        if runs[0].numel() != rows * cols:
            raise LayoutError(
                f"{self.name}: {runs[0].numel()} placeholders per image but a {height}x{width} image "
                f"at stride {processor.patch_size} is a {rows}x{cols} grid"
            )
        return [ImageLayout(index=k, grids=(grid_from_run(run, rows, cols),)) for k, run in enumerate(runs)]
