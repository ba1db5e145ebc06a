"""Mistral 3 (``Mistral3ForConditionalGeneration``): Pixtral vision tower, patch-merging projector,
Mistral LM (Mistral Small 3.1 / 3.2).

The Pixtral image processor keeps each image's aspect ratio: it scales it to fit ``longest_edge``
and rounds each side up to whole tokens of ``patch_size * spatial_merge_size`` pixels, and reports
the resulting ``(height, width)`` in ``image_sizes``. The vision tower reads the image as a
``height / patch_size x width / patch_size`` patch grid, row-major; the projector's patch merger
(``unfold`` with kernel and stride ``spatial_merge_size``) joins each ``merge x merge`` block into
one token, row-major over the blocks. So an image is one ``rows x cols`` grid with
``rows = height // (patch_size * merge)`` and ``cols = width // (patch_size * merge)``.

In the text, the processor writes each row of ``cols`` ``[IMG]`` placeholders followed by
``[IMG_BREAK]``, the last row by ``[IMG_END]``. Only ``[IMG]`` receives image features; the break
and end tokens keep their text embeddings, so (like Idefics3's crop markers) they are template
positions, and the layout checks that they frame every row where the processor put them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageLayout, grid_from_run
from .base import Family, split_counts


class Mistral3(Family):
    name = "mistral3"
    hf_classes = ("Mistral3ForConditionalGeneration",)
    model_types = ("mistral3",)
    lm_layers = "model.language_model.layers"
    lm_embed = "model.language_model.embed_tokens"
    lm_norm = "model.language_model.norm"
    vision_layers = "model.vision_tower.transformer.layers"
    projector = ("model.multi_modal_projector",)

    default_break_token = "[IMG_BREAK]"
    default_end_token = "[IMG_END]"

    def token_pixels(self, config) -> int:
        """Pixels per side of one image token: the vision patch times the merger's block, as the
        model computes its per-image split (``vision_tower.patch_size * spatial_merge_size``)."""
        return int(self.vision_config(config).patch_size) * int(config.spatial_merge_size)

    def row_end_ids(self, processor) -> tuple[int, int]:
        """Ids of the tokens after each row (``[IMG_BREAK]``) and after the last (``[IMG_END]``)."""
        tokenizer = getattr(processor, "tokenizer", processor)
        ids = []
        for attr, default in (("image_break", self.default_break_token), ("image_end", self.default_end_token)):
            value = getattr(processor, f"{attr}_token_id", None)
            if value is None:
                value = tokenizer.convert_tokens_to_ids(getattr(processor, f"{attr}_token", default))
            ids.append(int(value))
        return ids[0], ids[1]

    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """One ``patches`` grid per image, from its processed size in ``image_sizes``.

        Raises:
            LayoutError: if the processor's token size differs from the model's, the placeholder
                count is not what the model fills for these image sizes, or a row of ``[IMG]``
                tokens is not contiguous and closed by ``[IMG_BREAK]`` (``[IMG_END]`` for the last).
        """
        if not image_ids:
            if placeholders.numel():
                raise LayoutError(f"{placeholders.numel()} image placeholder tokens but no image")
            return []
        self._check_token_size(config, processor)
        step = self.token_pixels(config)
        sizes = torch.as_tensor(inputs["image_sizes"])[image_ids].tolist()
        shapes = [(int(h) // step, int(w) // step) for h, w in sizes]
        try:
            runs = split_counts(placeholders, [r * c for r, c in shapes])
        except LayoutError as err:
            raise LayoutError(
                f"{self.name}: {err}; images of processed sizes {sizes} at {step} px per token"
            ) from None
        ids = inputs["input_ids"][example]
        brk, end = self.row_end_ids(processor)
        layouts = []
        for k, (run, (rows, cols)) in enumerate(zip(runs, shapes)):
            table = run.reshape(rows, cols)
            if rows and cols:
                if not bool((table.diff(dim=1) == 1).all()):
                    raise LayoutError(f"image {k}: a row of its {rows}x{cols} [IMG] tokens is not contiguous")
                after = table[:, -1] + 1
                if int(after[-1]) >= ids.numel():
                    raise LayoutError(f"image {k}: its last row is not closed by an image end token")
                expected = torch.full((rows,), brk, dtype=ids.dtype)
                expected[-1] = end
                if not torch.equal(ids[after].cpu(), expected):
                    raise LayoutError(
                        f"image {k}: the tokens after its {rows} rows of {cols} [IMG] tokens are "
                        f"{ids[after].tolist()}; expected [IMG_BREAK] ({brk}) after each row and "
                        f"[IMG_END] ({end}) after the last"
                    )
            layouts.append(ImageLayout(index=k, grids=(grid_from_run(run, rows, cols),)))
        return layouts

    def _check_token_size(self, config, processor) -> None:
        """The processor sizes images and writes rows with its own patch size and merge; if they
        differ from the model's, the tokens do not correspond to the regions the layout names."""
        patch = getattr(processor, "patch_size", None)
        merge = getattr(processor, "spatial_merge_size", None)
        if patch is None or merge is None:
            return
        if int(patch) * int(merge) != self.token_pixels(config):
            raise LayoutError(
                f"{self.name}: the processor makes image tokens of {patch} px patches merged "
                f"{merge}x{merge}, the model of {self.vision_config(config).patch_size} px patches "
                f"merged {config.spatial_merge_size}x{config.spatial_merge_size}; set the same in both"
            )
