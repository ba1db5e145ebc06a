"""Idefics3 (``Idefics3ForConditionalGeneration``): SigLIP vision tower, pixel-shuffle connector, Llama LM.

The image processor splits a large image into ``rows x cols`` crops of the vision tower's input size
and adds a global view of the whole image (resized to one crop). Each crop, and the global view,
becomes ``image_seq_len`` placeholder tokens: a ``side x side`` grid after the connector's pixel
shuffle, which keeps the row-major order of its input patches (it merges ``scale x scale`` blocks
with views and permutes that never swap the block-row and block-column axes). In the text each crop
is ``<fake_token_around_image><row_i_col_j>`` followed by its placeholders, and the global view is
``<fake_token_around_image><global-img>`` followed by its placeholders; an image that is not split
is its global view alone.

The processor drops ``rows``/``cols`` from its output, so the layout reads them back from the
``<row_i_col_j>`` markers in ``input_ids``: self-contained, and exactly what the model was given.
"""
from __future__ import annotations

import math
import re

import torch
from einops import rearrange
from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageGrid, ImageLayout, grid_from_run
from .base import Family

_ROW_COL = re.compile(r"<row_(\d+)_col_(\d+)>")
GLOBAL = "global"


class Idefics3(Family):
    name = "idefics3"
    layout_kind = "tiles"  # image splits and a global image
    hf_classes = ("Idefics3ForConditionalGeneration",)
    model_types = ("idefics3",)
    lm_layers = "model.text_model.layers"
    lm_embed = "model.text_model.embed_tokens"
    lm_norm = "model.text_model.norm"
    vision_layers = "model.vision_model.encoder.layers"
    projector = ("model.connector",)
    nested_images = True

    default_global_token = "<global-img>"

    def image_seq_len(self, config) -> int:
        """Placeholder tokens per crop: the vision tower's patches merged ``scale_factor^2`` at a time."""
        vision = self.vision_config(config)
        return (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2

    def global_token(self, processor) -> str:
        """The marker before a global view (named differently by the Idefics3 and SmolVLM processors)."""
        for attr in ("global_image_token", "global_image_tag"):
            value = getattr(processor, attr, None)
            if isinstance(value, str):
                return value
        return self.default_global_token

    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """One layout per image: a ``crops`` mosaic of its split crops (if split) and its ``global`` view.

        Raises:
            LayoutError: if the placeholders do not form whole crops with ``<row_i_col_j>`` or
                global markers, the crops of an image do not fill a ``rows x cols`` grid in order, or
                the number of images found differs from the number given.
        """
        ids = inputs["input_ids"][example]
        tokenizer = getattr(processor, "tokenizer", processor)
        runs = _runs(placeholders)
        n = self.image_seq_len(config)
        markers = [_marker(ids, run, tokenizer) for run in runs]
        images: list[ImageLayout] = []
        pending: list[tuple[tuple[int, int], Tensor]] = []
        global_token = self.global_token(processor)
        for run, marker in zip(runs, markers):
            if run.numel() != n:
                raise LayoutError(
                    f"the image crop after {marker!r} at position {int(run[0])} has {run.numel()} "
                    f"placeholder tokens; the model expects {n} per crop"
                )
            if marker == global_token:
                images.append(_image_layout(len(images), pending, run))
                pending = []
                continue
            match = _ROW_COL.fullmatch(marker)
            if match is None:
                raise LayoutError(
                    f"image tokens at position {int(run[0])} follow {marker!r}; expected a "
                    f"<row_i_col_j> or {global_token!r} marker"
                )
            pending.append(((int(match[1]), int(match[2])), run))
        if pending:
            raise LayoutError(
                f"{len(pending)} image crops at the end of the sequence have no {global_token!r} view"
            )
        if len(images) != len(image_ids):
            raise LayoutError(
                f"the sequence holds {len(images)} images (one {global_token!r} view each) but "
                f"{len(image_ids)} images were given"
            )
        return images


def _runs(positions: Tensor) -> list[Tensor]:
    """Split sorted positions into runs of consecutive positions."""
    if positions.numel() == 0:
        return []
    breaks = (positions.diff() != 1).nonzero().flatten() + 1
    sizes = torch.diff(torch.cat([breaks.new_zeros(1), breaks, breaks.new_full((1,), positions.numel())]))
    return list(positions.split(sizes.tolist()))


def _marker(ids: Tensor, run: Tensor, tokenizer) -> str:
    """The token just before a run of placeholders (its crop's marker)."""
    start = int(run[0])
    if start == 0:
        raise LayoutError("image placeholder tokens start the sequence; expected a crop marker before them")
    return tokenizer.convert_ids_to_tokens(int(ids[start - 1]))


def _image_layout(index: int, crops: list[tuple[tuple[int, int], Tensor]], global_run: Tensor) -> ImageLayout:
    """The grids of one image from its crops (``((row, col), positions)``, 1-based) and global view."""
    side = math.isqrt(global_run.numel())
    if side * side != global_run.numel():
        raise LayoutError(f"{global_run.numel()} placeholder tokens per crop do not form a square grid")
    view = grid_from_run(global_run, side, side, name=GLOBAL)
    if not crops:
        return ImageLayout(index=index, grids=(view,), main=GLOBAL)
    rows = max(r for (r, _), _ in crops)
    cols = max(c for (_, c), _ in crops)
    found = [rc for rc, _ in crops]
    expected = [(r, c) for r in range(1, rows + 1) for c in range(1, cols + 1)]
    if found != expected:
        raise LayoutError(
            f"image {index}: crop markers {found} do not enumerate a {rows}x{cols} grid row by row"
        )
    # Crop (r, c) covers rows r*side..(r+1)*side of the mosaic: the processor stretches the image to
    # exactly rows x cols crops (no padding), so the mosaic covers the whole image.
    stacked = torch.stack([run for _, run in crops])
    mosaic = rearrange(stacked, "(r c) (h w) -> (r h) (c w)", r=rows, c=cols, h=side, w=side)
    return ImageLayout(index=index, grids=(ImageGrid(name="crops", positions=mosaic), view), main="crops")
