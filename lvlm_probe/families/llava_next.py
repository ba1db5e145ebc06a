"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): CLIP vision tower, MLP projector, Llama or
Mistral LM, "anyres" images.

The image processor cuts each image into a base image (the whole image resized to one tile) plus
the tiles of the best-fitting resolution in ``image_grid_pinpoints``. The model's
``pack_image_features`` lays out each image's features as

* the base image's ``patches x patches`` features, row-major;
* the tiles' features stitched into one ``(tiles_h * patches) x (tiles_w * patches)`` map, cropped
  by ``unpad_image`` to the image's aspect ratio (the padding the processor added is dropped), then
  read row by row with one ``image_newline`` token after each row.

So an image is a ``base`` grid, a ``tiles`` grid (the heatmap grid) and one ``newline`` separator
per tile row. A very thin image (e.g. 3 x 200 pixels) can crop to tile rows of no columns (or no
rows): the model then packs only newline tokens after the base features, and the layout has the
base grid alone (no grid has a zero side) with those newlines as separators.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageLayout, grid_from_run
from .base import Family, split_counts


class LlavaNext(Family):
    name = "llava_next"
    layout_kind = "tiles"  # a base grid and the anyres tiles
    hf_classes = ("LlavaNextForConditionalGeneration",)
    model_types = ("llava_next",)
    lm_layers = "model.language_model.layers"
    vision_layers = "model.vision_tower.encoder.layers"
    # model.image_newline is a parameter (the row-end embedding), not a module.
    projector = ("model.multi_modal_projector",)

    # --- anyres geometry, as the model computes it -----------------------------------------------
    def _modeling(self):
        """The transformers module whose geometry helpers the model itself calls."""
        from transformers.models.llava_next import modeling_llava_next

        return modeling_llava_next

    def tile_side(self, config) -> int:
        """Patches per side of one tile (and of the base image)."""
        vision = self.vision_config(config)
        return vision.image_size // vision.patch_size

    def tiles_shape(self, size: list[int], config) -> tuple[int, int]:
        """``(rows, cols)`` of the packed tile features of an image of ``size = [height, width]``.

        Calls the same ``get_anyres_image_grid_shape`` and ``unpad_image`` as the model's
        ``pack_image_features`` (on an empty tensor: only the shape matters), so the crop's integer
        rounding is exactly the model's.
        """
        mod = self._modeling()
        side = self.tile_side(config)
        image_size = self.vision_config(config).image_size
        n_h, n_w = mod.get_anyres_image_grid_shape(size, config.image_grid_pinpoints, image_size)
        cropped = mod.unpad_image(torch.empty(0, n_h * side, n_w * side), list(size))
        return int(cropped.shape[1]), int(cropped.shape[2])

    def tiled(self, inputs, image_ids: list[int]) -> list[bool]:
        """Whether each image was cut into tiles (LLaVA-NeXT always tiles)."""
        return [True] * len(image_ids)

    # --- layout ----------------------------------------------------------------------------------
    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """Base grid, tiles grid and row-end newlines of each image, in ``pack_image_features`` order.

        Raises:
            LayoutError: if the processor and the config disagree on the pinpoints, or the
                placeholder count is not what the model will pack.
        """
        if not image_ids:
            return []
        self._check_pinpoints(config, processor)
        sizes = torch.as_tensor(inputs["image_sizes"])[image_ids].tolist()
        side = self.tile_side(config)
        plans = [self.tiles_shape(size, config) if tiled else None
                 for size, tiled in zip(sizes, self.tiled(inputs, image_ids))]
        # A tiled image: base + rows * (cols + 1); an untiled one: base + one newline.
        counts = [side * side + (rc[0] * (rc[1] + 1) if rc else 1) for rc in plans]
        try:
            runs = split_counts(placeholders, counts)
        except LayoutError as err:
            raise LayoutError(
                f"{self.name}: {err}; images of sizes {sizes} with pinpoints "
                f"{config.image_grid_pinpoints} and {side}x{side} patches per tile (does the "
                "processor's vision_feature_select_strategy / patch size match the config's?)"
            ) from None
        return [self._image(k, run, side, rc) for k, (run, rc) in enumerate(zip(runs, plans))]

    def _image(self, index: int, run: Tensor, side: int, tiles: tuple[int, int] | None) -> ImageLayout:
        base = grid_from_run(run[: side * side], side, side, name="base")
        rest = run[side * side:]
        if tiles is None:  # only the base image, followed by a single newline
            return ImageLayout(index=index, grids=(base,), separators={"newline": rest}, main="base")
        rows, cols = tiles
        if rows == 0 or cols == 0:  # cropped away: only the rows' newlines follow the base features
            return ImageLayout(index=index, grids=(base,), separators={"newline": rest}, main="base")
        # Each tile row is followed by its newline: [rows, cols + 1] with the newline last.
        table = rearrange(rest, "(r c) -> r c", r=rows, c=cols + 1)
        grid = grid_from_run(table[:, :cols].reshape(-1), rows, cols, name="tiles")
        return ImageLayout(index=index, grids=(base, grid), separators={"newline": table[:, cols].clone()},
                           main="tiles")

    def _check_pinpoints(self, config, processor) -> None:
        """The processor cuts tiles with its own pinpoints and the model reassembles them with the
        config's; if they differ the tokens do not correspond to the regions the layout names."""
        image_processor = getattr(processor, "image_processor", None)
        theirs = getattr(image_processor, "image_grid_pinpoints", None)
        if theirs is None:
            return
        ours = [list(map(int, p)) for p in config.image_grid_pinpoints]
        if [list(map(int, p)) for p in theirs] != ours:
            raise LayoutError(
                f"{self.name}: the image processor's image_grid_pinpoints {theirs} differ from the "
                f"model config's {ours}; set the same pinpoints in both"
            )
