"""Command A Vision (``Cohere2VisionForConditionalGeneration``): SigLIP vision tower, pixel-shuffle
SwiGLU projector, Cohere2 LM (parallel attention and MLP, sliding-window and full-attention
layers), dynamic tiles plus a thumbnail.

The image processor (``crop_to_patches``) picks the ``cols x rows`` arrangement of
``min_patches..max_patches`` tiles that needs the least upscaling of the image (else the least
downscaling) (``get_optimal_tiled_canvas``), stretches the image to exactly ``cols x rows`` tiles,
cuts them row by row and, when there is more than one tile, appends a thumbnail (the whole image
resized to one tile). Every tile goes through the vision tower on its own; the projector's
``pixel_shuffle`` merges ``2 x 2`` blocks of patches and keeps their row-major order (its two
transposes cancel), so each tile, and the thumbnail, is a ``side x side`` grid of tokens with
``side = (image_size / patch_size) / downsample_factor`` (the image processor's ``patch_size``).

In the text an image is ``<|START_OF_IMG|>``, then per view (tiles in order, the thumbnail last)
``side * side`` ``<image>`` placeholders followed by one ``<|IMG_LINE_BREAK|>``, then
``<|END_OF_IMG|>``. The markers and line breaks are not placeholders: they are template tokens.

The processor drops ``num_patches`` from its output, so the layout reads each image's view count
from its run of placeholders between the markers and takes the arrangement from the processor's
own ``get_optimal_tiled_canvas`` on the image's size; the count in the sequence must match it.

The checkpoint's ``logit_scale`` is not applied: ``Cohere2VisionForConditionalGeneration`` calls
``lm_head`` on the final norm's output and returns those logits (only the text-only
``Cohere2ForCausalLM`` multiplies by it), so the logits are linear in the final residual stream.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageGrid, ImageLayout, grid_from_run
from .base import Family, as_long

THUMBNAIL = "thumbnail"


def tile_name(row: int, col: int) -> str:
    """Name of the tile grid at (0-based) ``row``, ``col`` of an image's tile arrangement."""
    return f"tile_{row}_{col}"


class Cohere2Vision(Family):
    name = "cohere2_vision"
    hf_classes = ("Cohere2VisionForConditionalGeneration",)
    model_types = ("cohere2_vision",)
    lm_layers = "model.language_model.layers"
    lm_embed = "model.language_model.embed_tokens"
    lm_norm = "model.language_model.norm"
    vision_layers = "model.vision_tower.encoder.layers"
    projector = ("model.multi_modal_projector",)
    layout_kind = "tiles"  # dynamic tiles and a thumbnail
    # Cohere2 layers run attention and MLP side by side on input_layernorm's output and add both
    # to the residual stream: there is no residual stream between them (no hook_resid_mid).
    lm_resid_mid = None

    def final_norm_centres(self, norm) -> bool:
        """Cohere2's LayerNorm subtracts the mean (a LayerNorm without bias, not an ``nn.LayerNorm``)."""
        return True

    def processor_kwargs(self) -> dict[str, Any]:
        # The chat template starts with BOS and the Cohere tokenizer adds another one.
        return {"add_special_tokens": False}

    # --- geometry ------------------------------------------------------------------------------
    def tile_side(self, config) -> int:
        """Tokens per side of one tile after the pixel shuffle."""
        vision = self.vision_config(config)
        return int(vision.image_size // vision.patch_size // config.downsample_factor)

    def arrangement(self, size: tuple[int, int], processor) -> tuple[int, int]:
        """``(rows, cols)`` of the tiles the image processor cuts an image of ``size`` into."""
        from transformers.models.cohere2_vision.image_processing_cohere2_vision import (
            get_optimal_tiled_canvas,
        )

        ip = processor.image_processor
        tile = ip.size
        height = tile["height"] if isinstance(tile, dict) else tile.height
        width = tile["width"] if isinstance(tile, dict) else tile.width
        if not ip.crop_to_patches or ip.max_patches <= 1:
            return 1, 1
        cols, rows = get_optimal_tiled_canvas((int(size[0]), int(size[1])), (height, width),
                                              ip.min_patches, ip.max_patches)
        return int(rows), int(cols)

    # --- layout --------------------------------------------------------------------------------
    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """One layout per image: a grid per tile (``tile_r_c``, with its region as ``box``) and the
        ``thumbnail`` (the heatmap grid); an image cut into a single tile is its ``thumbnail``.

        Raises:
            LayoutError: if the views of an image are not ``side * side`` placeholders each followed
                by ``<|IMG_LINE_BREAK|>``, inside one ``<|START_OF_IMG|>`` ... ``<|END_OF_IMG|>``
                span per image, or the view count differs from the processor's arrangement.
        """
        tokenizer = getattr(processor, "tokenizer", processor)
        tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][example].tolist())
        boi, eoi = processor.boi_token, processor.eoi_token
        line_break = processor.img_line_break_token
        image_token = self.image_token_id(config, processor)
        ids = inputs["input_ids"][example].tolist()
        side = self.tile_side(config)
        layouts: list[ImageLayout] = []
        views: list[list[int]] | None = None
        run: list[int] = []
        for pos, token in enumerate(tokens):
            if token == boi:
                if views is not None:
                    raise LayoutError(f"{self.name}: {boi} at {pos} inside another image")
                views, run = [], []
            elif ids[pos] == image_token:
                if views is None:
                    raise LayoutError(f"{self.name}: image placeholder at {pos} outside {boi} ... {eoi}")
                run.append(pos)
            elif token == line_break and views is not None:
                if len(run) != side * side:
                    raise LayoutError(f"{self.name}: a view of {len(run)} placeholder tokens ends at "
                                      f"{pos}; the model expects {side}x{side}")
                views.append(run)
                run = []
            elif token == eoi:
                if views is None or run or not views:
                    raise LayoutError(f"{self.name}: {eoi} at {pos} does not close whole views")
                layouts.append(self._image(len(layouts), views, side, sizes, processor))
                views = None
            elif views is not None:
                raise LayoutError(f"{self.name}: image {len(layouts)} holds {token!r} at position {pos}")
        if views is not None:
            raise LayoutError(f"{self.name}: the last image has no {eoi}")
        if len(layouts) != len(image_ids):
            raise LayoutError(f"{self.name}: the sequence holds {len(layouts)} images but "
                              f"{len(image_ids)} were given")
        return layouts

    def _image(
        self, index: int, views: list[list[int]], side: int, sizes: tuple[tuple[int, int], ...], processor,
    ) -> ImageLayout:
        """Tiles row by row, each covering its share of the (stretched) image, then the thumbnail."""
        if len(views) == 1:
            grid = grid_from_run(as_long(views[0]), side, side, name=THUMBNAIL)
            return ImageLayout(index=index, grids=(grid,), main=THUMBNAIL)
        if index >= len(sizes):
            raise LayoutError(
                f"{self.name}: image {index} is cut into {len(views) - 1} tiles but its size was not "
                f"given (sizes={sizes!r}); the tile arrangement depends on it"
            )
        rows, cols = self.arrangement(sizes[index], processor)
        if rows * cols + 1 != len(views):
            raise LayoutError(
                f"{self.name}: image {index} of size {tuple(sizes[index])} has {len(views)} views in "
                f"the sequence (thumbnail included) but the image processor arranges it as "
                f"{rows}x{cols} tiles plus a thumbnail"
            )
        grids: list[ImageGrid] = []
        for t, view in enumerate(views[:-1]):
            r, c = divmod(t, cols)
            box = (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)
            grids.append(grid_from_run(as_long(view), side, side, name=tile_name(r, c), box=box))
        grids.append(grid_from_run(as_long(views[-1]), side, side, name=THUMBNAIL))
        return ImageLayout(index=index, grids=tuple(grids), main=THUMBNAIL)
