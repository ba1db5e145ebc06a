"""Llama 4 (``Llama4ForConditionalGeneration``): unfold-patch vision tower with a pixel-shuffle MLP
adapter, a linear projector, and a Llama 4 LM mixing dense and mixture-of-experts layers, chunked
RoPE attention and full NoPE attention.

The image processor fits an image onto the canvas of ``rows x cols`` tiles (at most
``max_patches``) that needs the least upscaling (else the least downscaling), resizes it without
distortion, pads it to whole tiles, cuts the canvas row by row and, when there is more than one
tile, appends a global view (the whole image resized to one tile). Each tile goes through the
vision tower on its own; the adapter's ``pixel_shuffle`` merges ``2 x 2`` blocks of patches and
keeps their row-major order (its two transposes cancel), so every tile, and the global view, is a
``side x side`` grid of tokens with ``side = (image_size / patch_size) * pixel_shuffle_ratio``.

In the text an image is ``<|image_start|>``, then (only when tiled) for each row of tiles each
tile's ``<|patch|>`` run with ``<|tile_x_separator|>`` between the tiles of a row and
``<|tile_y_separator|>`` after every row, then ``<|image|>`` and the global view's run, then
``<|image_end|>``. Only ``<|patch|>`` is replaced by image features (``config.image_token_id``);
the markers and separators are template tokens.

The processor drops the ``aspect_ratios`` it computed, so the layout reads the tile arrangement
back from the separators in ``input_ids`` (exactly what the model was given) and checks it against
the image processor's own canvas arithmetic on the image's size, which also gives each tile's
region of the image: the image is not stretched to the canvas but resized to fit it and padded on
the right and bottom, so the last row and column of tiles cover less of the image.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageGrid, ImageLayout, grid_from_run
from .base import Family, as_long

GLOBAL = "global"


def tile_name(row: int, col: int) -> str:
    """Name of the tile grid at (0-based) ``row``, ``col`` of an image's tile arrangement."""
    return f"tile_{row}_{col}"


class Llama4(Family):
    name = "llama4"
    hf_classes = ("Llama4ForConditionalGeneration",)
    model_types = ("llama4",)
    # The top-level model holds the vision model, the projector and a causal LM (no `.model`).
    lm_layers = "language_model.model.layers"
    lm_embed = "language_model.model.embed_tokens"
    lm_norm = "language_model.model.norm"
    lm_head = "language_model.lm_head"
    # Dense layers hold an MLP, MoE layers a router, routed experts and a shared expert, both at
    # `feed_forward`; the MoE module returns (output, router logits) with the output flattened to
    # [batch * pos, d], which hooks read as [batch, pos, d].
    lm_mlp = "feed_forward"
    vision_layers = "vision_model.model.layers"
    projector = ("vision_model.vision_adapter", "multi_modal_projector")
    layout_kind = "tiles"  # tiles and a global view

    start_token = "<|image_start|>"
    end_token = "<|image_end|>"
    global_token = "<|image|>"
    x_separator = "<|tile_x_separator|>"
    y_separator = "<|tile_y_separator|>"

    def processor_kwargs(self) -> dict[str, Any]:
        # The chat template starts with BOS and the Llama tokenizer adds another one.
        return {"add_special_tokens": False}

    # --- geometry ------------------------------------------------------------------------------
    def tile_side(self, config) -> int:
        """Tokens per side of one tile (and of the global view) after the pixel shuffle."""
        vision = self.vision_config(config)
        return int(_side(vision.image_size) // _side(vision.patch_size) * vision.pixel_shuffle_ratio)

    # --- layout --------------------------------------------------------------------------------
    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """One layout per image: a grid per tile (``tile_r_c``, with the region of the image it
        shows as ``box``) and the ``global`` view (the heatmap grid); an untiled image is its
        ``global`` view alone.

        Raises:
            LayoutError: if the image tokens are not ``<|image_start|>`` ... ``<|image_end|>``
                spans of whole ``side x side`` runs with the separators above, the tiles do not
                fill a ``rows x cols`` arrangement, the count of spans differs from the images
                given, a tiled image's size is missing, or the arrangement differs from the one the
                image processor picks for that size.
        """
        tokenizer = getattr(processor, "tokenizer", processor)
        tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][example].tolist())
        image_token = int(self.image_token_id(config, processor))
        ids = inputs["input_ids"][example].tolist()
        side = self.tile_side(config)
        spans = self._spans(tokens)
        if len(spans) != len(image_ids):
            raise LayoutError(
                f"{self.name}: the sequence holds {len(spans)} {self.start_token} ... {self.end_token} "
                f"spans but {len(image_ids)} images were given"
            )
        layouts = []
        for k, (start, end) in enumerate(spans):
            tiles, view = self._parse(k, start, end, tokens, ids, image_token, side)
            if not tiles:
                layouts.append(ImageLayout(index=k, grids=(view,), main=GLOBAL))
                continue
            if k >= len(sizes):
                raise LayoutError(
                    f"{self.name}: image {k} is cut into {len(tiles)}x{len(tiles[0])} tiles but its size "
                    f"was not given (sizes={sizes!r}); which part of it each tile shows depends on it"
                )
            layouts.append(self._tiled(k, tiles, view, sizes[k], processor))
        found = sum(int(lay.positions.numel()) for lay in layouts)
        if found != placeholders.numel():
            raise LayoutError(
                f"{self.name}: {placeholders.numel()} image placeholder tokens but the image spans "
                f"hold {found}"
            )
        return layouts

    def _spans(self, tokens: list[str]) -> list[tuple[int, int]]:
        """``(start, end)`` positions of each ``<|image_start|>`` and its ``<|image_end|>``."""
        spans, start = [], None
        for pos, token in enumerate(tokens):
            if token == self.start_token:
                if start is not None:
                    raise LayoutError(f"{self.name}: {self.start_token} at {pos} inside another image")
                start = pos
            elif token == self.end_token:
                if start is None:
                    raise LayoutError(f"{self.name}: {self.end_token} at {pos} without {self.start_token}")
                spans.append((start, pos))
                start = None
        if start is not None:
            raise LayoutError(f"{self.name}: {self.start_token} at {start} has no {self.end_token}")
        return spans

    def _parse(
        self, index: int, start: int, end: int, tokens: list[str], ids: list[int], image_token: int,
        side: int,
    ) -> tuple[list[list[ImageGrid]], ImageGrid]:
        """One image's span: its rows of tile grids (runs split by the x/y separators; none for an
        untiled image) and its global view (the run after ``<|image|>``)."""
        per_tile = side * side
        rows: list[list[ImageGrid]] = [[]]
        run: list[int] = []
        in_global = False  # after <|image|>: the global view's run
        for pos in range(start + 1, end):
            token = tokens[pos]
            if ids[pos] == image_token:
                run.append(pos)
                continue
            if token not in (self.x_separator, self.y_separator, self.global_token):
                raise LayoutError(f"{self.name}: image {index} holds {token!r} at position {pos}")
            if in_global:
                raise LayoutError(f"{self.name}: image {index} has {token!r} after its global view")
            if token == self.global_token:
                if run or rows[-1]:
                    raise LayoutError(f"{self.name}: image {index}'s last row of tiles does not end "
                                      f"with {self.y_separator}")
                in_global = True
                continue
            if len(run) != per_tile:
                raise LayoutError(f"{self.name}: image {index} has a tile of {len(run)} tokens before "
                                  f"position {pos}; the model expects {side}x{side}")
            r, c = len(rows) - 1, len(rows[-1])
            rows[-1].append(grid_from_run(as_long(run), side, side, name=tile_name(r, c)))
            run = []
            if token == self.y_separator:
                rows.append([])
        if not in_global:
            raise LayoutError(f"{self.name}: image {index} has no {self.global_token} marker before "
                              "its global view")
        if len(run) != per_tile:
            raise LayoutError(f"{self.name}: image {index}'s global view has {len(run)} tokens; the "
                              f"model expects {side}x{side}")
        rows = rows[:-1]  # the empty row after the last y separator (or the only, empty one)
        if rows and (any(len(r) != len(rows[0]) for r in rows) or len(rows) * len(rows[0]) < 2):
            raise LayoutError(f"{self.name}: image {index}'s tiles per row {[len(r) for r in rows]} "
                              "do not form a rows x cols arrangement of several tiles")
        return rows, grid_from_run(as_long(run), side, side, name=GLOBAL)

    def _tiled(
        self, index: int, tiles: list[list[ImageGrid]], view: ImageGrid, size: tuple[int, int], processor,
    ) -> ImageLayout:
        """The tile grids with the part of the image each shows as ``box``, then the global view.

        Raises:
            LayoutError: if the arrangement in the sequence differs from the image processor's.
        """
        rows, cols, height, width = self.canvas(size, processor)
        if (len(tiles), len(tiles[0])) != (rows, cols):
            raise LayoutError(
                f"{self.name}: image {index} of size {tuple(size)} has {len(tiles)}x{len(tiles[0])} "
                f"tiles in the sequence but the image processor arranges it as {rows}x{cols}"
            )
        tile = _size_dict(processor.image_processor.size)
        grids = []
        for r, row in enumerate(tiles):
            for c, grid in enumerate(row):
                # the resized image sits at the canvas's top left; the rest of the canvas is padding
                box = (min(c * tile.width / width, 1.0), min(r * tile.height / height, 1.0),
                       min((c + 1) * tile.width / width, 1.0), min((r + 1) * tile.height / height, 1.0))
                grids.append(ImageGrid(name=grid.name, positions=grid.positions, box=box))
        return ImageLayout(index=index, grids=(*grids, view), main=GLOBAL)

    def canvas(self, size: tuple[int, int], processor) -> tuple[int, int, int, int]:
        """``(rows, cols, height, width)``: the tile arrangement the image processor picks for an
        image of ``size`` and the size the image is resized to on that canvas (before padding),
        by the processor's own functions, as its ``_preprocess`` calls them."""
        from transformers.models.llama4.image_processing_llama4 import (
            find_supported_resolutions,
            get_best_fit,
            get_max_res_without_distortion,
        )

        ip = processor.image_processor
        tile = _size_dict(ip.size)
        height, width = int(size[0]), int(size[1])
        possible = torch.tensor(find_supported_resolutions(max_num_chunks=ip.max_patches, patch_size=tile))
        target = [int(v) for v in get_best_fit((height, width), possible,
                                               resize_to_max_canvas=ip.resize_to_max_canvas)]
        rows, cols = target[0] // tile.height, target[1] // tile.width
        if not ip.resize_to_max_canvas:  # never upscale beyond one tile's size
            target = [min(max(height, tile.height), target[0]), min(max(width, tile.width), target[1])]
        new_h, new_w = get_max_res_without_distortion((height, width), tuple(target))
        return rows, cols, max(new_h, 1), max(new_w, 1)


def _size_dict(size):
    """The image processor's tile size as a ``SizeDict`` (it may be stored as a plain dict)."""
    from transformers.image_utils import SizeDict

    return size if isinstance(size, SizeDict) else SizeDict(**dict(size))


def _side(value) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)
