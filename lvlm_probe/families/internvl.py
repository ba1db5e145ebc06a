"""InternVL (``InternVLForConditionalGeneration``): InternViT vision tower, pixel-shuffle MLP
projector, Qwen2 (or Llama) LM, dynamic tiles plus a thumbnail.

The image processor (``GotOcr2ImageProcessor`` with ``crop_to_patches``) picks the ``cols x rows``
arrangement of ``min_patches..max_patches`` tiles whose aspect ratio is closest to the image's
(``get_optimal_tiled_canvas``), stretches the image to exactly ``cols x rows`` tiles, cuts them row
by row and, when there is more than one tile, appends a thumbnail (the whole image resized to one
tile). Every tile goes through the vision tower on its own; ``get_image_features`` reshapes its
patches to a ``[patches, patches]`` map and ``pixel_shuffle`` merges ``2 x 2`` blocks while keeping
the row-major order of the blocks (its views and permutes never swap the block-row and
block-column axes), so each tile, and the thumbnail, is a ``side x side`` grid of tokens with
``side = patches * downsample_ratio``.

In the text each image is ``<img>`` + ``image_seq_length`` placeholder tokens per tile (tiles in
order, the thumbnail last) + ``</img>``. The markers are not placeholders: they stay in the
template group.

The processor pops ``num_patches`` from its output and returns no image sizes, so the layout
reads each image's tile count from the run of placeholders between its ``<img>`` and ``</img>``
in ``input_ids`` and takes the tile *arrangement* from the processor's own
``get_optimal_tiled_canvas`` on the image's size (which the model hands to
:meth:`InternVL.image_layouts`); the count in the sequence must match it.
"""
from __future__ import annotations

from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageGrid, ImageLayout, grid_from_run
from .base import Family

THUMBNAIL = "thumbnail"


def tile_name(row: int, col: int) -> str:
    """Name of the tile grid at (0-based) ``row``, ``col`` of an image's tile arrangement."""
    return f"tile_{row}_{col}"


class InternVL(Family):
    name = "internvl"
    layout_kind = "tiles"  # dynamic tiles and a thumbnail
    hf_classes = ("InternVLForConditionalGeneration",)
    model_types = ("internvl",)
    lm_layers = "model.language_model.layers"
    vision_layers = "model.vision_tower.encoder.layer"
    projector = ("model.multi_modal_projector",)

    # --- geometry ------------------------------------------------------------------------------
    def tile_side(self, config) -> int:
        """Tokens per side of one tile after the pixel shuffle."""
        vision = self.vision_config(config)
        image = _pair(vision.image_size)[0]
        patch = _pair(vision.patch_size)[0]
        return int((image // patch) * config.downsample_ratio)

    def arrangement(self, size: tuple[int, int], processor) -> tuple[int, int]:
        """``(rows, cols)`` of the tiles the image processor cuts an image of ``size`` into."""
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

        ip = processor.image_processor
        tile = ip.size
        height = tile["height"] if isinstance(tile, dict) else tile.height
        width = tile["width"] if isinstance(tile, dict) else tile.width
        if ip.max_patches <= 1:
            return 1, 1
        cols, rows = get_optimal_tiled_canvas(
            (int(size[0]), int(size[1])), (height, width), ip.min_patches, ip.max_patches
        )
        return rows, cols

    # --- layout --------------------------------------------------------------------------------
    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """One layout per image: a grid per tile (``tile_r_c``, with its region as ``box``) and the
        ``thumbnail`` (the heatmap grid); an image cut into a single tile is its ``thumbnail``.

        Raises:
            LayoutError: if the placeholders are not one ``<img>``...``</img>`` run per image, a run
                is not whole tiles, or the tile count differs from the processor's arrangement.
        """
        if not image_ids:
            if placeholders.numel():
                raise LayoutError(f"{placeholders.numel()} image placeholder tokens but no image")
            return []
        ids = inputs["input_ids"][example]
        runs = _runs(placeholders)
        if len(runs) != len(image_ids):
            raise LayoutError(
                f"{self.name}: the sequence holds {len(runs)} runs of image tokens but "
                f"{len(image_ids)} images were given"
            )
        tokenizer = getattr(processor, "tokenizer", processor)
        start_id = getattr(processor, "start_image_token_id", None)
        end_id = getattr(processor, "end_image_token_id", None)
        side = self.tile_side(config)
        per_tile = side * side
        layouts = []
        for k, run in enumerate(runs):
            first, last = int(run[0]), int(run[-1])
            if start_id is not None and (first == 0 or int(ids[first - 1]) != start_id):
                before = tokenizer.convert_ids_to_tokens(int(ids[first - 1])) if first else None
                raise LayoutError(f"{self.name}: image {k}'s tokens follow {before!r}, not <img>")
            if end_id is not None and (last + 1 >= ids.numel() or int(ids[last + 1]) != end_id):
                raise LayoutError(f"{self.name}: image {k}'s tokens are not followed by </img>")
            if run.numel() % per_tile:
                raise LayoutError(
                    f"{self.name}: image {k} has {run.numel()} placeholder tokens, not whole tiles "
                    f"of {side}x{side}"
                )
            n_tiles = run.numel() // per_tile
            if n_tiles == 1:
                layouts.append(ImageLayout(index=k, grids=(grid_from_run(run, side, side, name=THUMBNAIL),),
                                           main=THUMBNAIL))
                continue
            if k >= len(sizes):
                raise LayoutError(
                    f"{self.name}: image {k} is cut into {n_tiles - 1} tiles but its size was not "
                    f"given (sizes={sizes!r}); the tile arrangement depends on it"
                )
            size = sizes[k]
            rows, cols = self.arrangement(size, processor)
            if rows * cols + 1 != n_tiles:
                raise LayoutError(
                    f"{self.name}: image {k} of size {size} has {n_tiles} tiles in the sequence "
                    f"(thumbnail included) but the image processor arranges it as {rows}x{cols} "
                    "tiles plus a thumbnail"
                )
            layouts.append(_tiled(k, run, side, rows, cols))
        return layouts


def _tiled(index: int, run: Tensor, side: int, rows: int, cols: int) -> ImageLayout:
    """Tiles row by row, each covering its share of the (stretched) image, then the thumbnail."""
    chunks = run.split(side * side)
    grids: list[ImageGrid] = []
    for t, chunk in enumerate(chunks[:-1]):
        r, c = divmod(t, cols)
        box = (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)
        grids.append(grid_from_run(chunk, side, side, name=tile_name(r, c), box=box))
    grids.append(grid_from_run(chunks[-1], side, side, name=THUMBNAIL))
    return ImageLayout(index=index, grids=tuple(grids), main=THUMBNAIL)


def _runs(positions: Tensor) -> list[Tensor]:
    """Split sorted positions into runs of consecutive positions."""
    if positions.numel() == 0:
        return []
    breaks = ((positions.diff() != 1).nonzero().flatten() + 1).tolist()
    bounds = [0, *breaks, positions.numel()]
    return [positions[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)

