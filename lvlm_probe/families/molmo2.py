"""Molmo2 (``Molmo2ForConditionalGeneration``): a ViT over overlapping square crops, an adapter that
pools windows of patches into single tokens by attention, and a Qwen3- or OLMo-style LM.

The image processor (``Molmo2ImageProcessor``) gives every image two views:

* a low-resolution view: the whole image stretched to one crop;
* a high-resolution view: the image stretched to a canvas of ``tiling_h x tiling_w`` overlapping
  crops (``compute_crop_geometry``), whose patches, with the overlapping margins dropped, are
  stitched back into one patch grid covering the canvas row-major.

Each view's patch grid is pooled ``pool_h x pool_w`` patches per token (``arange_for_pooling``): a
grid whose side is not a multiple of the window is padded with empty slots, ``pad // 2`` before
and the rest after, so the pooled grid covers slightly more than the image (its ``box`` reaches
past 1, and before 0 where half the padding comes first). ``image_grids[i] = (low_h, low_w, high_h,
high_w)`` gives the two pooled grids' shapes; the adapter's outputs are added, in this order, to the
``<im_patch>`` embeddings.

In the text each image is ``<low_res_im_start>`` + the low-resolution tokens + ``<im_end>``,
then ``<im_start>`` + each high-resolution row followed by ``<im_col>`` + ``<im_end>`` (the
processor's ``use_single_crop_col_tokens`` and ``image_use_col_tokens`` decide whether rows end in
``<im_col>``). Only ``<im_patch>`` tokens are placeholders; the start, end and column tokens are
template positions, as is the "Image i" the chat template writes before each of several images.
All of them (placeholders, start/end/column tokens) attend to each other both ways: the model
puts every such token of an example, across all its images, in one bidirectional block
(``mm_token_type_ids``), so an image's tokens also read the later images' tokens.

The module paths describe pre-norm layers (``norm_after=False``, as in the Qwen3-based
checkpoints). With ``norm_after=True`` each sublayer's output passes through
``input_layernorm`` / ``post_attention_layernorm`` before it is added to the residual stream, so
there the attention and MLP writes are those norms' outputs, not ``o_proj`` and ``mlp``.

An image is a ``global`` grid (the low-resolution view) and a ``high_res`` grid (the heatmap grid).
The layout checks each image's tokens against ``Molmo2Processor.replace_image_token`` on the
processor's own ``image_grids``, and takes the high-resolution canvas from the image's size through
the image processor's ``compute_crop_geometry``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageLayout, grid_from_run
from .base import Family, split_counts

GLOBAL = "global"
HIGH_RES = "high_res"


class Molmo2(Family):
    name = "molmo2"
    hf_classes = ("Molmo2ForConditionalGeneration",)
    model_types = ("molmo2",)
    lm_layers = "model.language_model.layers"
    lm_embed = "model.language_model.embed_tokens"
    lm_norm = "model.language_model.norm"
    vision_layers = "model.vision_tower.layers"
    # The adapter returns a ModelOutput; its modules return tensors: the attention pooling (one
    # query per token over its window of patches), then the MLP into the LM's width.
    projector = ("model.multi_modal_projector.image_pooling_2d", "model.multi_modal_projector.image_projector")
    layout_kind = "tiles"  # a global view and the high-resolution grid stitched from crops
    bidirectional_attention = True  # an example's image tokens attend to each other both ways

    # --- geometry, as the image processor computes it -------------------------------------------
    def _settings(self, processor) -> dict:
        """The image processor's resolved settings (crop size, patch size, margins, pooling)."""
        return processor.image_processor._merge_and_standardize_kwargs()

    def canvas_patches(self, size: tuple[int, int], processor) -> tuple[int, int]:
        """``(rows, cols)`` of patches of the high-resolution canvas of an image of ``size``."""
        from transformers.models.molmo2.image_processing_molmo2 import compute_crop_geometry

        s = self._settings(processor)
        _, _, height, width = compute_crop_geometry(
            int(size[0]), int(size[1]), max_crops=s["max_crops"], overlap_margins=s["overlap_margins"],
            crop_size=s["size"].height, patch_size=s["patch_size"],
        )
        return height // s["patch_size"], width // s["patch_size"]

    def crop_patches(self, processor) -> int:
        """Patches per side of one crop (and of the low-resolution view)."""
        s = self._settings(processor)
        return s["size"].height // s["patch_size"]

    def pooled_box(self, patches: tuple[int, int], pooled: tuple[int, int], processor) -> tuple[float, ...]:
        """The region ``(x0, y0, x1, y1)``, as fractions of the view, that a pooled grid of
        ``pooled`` tokens over ``patches`` patches covers, padding included (``arange_for_pooling``
        puts ``pad // 2`` empty slots before the patches and the rest after)."""
        pool_h, pool_w = self._settings(processor)["pooling_size"]
        (rows, cols), (n_h, n_w) = patches, pooled
        before_h, before_w = (n_h * pool_h - rows) // 2, (n_w * pool_w - cols) // 2
        return (-before_w / cols, -before_h / rows,
                (n_w * pool_w - before_w) / cols, (n_h * pool_h - before_h) / rows)

    # --- layout ----------------------------------------------------------------------------------
    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """One layout per image: the ``global`` low-resolution grid and the ``high_res`` grid.

        Raises:
            LayoutError: no ``image_grids`` for the images, placeholders that do not split into the
                grids' token counts, an image's tokens that differ from what the processor writes
                for its grid, a missing image size, or a size whose canvas the processor would pool
                into another grid.
        """
        if not image_ids:
            if placeholders.numel():
                raise LayoutError(f"{placeholders.numel()} image placeholder tokens but no image")
            return []
        grids = inputs.get("image_grids")
        if grids is None or max(image_ids) >= len(grids):
            raise LayoutError(
                f"{self.name}: example {example} needs rows {image_ids} of image_grids, which the "
                f"processor output does not hold (keys: {sorted(inputs.keys())})"
            )
        shapes = [tuple(int(v) for v in grids[i]) for i in image_ids]
        runs = split_counts(placeholders, [lh * lw + hh * hw for lh, lw, hh, hw in shapes])
        ids = inputs["input_ids"][example]
        tokenizer = getattr(processor, "tokenizer", processor)
        layouts = []
        for k, (i, run, (low_h, low_w, high_h, high_w)) in enumerate(zip(image_ids, runs, shapes)):
            self._check_tokens(ids, run, processor, tokenizer, grids, i, k, self.image_token_id(config, processor))
            if k >= len(sizes):
                raise LayoutError(
                    f"{self.name}: image {k}'s size was not given (sizes={sizes!r}); the region its "
                    "high-resolution grid covers depends on it"
                )
            canvas = self.canvas_patches(sizes[k], processor)
            pool_h, pool_w = self._settings(processor)["pooling_size"]
            expected = (-(-canvas[0] // pool_h), -(-canvas[1] // pool_w))
            if expected != (high_h, high_w):
                raise LayoutError(
                    f"{self.name}: image {k} of size {sizes[k]} pools into a {expected[0]}x"
                    f"{expected[1]} high-resolution grid but image_grids says {high_h}x{high_w}"
                )
            side = self.crop_patches(processor)
            low, high = run.split([low_h * low_w, high_h * high_w])
            global_grid = grid_from_run(low, low_h, low_w, name=GLOBAL,
                                        box=self.pooled_box((side, side), (low_h, low_w), processor))
            high_grid = grid_from_run(high, high_h, high_w, name=HIGH_RES,
                                      box=self.pooled_box(canvas, (high_h, high_w), processor))
            layouts.append(ImageLayout(index=k, grids=(global_grid, high_grid), main=HIGH_RES))
        return layouts

    def _check_tokens(self, ids: Tensor, run: Tensor, processor, tokenizer, grids, i: int, k: int,
                      placeholder: int) -> None:
        """The image's tokens, from the one before its first placeholder, are exactly what
        ``Molmo2Processor.replace_image_token`` writes for its ``image_grids`` row, and its
        placeholders are the ``placeholder`` tokens among them."""
        text = processor.replace_image_token({"image_grids": grids}, i)
        expected = torch.as_tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=ids.dtype)
        start = int(run[0]) - 1
        found = ids[max(start, 0): start + expected.numel()]
        if start < 0 or not torch.equal(found, expected.to(ids.device)):
            raise LayoutError(
                f"{self.name}: image {k}'s tokens from position {start} are not the processor's "
                f"{text[:60]!r}... for image_grids {grids[i].tolist()}"
            )
        inside = (expected == placeholder).nonzero().flatten() + start
        if not torch.equal(inside.to(run.device), run):
            raise LayoutError(f"{self.name}: image {k}'s placeholders are not the placeholder tokens "
                              f"(id {placeholder}) the processor writes for it")
