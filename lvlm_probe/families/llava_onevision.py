"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP vision tower, MLP
projector, Qwen2 LM.

Images are packed as in LLaVA-NeXT (base grid, unpadded tiles grid, one newline per tile row) with
two differences in the model's ``pack_image_features`` and ``get_image_features``:

* "anyres_max_N": when the unpadded tile map holds more than 1.1^2 * N tiles' worth of features, it
  is bilinearly downscaled to ``int(rows // ratio) x int(cols // ratio)`` before the newlines are
  added. The grid then has fewer cells, each still covering its share of the image.
* multi-image prompts: the image processor counts images per prompt (``batch_num_images``) when it
  receives one list of images per prompt; an image that shares its prompt with others is not tiled
  and becomes its base grid followed by a single newline, as the checkpoints were trained.
"""
from __future__ import annotations

import math
import re
from typing import Any

from ..errors import LayoutError
from .llava_next import LlavaNext


class LlavaOnevision(LlavaNext):
    name = "llava_onevision"
    hf_classes = ("LlavaOnevisionForConditionalGeneration",)
    model_types = ("llava_onevision",)
    lm_layers = "model.language_model.layers"
    vision_layers = "model.vision_tower.encoder.layers"
    projector = ("model.multi_modal_projector",)

    def _modeling(self):
        from transformers.models.llava_onevision import modeling_llava_onevision

        return modeling_llava_onevision

    def processor_images(self, images: list[list[Any]]) -> Any:
        """One list of images per prompt (empty lists included: the image processor drops them), so
        it can tell a multi-image prompt from a batch of single-image prompts.

        ``nested_images`` stays False: it would forbid batching prompts with and without images,
        which this processor handles.
        """
        return images if any(images) else None

    def tiled(self, inputs, image_ids: list[int]) -> list[bool]:
        """An image is tiled only when it is its prompt's sole image (the model's ``need_patching``);
        without ``batch_num_images`` every image counts as a single-image prompt."""
        counts = inputs.get("batch_num_images")
        if counts is None:
            return [True] * len(image_ids)
        need = [int(n) == 1 for n in counts for _ in range(int(n))]
        if max(image_ids) >= len(need):
            raise LayoutError(
                f"{self.name}: batch_num_images {[int(n) for n in counts]} accounts for {len(need)} images, "
                f"but the batch holds image index {max(image_ids)}"
            )
        return [need[i] for i in image_ids]

    def tiles_shape(self, size: list[int], config) -> tuple[int, int]:
        """The unpadded tile map's shape, after the "anyres_max_N" downscaling when it applies."""
        rows, cols = super().tiles_shape(size, config)
        aspect = getattr(config, "vision_aspect_ratio", "anyres_max_9")
        match = re.fullmatch(r"anyres_max_(\d+)", str(aspect))
        if match is None:
            raise LayoutError(
                f"{self.name}: vision_aspect_ratio {aspect!r} is not of the form 'anyres_max_<N>', "
                "the only form the model's pack_image_features handles"
            )
        side = self.tile_side(config)
        ratio = math.sqrt(rows * cols / (int(match.group(1)) * side**2))
        if ratio > 1.1:  # same threshold and truncation as the model's interpolate call
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols
