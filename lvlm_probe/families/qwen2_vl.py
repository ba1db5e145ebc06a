"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): a ViT at native resolution with 2D rotary
positions, a patch merger that fuses each 2x2 block of patches into one token, and a Qwen2 LM
with multimodal rotary positions (M-RoPE).

Each image is resized so its sides are multiples of patch * merge pixels, so its grid varies with
its size and aspect ratio: ``image_grid_thw[i] = (t, h, w)`` in patches, and the image's single run
of ``<|image_pad|>`` tokens holds ``t * h * w / merge**2`` tokens.

Merged-token order is row-major over the merged grid (``h / merge`` rows x ``w / merge`` columns):
``Qwen2VLImageProcessor.patchify`` permutes patches to ``[h/merge, w/merge, merge, merge]`` order
before flattening, the vision tower's ``PatchMerger`` fuses each run of ``merge**2`` consecutive
patches into one token, and the LM's M-RoPE gives these tokens (height, width) positions from a
``meshgrid(..., indexing="ij")`` flattened in the same order. Inside the vision tower, patches come
in the processor's order: ``merge**2`` consecutive patches per merged cell, cells row-major. (For
Qwen2.5-VL's window order inside the tower see ``qwen2_5_vl``.)
"""
from __future__ import annotations

from einops import rearrange

from ..errors import LayoutError
from ..layout import ImageGrid, ImageLayout
from .base import Family, split_counts


class Qwen2VL(Family):
    name = "qwen2_vl"
    hf_classes = ("Qwen2VLForConditionalGeneration",)
    model_types = ("qwen2_vl",)
    lm_layers = "model.language_model.layers"
    lm_embed = "model.language_model.embed_tokens"
    lm_norm = "model.language_model.norm"
    # The vision config's ``depth`` is aliased as ``num_hidden_layers``: the base count works.
    vision_layers = "model.visual.blocks"
    projector = ("model.visual.merger",)

    def image_layouts(self, inputs, example, image_ids, placeholders, config, processor, *, sizes=()):
        """One merged ``(h / merge) x (w / merge)`` grid per image, from ``image_grid_thw``.

        ``image_grid_thw`` lists every image of the batch; ``image_ids`` picks this example's rows.

        Raises:
            LayoutError: no or too few ``image_grid_thw`` rows, a non-image grid (t != 1), or
                placeholders that do not form one contiguous run of the expected length per image.
        """
        if not image_ids:
            return super().image_layouts(inputs, example, image_ids, placeholders, config,
                                         processor, sizes=sizes)
        grid_thw = inputs.get("image_grid_thw")
        if grid_thw is None:
            raise LayoutError(
                f"example {example} has {len(image_ids)} images but the processor output holds "
                f"no image_grid_thw (keys: {sorted(inputs.keys())})"
            )
        if max(image_ids) >= len(grid_thw):
            raise LayoutError(
                f"example {example} needs rows {image_ids} of image_grid_thw, which has "
                f"{len(grid_thw)}"
            )
        merge = int(config.vision_config.spatial_merge_size)
        shapes = []
        for i in image_ids:
            t, h, w = (int(v) for v in grid_thw[i])
            # A still image is one temporal patch (the frame is repeated to fill it); t > 1 would
            # be a video, whose frames are not one spatial grid.
            if t != 1 or h % merge or w % merge:
                raise LayoutError(
                    f"image {i} has image_grid_thw ({t}, {h}, {w}); expected t = 1 and h, w "
                    f"divisible by spatial_merge_size {merge}"
                )
            shapes.append((h // merge, w // merge))
        runs = split_counts(placeholders, [rows * cols for rows, cols in shapes])
        layouts = []
        for k, (run, (rows, cols)) in enumerate(zip(runs, shapes)):
            # Each image's tokens are one contiguous <|image_pad|> run; a gap means the processor
            # did not expand the placeholders as expected, and the grid would be wrong.
            if run.numel() and int(run[-1] - run[0]) + 1 != run.numel():
                raise LayoutError(
                    f"image {k} of example {example}: its {run.numel()} placeholder tokens are "
                    f"not contiguous (positions {int(run[0])}..{int(run[-1])})"
                )
            positions = rearrange(run, "(r c) -> r c", r=rows, c=cols)
            grid = ImageGrid(name="patches", positions=positions)
            layouts.append(ImageLayout(index=k, grids=(grid,)))
        return layouts
