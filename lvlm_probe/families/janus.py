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
from ..layout import ImageLayout
from .deepseek_vl import DeepseekVL


class Janus(DeepseekVL):
    """DeepSeek-VL's image processing, tower and grids (Janus is its successor), with each image's
    run framed by ``<begin_of_image>`` / ``<end_of_image>``."""

    name = "janus"
    hf_classes = ("JanusForConditionalGeneration",)
    model_types = ("janus",)
    # module paths, grid_side and padded_box: DeepSeek-VL's

    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """DeepSeek-VL's ``p x p`` ``patches`` grid per image, each checked to sit between its markers.

        Raises:
            LayoutError: as DeepSeek-VL's, or if an image's placeholders are not one run between
                ``<begin_of_image>`` and ``<end_of_image>``.
        """
        layouts = super().image_layouts(inputs, example, image_ids, placeholders, config, processor,
                                        sizes=sizes)
        ids = inputs["input_ids"][example]
        tokenizer = getattr(processor, "tokenizer", processor)
        boi, eoi = (tokenizer.convert_tokens_to_ids(t) for t in (processor.image_start_token,
                                                                   processor.image_end_token))
        for layout in layouts:
            first, last = int(layout.positions[0]), int(layout.positions[-1])
            if not (first > 0 and last + 1 < ids.numel() and ids[first - 1] == boi and ids[last + 1] == eoi):
                raise LayoutError(
                    f"{self.name} example {example}: the placeholders of image {layout.index} are not one "
                    f"run between {processor.image_start_token} and {processor.image_end_token}"
                )
        return layouts
