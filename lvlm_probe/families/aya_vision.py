"""Aya Vision (``AyaVisionForConditionalGeneration``): SigLIP vision tower, a projector that
pixel-shuffles each ``2 x 2`` block of patch features into one token before a LayerNorm and a SwiGLU
MLP, and a Cohere2 LM (attention and MLP in parallel on one norm's output, a final logit scale).

The image processor is InternVL's tiler (``GotOcr2ImageProcessor`` with ``crop_to_patches``): the
``cols x rows`` arrangement of ``min_patches..max_patches`` tiles whose aspect ratio is closest to
the image's (``get_optimal_tiled_canvas``), the image stretched to exactly those tiles and cut row by
row, then, when there is more than one tile, a thumbnail (the whole image resized to one tile).
Each tile goes through the tower on its own, and ``pixel_shuffle`` keeps the row-major order of
the ``2 x 2`` blocks, so each tile, and the thumbnail, is a ``side x side`` grid of tokens with
``side = image_size / patch_size / downsample_factor``.

In the text, the processor expands each ``<image>`` into ``<|START_OF_IMG|>``, then for each tile
``i = 1..`` the text ``TILE_i`` and the tile's ``side**2`` ``<|IMG_PATCH|>`` placeholders, then
``TILE_GLOBAL`` and the thumbnail's placeholders, then ``<|END_OF_IMG|>``. An image cut into one
tile is only ``TILE_GLOBAL`` and its placeholders. So each tile is its own run of placeholders, and
the markers and tile labels between them (and the unused ``<|IMG_LINE_BREAK|>``) are template
positions, not separators.

The processor returns neither the tile counts nor the image sizes, so the layout reads each
image's tile count from its runs between ``<|START_OF_IMG|>`` and ``<|END_OF_IMG|>`` and the
arrangement from ``get_optimal_tiled_canvas`` on the image's size (which the model hands to
:meth:`AyaVision.image_layouts`); the two must agree.
"""
from __future__ import annotations

from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageGrid, ImageLayout, grid_from_run
from .internvl import THUMBNAIL, InternVL, tile_name


class AyaVision(InternVL):
    name = "aya_vision"
    hf_classes = ("AyaVisionForConditionalGeneration",)
    model_types = ("aya_vision",)
    lm_layers = "model.language_model.layers"
    vision_layers = "model.vision_tower.encoder.layers"
    projector = ("model.multi_modal_projector",)
    layout_kind = "tiles"
    # Cohere's layer: attention and MLP both read input_layernorm's output and are added together
    lm_resid_mid = None

    def final_norm_centres(self, norm) -> bool:
        """Cohere's LayerNorm subtracts the mean (it has no bias), like ``nn.LayerNorm``."""
        return True

    def final_logit_scale(self, config) -> float | None:
        """The forward multiplies the logits by the text config's ``logit_scale``."""
        return float(self.text_config(config).logit_scale)

    def tile_side(self, config) -> int:
        """Tokens per side of one tile after the pixel shuffle."""
        vision = self.vision_config(config)
        return vision.image_size // vision.patch_size // config.downsample_factor

    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """One layout per image: a grid per tile (``tile_r_c``, with its region as ``box``) and the
        ``thumbnail`` (the heatmap grid); an image cut into a single tile is its ``thumbnail``.

        Raises:
            LayoutError: if the images' ``<|START_OF_IMG|>``...``<|END_OF_IMG|>`` spans do not
                match the images given, a tile's run is not ``side x side``, placeholders lie
                outside every span, or the tile count differs from the processor's arrangement.
        """
        if not image_ids:
            if placeholders.numel():
                raise LayoutError(f"{placeholders.numel()} image placeholder tokens but no image")
            return []
        ids = inputs["input_ids"][example]
        start_id, end_id = processor.tokenizer.convert_tokens_to_ids(
            [processor.start_of_img_token, processor.end_of_img_token])
        valid = ids.new_ones(ids.shape, dtype=bool)
        if inputs.get("attention_mask") is not None:
            valid = inputs["attention_mask"][example].bool()
        starts = ((ids == start_id) & valid).nonzero().flatten()
        ends = ((ids == end_id) & valid).nonzero().flatten()
        if len(starts) != len(image_ids) or len(ends) != len(image_ids) or (ends < starts).any():
            raise LayoutError(
                f"{self.name}: example {example} has {len(image_ids)} images but "
                f"{len(starts)} {processor.start_of_img_token} and {len(ends)} "
                f"{processor.end_of_img_token} markers"
            )
        side = self.tile_side(config)
        spans = [placeholders[(placeholders > s) & (placeholders < e)] for s, e in zip(starts, ends)]
        if sum(span.numel() for span in spans) != placeholders.numel():
            raise LayoutError(f"{self.name}: example {example} has image placeholders outside every "
                              f"{processor.start_of_img_token}...{processor.end_of_img_token} span")
        layouts = []
        for k, span in enumerate(spans):
            tiles = _runs(span)
            if not tiles or any(run.numel() != side * side for run in tiles):
                raise LayoutError(
                    f"{self.name}: image {k} has runs of {[run.numel() for run in tiles]} placeholder "
                    f"tokens; every tile needs {side}x{side}"
                )
            if len(tiles) == 1:
                thumbnail = grid_from_run(tiles[0], side, side, name=THUMBNAIL)
                layouts.append(ImageLayout(index=k, grids=(thumbnail,), main=THUMBNAIL))
                continue
            if k >= len(sizes):
                raise LayoutError(
                    f"{self.name}: image {k} is cut into {len(tiles) - 1} tiles but its size was "
                    f"not given (sizes={sizes!r}); the tile arrangement depends on it"
                )
            rows, cols = self.arrangement(sizes[k], processor)
            if rows * cols + 1 != len(tiles):
                raise LayoutError(
                    f"{self.name}: image {k} of size {sizes[k]} has {len(tiles)} tiles in the "
                    f"sequence (thumbnail included) but the image processor arranges it as "
                    f"{rows}x{cols} tiles plus a thumbnail"
                )
            grids: list[ImageGrid] = []
            for t, run in enumerate(tiles[:-1]):
                r, c = divmod(t, cols)
                box = (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)
                grids.append(grid_from_run(run, side, side, name=tile_name(r, c), box=box))
            grids.append(grid_from_run(tiles[-1], side, side, name=THUMBNAIL))
            layouts.append(ImageLayout(index=k, grids=tuple(grids), main=THUMBNAIL))
        return layouts


def _runs(positions: Tensor) -> list[Tensor]:
    """Split sorted positions into runs of consecutive positions."""
    if positions.numel() == 0:
        return []
    breaks = ((positions.diff() != 1).nonzero().flatten() + 1).tolist()
    return list(positions.tensor_split(breaks))
