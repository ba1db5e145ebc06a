"""DeepSeek-VL (``DeepseekVLForConditionalGeneration``): SigLIP vision tower, MLP aligner, Llama LM
(deepseek-vl-1.3b-chat; the 7B chat checkpoints are the separate ``deepseek_vl_hybrid`` type).

The image processor scales each image so its longest edge is the tower's input size (at least
``min_size`` on the other edge) and pads it to a square, centred, in the mean colour. The vision
tower reads the square as a ``p x p`` patch grid (``p = image_size // patch_size``, no class token),
and the aligner maps each patch state to one token: in the text every ``<image_placeholder>`` of the
template becomes ``p * p`` placeholders, and two images in a row are two adjacent runs with nothing
between them.

Layout: one ``patches`` grid ``[p, p]`` per image, row-major, its box the whole padded square in
fractions of the image (so it extends past the image along the shorter edge).
"""
from __future__ import annotations

from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageLayout, grid_from_run
from .base import Family


class DeepseekVL(Family):
    name = "deepseek_vl"
    hf_classes = ("DeepseekVLForConditionalGeneration",)
    model_types = ("deepseek_vl",)
    vision_layers = "model.vision_model.encoder.layers"
    projector = ("model.aligner",)

    def grid_side(self, config) -> int:
        """Patches (and tokens) along each side of the square the vision tower reads."""
        vision = self.vision_config(config)
        return int(vision.image_size) // int(vision.patch_size)

    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """One ``p x p`` ``patches`` grid per image, in order.

        Raises:
            LayoutError: if the processor writes another number of placeholders per image than the
                tower's ``p * p`` patches, the placeholders are not ``p * p`` per image, or an
                image's placeholders are not one consecutive run.
        """
        side = self.grid_side(config)
        n = side * side
        written = getattr(processor, "num_image_tokens", n)
        if written != n:
            raise LayoutError(
                f"{self.name}: the processor writes {written} placeholders per image but the vision "
                f"tower gives {side}x{side} = {n} patch states; set num_image_tokens={n}"
            )
        if placeholders.numel() != n * len(image_ids):
            raise LayoutError(
                f"{self.name} example {example}: expected {n * len(image_ids)} image placeholders "
                f"({len(image_ids)} images x {side}x{side} patches), but the sequence holds "
                f"{placeholders.numel()}"
            )
        layouts = []
        for k, run in enumerate(placeholders.split(n) if image_ids else []):
            if not bool((run.diff() == 1).all()):
                raise LayoutError(f"{self.name} example {example}: the placeholders of image {k} are not consecutive")
            box = self.padded_box(sizes[k], processor, config) if k < len(sizes) else (0.0, 0.0, 1.0, 1.0)
            layouts.append(ImageLayout(index=k, grids=(grid_from_run(run, side, side, box=box),)))
        return layouts

    def padded_box(self, size: tuple[int, int], processor, config) -> tuple[float, float, float, float]:
        """The padded square as ``(x0, y0, x1, y1)`` in fractions of the image of ``(height, width)``:
        the processor's resize (longest edge to the square's side, rounded, at least ``min_size``)
        and centring (``(side - edge) // 2`` padding before the image)."""
        image_processor = getattr(processor, "image_processor", None)
        square = int(self.vision_config(config).image_size)
        min_size = int(getattr(image_processor, "min_size", 0) or 0)
        height, width = size
        scale = square / max(height, width)
        h, w = max(round(height * scale), min_size), max(round(width * scale), min_size)
        top, left = (square - h) // 2, (square - w) // 2
        return (-left / w, -top / h, (square - left) / w, (square - top) / h)
