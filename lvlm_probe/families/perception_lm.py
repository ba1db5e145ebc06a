"""Perception LM (``PerceptionLMForConditionalGeneration``): a timm Perception Encoder behind
``TimmWrapperModel``, a two-layer MLP projector followed by 2x2 average pooling, a Llama LM, and
dynamic tiles plus a thumbnail.

The image processor (``thumb+tile``) resizes each image to one tile (the thumbnail) and, with
``max_num_tiles > 1``, stretches it to the ``cols x rows`` canvas of tiles that
``_fit_image_to_canvas`` picks (else ``_find_closest_aspect_ratio``) and cuts that canvas row by
row; ``pixel_values[i]`` is ``[1 + rows * cols, 3, tile, tile]``, the thumbnail first. The
processor reports only the tile count (that shape), not the arrangement, so the layout recomputes
it from the image's size with the image processor's own methods.

Every tile goes through the vision tower alone; the class token is dropped, the projector maps each
patch and pools ``pooling x pooling`` blocks (``adaptive_avg_pool2d`` on the row-major patch map),
so each tile is a ``side x side`` row-major grid with ``side = tile / patch_size / pooling``. The
text holds one run of ``<|image|>`` placeholders per image, ``side^2`` per tile in ``pixel_values``
order, with no separators. An image is a ``thumbnail`` grid and a ``tiles`` grid (the tiles
stitched back into the ``rows * side x cols * side`` map of the whole image; the heatmap grid).
"""
from __future__ import annotations

from einops import rearrange
from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageGrid, ImageLayout, grid_from_run
from .base import Family, split_counts

THUMBNAIL = "thumbnail"
TILES = "tiles"


class PerceptionLM(Family):
    name = "perception_lm"
    hf_classes = ("PerceptionLMForConditionalGeneration",)
    model_types = ("perception_lm",)
    lm_layers = "model.language_model.layers"
    # TimmWrapperModel holds the timm model; a ViT's blocks are its transformer layers.
    vision_layers = "model.vision_tower.timm_model.blocks"
    projector = ("model.multi_modal_projector",)
    layout_kind = "tiles"  # dynamic tiles and a thumbnail

    def n_vision_layers(self, config) -> int:
        """A timm config has no ``num_hidden_layers``: the depth is a model argument."""
        return int(self.vision_config(config).model_args["depth"])

    # --- geometry ------------------------------------------------------------------------------
    def tile_side(self, processor, tile: int) -> int:
        """Tokens per side of one tile of ``tile`` pixels, as the processor counts them."""
        return tile // processor.patch_size // processor.pooling_ratio

    def arrangement(self, size: tuple[int, int], processor) -> tuple[int, int]:
        """``(rows, cols)`` of the tiles the image processor cuts an image of ``size = (height,
        width)`` into, by the same calls as its ``resize``."""
        ip = processor.image_processor
        height, width = int(size[0]), int(size[1])
        if ip.max_num_tiles <= 1:
            return 1, 1
        cols_rows = ip._fit_image_to_canvas(img_width=width, img_height=height, tile_size=ip.tile_size)
        if cols_rows is None:
            cols_rows = ip._find_closest_aspect_ratio(img_width=width, img_height=height, tile_size=ip.tile_size)
        return int(cols_rows[1]), int(cols_rows[0])

    # --- layout --------------------------------------------------------------------------------
    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """The ``thumbnail`` and stitched ``tiles`` grids of each image (one ``patches`` grid for an
        image processed as a single tile).

        Raises:
            LayoutError: if the processor and the model pool differently, an image's size is not
                given where its tiles need it, the tile count differs from the arrangement, or the
                placeholders do not add up to the tiles' tokens.
        """
        if not image_ids:
            return []
        if int(config.projector_pooling_ratio) != int(processor.pooling_ratio):
            raise LayoutError(
                f"{self.name}: the processor counts tokens pooled {processor.pooling_ratio}x"
                f"{processor.pooling_ratio} but the model pools {config.projector_pooling_ratio}x"
                f"{config.projector_pooling_ratio}"
            )
        pixels = inputs["pixel_values"]
        tile = int(pixels.shape[-1])
        side = self.tile_side(processor, tile)
        views = [int(pixels[i].shape[0]) for i in image_ids]
        runs = split_counts(placeholders, [n * side * side for n in views])
        return [self._image(k, run, n, side, sizes, processor) for k, (run, n) in enumerate(zip(runs, views))]

    def _image(
        self, index: int, run: Tensor, views: int, side: int, sizes: tuple[tuple[int, int], ...], processor,
    ) -> ImageLayout:
        if views == 1:  # "vanilla" input: the image resized to one tile
            return ImageLayout(index=index, grids=(grid_from_run(run, side, side),))
        if index >= len(sizes):
            raise LayoutError(
                f"{self.name}: image {index} is cut into {views - 1} tiles but its size was not given "
                f"(sizes={sizes!r}); the tile arrangement depends on it"
            )
        rows, cols = self.arrangement(sizes[index], processor)
        if rows * cols + 1 != views:
            raise LayoutError(
                f"{self.name}: image {index} of size {tuple(sizes[index])} has {views} views in "
                f"pixel_values (thumbnail included) but the image processor arranges it as "
                f"{rows}x{cols} tiles plus a thumbnail"
            )
        thumbnail = grid_from_run(run[: side * side], side, side, name=THUMBNAIL)
        # tiles row by row, each a side x side row-major block: stitch them into the image's map
        stitched = rearrange(run[side * side:], "(r c a b) -> (r a) (c b)", r=rows, c=cols, a=side, b=side)
        tiles = ImageGrid(name=TILES, positions=stitched.contiguous())
        return ImageLayout(index=index, grids=(thumbnail, tiles), main=TILES)
