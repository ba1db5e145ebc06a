"""Ovis2.5 (``Ovis2_5ForConditionalGeneration``): native-resolution ViT with window and full
attention layers, a visual tokenizer, a visual embedding table, Qwen3 LM.

The image processor resizes each image to multiples of ``patch_size * merge_size`` within a pixel
budget and reports its patch grid in ``image_grid_thw`` (``1, h, w``). The visual tokenizer maps
each ``merge x merge`` block of patch states to a probability distribution over the visual
vocabulary, and the visual embedding table turns it into one embedding (a probability-weighted mix
of the table's rows). The processor replaces each image token of the template by the image start
token, ``h * w / merge^2`` image tokens and the image end token; the model replaces the start and
end tokens' embeddings by two learned indicator rows of the table, which do not depend on the image,
so they are template tokens.

The vision tower reorders the merged blocks window by window (``get_vision_window_index``: windows
of ``window_size / patch_size / merge`` blocks per side, row by row, blocks row-major inside each)
and ``get_image_features`` reads the last encoder layer's output, still in that order, so the
image tokens follow the windows: token ``j`` is merged block ``window_index[j]`` of the row-major
``(h / merge) x (w / merge)`` grid. An image is that one ``patches`` grid.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageGrid, ImageLayout
from .base import Family, split_counts


class Ovis2_5(Family):
    name = "ovis2_5"
    hf_classes = ("Ovis2_5ForConditionalGeneration",)
    model_types = ("ovis2_5",)
    lm_layers = "model.language_model.layers"
    vision_layers = "model.vision_tower.layers"
    # the visual tokenizer and the visual embedding table
    projector = ("model.multi_modal_projector",)

    def merged_grid(self, grid_thw: Tensor, config) -> tuple[int, int]:
        """``(rows, cols)`` of merged blocks of an image with patch grid ``grid_thw``."""
        merge = int(self.vision_config(config).spatial_merge_size)
        t, h, w = (int(x) for x in grid_thw)
        if t != 1 or h % merge or w % merge:
            raise LayoutError(f"{self.name}: image grid {t}x{h}x{w} is not one frame of whole {merge}x{merge} blocks")
        return h // merge, w // merge

    def window_order(self, grid_thw: Tensor, config) -> Tensor:
        """Row-major merged-block index of each image token, in sequence order: the vision tower's
        own window reordering (``transformers.vision_utils.get_vision_window_index``)."""
        from transformers.vision_utils import get_vision_window_index

        vision = self.vision_config(config)
        index, _ = get_vision_window_index(torch.as_tensor(grid_thw).reshape(1, 3).long(),
                                           spatial_merge_size=int(vision.spatial_merge_size),
                                           window_size=int(vision.window_size), patch_size=int(vision.patch_size))
        return index

    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """One ``patches`` grid per image: ``image_grid_thw`` merged, its cells filled in the
        tower's window order.

        Raises:
            LayoutError: if the placeholders do not add up to the merged grids, or an image's tokens
                are not one run between the image start and end tokens.
        """
        if not image_ids:
            return []
        grids = torch.as_tensor(inputs["image_grid_thw"])[image_ids]
        shapes = [self.merged_grid(g, config) for g in grids]
        runs = split_counts(placeholders, [rows * cols for rows, cols in shapes])
        ids = inputs["input_ids"][example]
        start, end = int(config.image_start_token_id), int(config.image_end_token_id)
        layouts = []
        for k, (run, (rows, cols), thw) in enumerate(zip(runs, shapes, grids)):
            first, last = int(run[0]), int(run[-1])
            framed = first > 0 and last + 1 < ids.numel() and ids[first - 1] == start and ids[last + 1] == end
            if not bool((run.diff() == 1).all()) or not framed:
                raise LayoutError(
                    f"{self.name} example {example}: the tokens of image {k} are not one run between "
                    "the image start and end tokens"
                )
            cells = torch.empty_like(run)
            cells[self.window_order(thw, config).to(run.device)] = run
            layouts.append(ImageLayout(index=k, grids=(ImageGrid(name="patches", positions=cells.reshape(rows, cols)),)))
        return layouts
