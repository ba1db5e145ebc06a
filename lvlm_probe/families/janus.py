"""Janus / Janus-Pro (``JanusForConditionalGeneration``), for image understanding: SigLIP-like vision
tower, MLP aligner, Llama LM.

Janus also generates images through a VQ-VAE (``model.vqmodel``) and its own embeddings, aligner and
head (``model.generation_*``); none of them runs when the model reads an image and writes text, so
the adapter describes the understanding path only.

The image processor scales each image so its longest edge is the tower's input size (at least
``min_size`` on the other edge) and pads it to a square, centred, in the mean colour. The vision
tower reads the square as a ``p x p`` patch grid (``p = image_size // patch_size``, no class token)
and the aligner maps each patch state to one token. The processor replaces each
``<image_placeholder>`` of the template by ``<begin_of_image>``, ``num_image_tokens`` placeholders
and ``<end_of_image>``; the two markers are template tokens.

Layout: one ``patches`` grid ``[p, p]`` per image, row-major, its box the whole padded square in
fractions of the image (so it extends past the image along the shorter edge).
"""
from __future__ import annotations

from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageLayout, grid_from_run
from .base import Family


class Janus(Family):
    name = "janus"
    hf_classes = ("JanusForConditionalGeneration",)
    model_types = ("janus",)
    lm_layers = "model.language_model.layers"
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
                image's placeholders are not one consecutive run between ``<begin_of_image>`` and
                ``<end_of_image>``.
        """
        side = self.grid_side(config)
        n = side * side
        if int(processor.num_image_tokens) != n:
            raise LayoutError(
                f"{self.name}: the processor writes {processor.num_image_tokens} placeholders per image "
                f"but the vision tower gives {side}x{side} = {n} patch states; set num_image_tokens={n}"
            )
        if placeholders.numel() != n * len(image_ids):
            raise LayoutError(
                f"{self.name} example {example}: expected {n * len(image_ids)} image placeholders "
                f"({len(image_ids)} images x {side}x{side} patches), but the sequence holds "
                f"{placeholders.numel()}"
            )
        ids = inputs["input_ids"][example]
        tokenizer = getattr(processor, "tokenizer", processor)
        boi, eoi = (tokenizer.convert_tokens_to_ids(t) for t in (processor.image_start_token,
                                                                   processor.image_end_token))
        layouts = []
        for k, run in enumerate(placeholders.split(n) if image_ids else []):
            first, last = int(run[0]), int(run[-1])
            framed = first > 0 and last + 1 < ids.numel() and ids[first - 1] == boi and ids[last + 1] == eoi
            if not bool((run.diff() == 1).all()) or not framed:
                raise LayoutError(
                    f"{self.name} example {example}: the placeholders of image {k} are not one run "
                    f"between {processor.image_start_token} and {processor.image_end_token}"
                )
            box = self.padded_box(sizes[k], processor, config) if k < len(sizes) else (0.0, 0.0, 1.0, 1.0)
            layouts.append(ImageLayout(index=k, grids=(grid_from_run(run, side, side, box=box),)))
        return layouts

    def padded_box(self, size: tuple[int, int], processor, config) -> tuple[float, float, float, float]:
        """The padded square as ``(x0, y0, x1, y1)`` in fractions of the image of ``(height, width)``:
        the processor's resize (longest edge to the square's side, rounded, at least ``min_size``)
        and centring (``(side - edge) // 2`` padding before the image)."""
        image_processor = processor.image_processor
        square = int(self.vision_config(config).image_size)
        min_size = int(getattr(image_processor, "min_size", 0) or 0)
        height, width = size
        scale = square / max(height, width)
        h, w = max(round(height * scale), min_size), max(round(width * scale), min_size)
        top, left = (square - h) // 2, (square - w) // 2
        return (-left / w, -top / h, (square - left) / w, (square - top) / h)
