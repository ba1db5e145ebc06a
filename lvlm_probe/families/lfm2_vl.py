"""LFM2-VL (``Lfm2VlForConditionalGeneration``): SigLIP2 NaFlex vision tower, pixel-unshuffle
projector, LFM2 hybrid language model; large images as tiles plus a thumbnail.

The image processor resizes an image that is not too large (its size rounded to
``encoder_patch_size * downsample_factor`` pixels within ``max_image_tokens`` tokens times
``max_pixels_tolerance``) to multiples of ``encoder_patch_size * downsample_factor`` near its own
aspect ratio (one view); a larger image is stretched to ``rows x cols`` tiles of ``tile_size``
pixels (the arrangement of ``min_tiles..max_tiles`` tiles closest to its aspect ratio), cut row by
row, and followed by a thumbnail (the single-view resize of the whole image). Every view goes
through the vision tower on its own, at its own ``spatial_shapes[v] = (h, w)`` patches
(``pixel_attention_mask`` marks its valid patches, the rest is padding); ``get_image_features``
groups each ``downsample_factor``-square block of patches into one token, row-major over the
``(h / f) x (w / f)`` blocks, and concatenates the views in order.

In the text each image is ``<|image_start|>`` ... ``<|image_end|>``; a tiled image puts
``<|img_row_R_col_C|>`` (1-based) before each tile's run of ``<image>`` placeholders and
``<|img_thumbnail|>`` before the thumbnail's. The markers are template positions. So each run of
placeholders is one view, in the order of ``spatial_shapes``: the layout reads which view a run is
from the marker before it and its grid shape from ``spatial_shapes`` (the views of the batch's
earlier examples are counted from their runs). Tiles are ``tile_r_c`` (0-based, with their region
as ``box``), the thumbnail ``thumbnail`` (the heatmap grid); an image that is not tiled is one
``thumbnail`` grid.

Language model: ``model.language_model``, whose final norm is ``embedding_norm``. Layers listed in
``config.text_config.layer_types`` as ``"conv"`` have no attention: ``conv`` (``Lfm2ShortConv``)
projects the normalised residual to ``B, C, x``, runs a depthwise causal convolution of
``conv_L_cache`` taps over ``B * x`` and writes ``out_proj(C * conv)``. No attention mask reaches
it: a 2-d padding mask only zeroes its inputs at padded positions (with ``conv_bias`` False these
add nothing to the window, so left padding changes nothing), so keys cannot be masked there
(``unmasked_mixing_layers``). It is causal, reads no position index and runs as
``conv(hidden_states)`` without cache or mask, which is what removing positions needs. The
attention layers' ``self_attn`` normalises q and k per head and writes through ``out_proj``.

``nonlinear_writes``: direct logit attribution splits each layer's write by heads and keys, and
the convolution layers have neither.
"""
from __future__ import annotations

import re

from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageGrid, ImageLayout, grid_from_run
from .base import Family

THUMBNAIL = "thumbnail"
_TILE = re.compile(r"<\|img_row_(\d+)_col_(\d+)\|>")


def tile_name(row: int, col: int) -> str:
    """Name of the tile grid at (0-based) ``row``, ``col`` of an image's tile arrangement."""
    return f"tile_{row}_{col}"


class Lfm2Vl(Family):
    name = "lfm2_vl"
    layout_kind = "tiles"  # tiles plus a thumbnail
    hf_classes = ("Lfm2VlForConditionalGeneration",)
    model_types = ("lfm2_vl",)
    lm_layers = "model.language_model.layers"
    lm_embed = "model.language_model.embed_tokens"
    lm_norm = "model.language_model.embedding_norm"
    lm_attn = "self_attn"
    lm_attn_out = "self_attn.out_proj"
    lm_mlp = "feed_forward"
    lm_resid_mid = "ffn_norm"
    lm_mixer = "conv"
    vision_layers = "model.vision_tower.encoder.layers"
    projector = ("model.multi_modal_projector",)
    # the processor nests a flat image list as one image per prompt: it takes one list per prompt
    nested_images = True
    nonlinear_writes = (
        "its short-convolution layers have no heads or attention pattern to split their writes by")

    def unmasked_mixing_layers(self, config) -> list[int]:
        """The short-convolution layers: ``layer_types[i] == "conv"``."""
        return [i for i, kind in enumerate(self.text_config(config).layer_types) if kind == "conv"]

    # --- layout --------------------------------------------------------------------------------
    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """One layout per image: ``tile_r_c`` grids and a ``thumbnail``, or one ``thumbnail``.

        Raises:
            LayoutError: if a run of placeholders follows no image or tile marker, tiles do not
                enumerate a ``rows x cols`` arrangement row by row or lack a thumbnail, a run's
                length differs from its view's ``spatial_shapes``, or the number of images found
                differs from the number given.
        """
        if not image_ids:
            if placeholders.numel():
                raise LayoutError(f"{placeholders.numel()} image placeholder tokens but no image")
            return []
        shapes = inputs.get("spatial_shapes")
        if shapes is None:
            raise LayoutError(f"{self.name}: the processor's output has no spatial_shapes")
        tokenizer = getattr(processor, "tokenizer", processor)
        start = getattr(processor, "image_start_token", "<|image_start|>")
        thumb = getattr(processor, "image_thumbnail_token", "<|img_thumbnail|>")
        image_id = int(config.image_token_id)
        view = sum(len(_runs(_placeholders(inputs, e, image_id))) for e in range(example))
        factor = int(config.downsample_factor)
        valid = inputs.get("pixel_attention_mask")
        ids = inputs["input_ids"][example]
        layouts: list[ImageLayout] = []
        tiles: list[tuple[tuple[int, int], ImageGrid]] = []
        for run in _runs(placeholders):
            first = int(run[0])
            marker = tokenizer.convert_ids_to_tokens(int(ids[first - 1])) if first else None
            if view >= shapes.shape[0]:
                raise LayoutError(f"{self.name}: more runs of image tokens than views in spatial_shapes")
            h, w = (int(x) for x in shapes[view])
            if valid is not None and int(valid[view].sum()) != h * w:
                raise LayoutError(f"{self.name}: view {view} has {int(valid[view].sum())} valid patches, "
                                  f"not its spatial_shapes {h}x{w}")
            rows, cols = h // factor, w // factor
            if run.numel() != rows * cols:
                raise LayoutError(
                    f"{self.name}: the run at position {first} has {run.numel()} image tokens but view "
                    f"{view} is {h}x{w} patches, {rows}x{cols} tokens")
            view += 1
            tile = _TILE.fullmatch(marker or "")
            if tile is not None:
                tiles.append(((int(tile[1]), int(tile[2])), grid_from_run(run, rows, cols)))
            elif marker == thumb and tiles:
                layouts.append(_tiled(len(layouts), tiles, grid_from_run(run, rows, cols, name=THUMBNAIL)))
                tiles = []
            elif marker == start and not tiles:
                grid = grid_from_run(run, rows, cols, name=THUMBNAIL)
                layouts.append(ImageLayout(index=len(layouts), grids=(grid,), main=THUMBNAIL))
            else:
                raise LayoutError(
                    f"{self.name}: image tokens at position {first} follow {marker!r}, not {start!r}, "
                    f"a tile marker or {thumb!r} after tiles")
        if tiles:
            raise LayoutError(f"{self.name}: {len(tiles)} tiles at the end have no {thumb!r} view")
        if len(layouts) != len(image_ids):
            raise LayoutError(f"{self.name}: the sequence holds {len(layouts)} images but "
                              f"{len(image_ids)} were given")
        return layouts


def _tiled(index: int, tiles: list[tuple[tuple[int, int], ImageGrid]], thumbnail: ImageGrid) -> ImageLayout:
    """Tiles (1-based ``(row, col)`` markers, row by row), each covering its share of the
    stretched image, then the thumbnail."""
    rows = max(r for (r, _), _ in tiles)
    cols = max(c for (_, c), _ in tiles)
    found = [rc for rc, _ in tiles]
    expected = [(r, c) for r in range(1, rows + 1) for c in range(1, cols + 1)]
    if found != expected:
        raise LayoutError(f"image {index}: tile markers {found} do not enumerate a {rows}x{cols} "
                          "arrangement row by row")
    grids = []
    for (r, c), grid in tiles:
        box = ((c - 1) / cols, (r - 1) / rows, c / cols, r / rows)
        grids.append(ImageGrid(name=tile_name(r - 1, c - 1), positions=grid.positions, box=box))
    return ImageLayout(index=index, grids=(*grids, thumbnail), main=THUMBNAIL)


def _placeholders(inputs, example: int, image_id: int) -> Tensor:
    """Sorted positions of an example's placeholders (inside its attention mask)."""
    ids = inputs["input_ids"][example]
    keep = ids == image_id
    mask = inputs.get("attention_mask")
    if mask is not None:
        keep = keep & mask[example].bool()
    return keep.nonzero().flatten()


def _runs(positions: Tensor) -> list[Tensor]:
    """Split sorted positions into runs of consecutive positions."""
    if positions.numel() == 0:
        return []
    breaks = ((positions.diff() != 1).nonzero().flatten() + 1).tolist()
    bounds = [0, *breaks, positions.numel()]
    return [positions[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
