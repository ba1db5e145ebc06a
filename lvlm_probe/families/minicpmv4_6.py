"""MiniCPM-V 4.6 (``MiniCPMV4_6ForConditionalGeneration``): a SigLIP-style NaViT vision tower, a
window-attention merger inside it, an MLP merger into the LM's width, and Qwen3.5's hybrid LM.

The image processor resizes each image to a *source* view (about ``scale_resolution`` pixels
squared, sides multiples of ``4 * patch_size``) and, when the image is larger than that, also
stretches it to a ``rows x cols`` grid of equal *slices* (``get_sliced_grid``, at most
``max_slice_nums``). Every view is patchified on its own: ``target_sizes[v] = (h, w)`` in patches,
one row per view, the source view first, then the slices row by row, image after image through the
whole batch. After encoder layer ``insert_layer_id`` the window merger fuses each 2x2 block of
patches into one token, in row-major order of the blocks; the merger then fuses each 2x2 block of
those (``merge_kernel_size``) and projects it. So a view is an ``(h / 4) x (w / 4)`` row-major grid
of tokens (``(h / 2) x (w / 2)`` in ``downsample_mode="4x"``, which skips the window merger): spatial
patches, not learned queries.

In the text an image is ``<image_id>k</image_id>`` (with the processor's ``use_image_id``), then
``<image>`` + the source view's placeholders + ``</image>``, then each slice as ``<slice>`` + its
placeholders + ``</slice>``, slices of one row side by side and rows separated by ``\\n``. The tags,
the id digits and the newlines are template tokens; the placeholders are the only image tokens.

The processor drops each image's slice grid and view count from its output (``grids``,
``num_patches_per_image``), and ``target_sizes`` is flat over the batch. The layout reads the
arrangement from the ``<slice>`` runs and row breaks in ``input_ids``, each view's shape from its row
of ``target_sizes`` (the rows of earlier examples skipped by counting their views), and checks the
arrangement against the image processor's own ``get_sliced_grid`` on the image's size.

Language model: Qwen3.5's (Gated DeltaNet linear-attention layers and gated full-attention layers,
zero-centred RMSNorms), with Qwen3.5's capabilities.
"""
from __future__ import annotations

from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageGrid, ImageLayout, grid_from_run
from .base import as_long
from .qwen3_5 import Qwen3_5

SOURCE = "source"


def slice_name(row: int, col: int) -> str:
    """Name of the slice grid at (0-based) ``row``, ``col`` of an image's slice arrangement."""
    return f"slice_{row}_{col}"


class MiniCPMV4_6(Qwen3_5):
    name = "minicpmv4_6"
    hf_classes = ("MiniCPMV4_6ForConditionalGeneration",)
    model_types = ("minicpmv4_6",)
    layout_kind = "tiles"  # a source view and slices of the image
    lm_layers = "model.language_model.layers"
    lm_embed = "model.language_model.embed_tokens"
    lm_norm = "model.language_model.norm"
    vision_layers = "model.vision_tower.encoder.layers"
    # The window merger inside the tower, then the merger into the LM's width. The merger returns a
    # list of per-view features (the model concatenates them): projector.hook_out, which keeps the
    # first element of a list output, holds the batch's first view.
    projector = ("model.vision_tower.vit_merger", "model.merger")
    # pixel_values is [1, C, patch, all patches of all views of the batch]: the model reads row 0
    packed_inputs = {"pixel_values": -1}

    # --- geometry ------------------------------------------------------------------------------
    def token_stride(self, config) -> int:
        """Patches per token side: 2 (window merger) x 2 (MLP merger), or 2 in ``"4x"`` mode."""
        merge_h, merge_w = config.merge_kernel_size
        if merge_h != merge_w:
            raise LayoutError(f"{self.name}: a non-square merge kernel {tuple(config.merge_kernel_size)}")
        window = 1 if config.downsample_mode == "4x" else int(config.vision_config.window_kernel_size[0])
        return window * int(merge_h) ** int(config.merger_times)

    def arrangement(self, size: tuple[int, int], processor) -> tuple[int, int]:
        """``(rows, cols)`` of the slices the image processor cuts an image of ``size`` into,
        ``(0, 0)`` when it keeps the source view alone."""
        ip = processor.image_processor
        if not ip.slice_mode:
            return 0, 0
        grid = ip.get_sliced_grid((int(size[0]), int(size[1])), ip.max_slice_nums, ip.scale_resolution)
        return (0, 0) if grid is None else (int(grid[0]), int(grid[1]))

    # --- layout --------------------------------------------------------------------------------
    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """One layout per image: its ``source`` view (the heatmap grid) and a ``slice_r_c`` grid per
        slice, with the slice's region of the image as ``box``.

        Raises:
            LayoutError: if the placeholders do not sit in ``<image>`` / ``<slice>`` views, a view's
                count differs from its ``target_sizes`` row, the slices do not form a full
                ``rows x cols`` arrangement separated by newlines, the arrangement differs from the
                image processor's, or the number of images differs from the number given.
        """
        views = self._views(inputs, example, config, processor)
        offset = self._earlier_views(inputs, example, processor)
        targets = inputs.get("target_sizes")
        if targets is None or offset + sum(len(v) for v in views) > len(targets):
            raise LayoutError(f"{self.name}: the batch's target_sizes ({None if targets is None else len(targets)} "
                              f"rows) do not cover the views of example {example}")
        stride = self.token_stride(config)
        layouts = []
        for k, image in enumerate(views):
            shapes = []
            for v, (_, run, _) in enumerate(image):
                h, w = (int(x) for x in targets[offset + v])
                if h % stride or w % stride or len(run) != (h // stride) * (w // stride):
                    raise LayoutError(
                        f"{self.name}: image {k} view {v} holds {len(run)} placeholders but its "
                        f"target_sizes row ({h}, {w}) patches makes {(h // stride) * (w // stride)} tokens "
                        f"of {stride}x{stride} patches")
                shapes.append((h // stride, w // stride))
            offset += len(image)
            layouts.append(self._image(k, image, shapes, sizes, processor))
        if len(layouts) != len(image_ids):
            raise LayoutError(f"{self.name}: the sequence holds {len(layouts)} images but "
                              f"{len(image_ids)} were given")
        return layouts

    def _views(self, inputs, example: int, config, processor) -> list[list[tuple[str, list[int], int]]]:
        """Per image, its views ``(kind, placeholder positions, slice row)`` in sequence order."""
        tokenizer = getattr(processor, "tokenizer", processor)
        ids = inputs["input_ids"][example].tolist()
        tag = dict(zip(tokenizer.convert_tokens_to_ids(
            [processor.image_start_token, processor.image_end_token,
             processor.slice_start_token, processor.slice_end_token]), ("open", "close", "slice", "end")))
        image_token = self.image_token_id(config, processor)
        images: list[list[tuple[str, list[int], int]]] = []
        view: tuple[str, list[int], int] | None = None
        row, gap = 0, []  # slice row of the next slice; tokens since the last view closed
        for pos, token in enumerate(ids):
            kind = tag.get(token)
            if token == image_token:
                if view is None:
                    raise LayoutError(f"{self.name}: image placeholder at {pos} outside an <image> or <slice> view")
                view[1].append(pos)
            elif kind in ("open", "slice"):
                if view is not None:
                    raise LayoutError(f"{self.name}: a view opens at {pos} inside another one")
                if kind == "open":
                    images.append([])
                    row = 0
                else:
                    if not images or not images[-1] or gap_ends_image(gap, tokenizer):
                        raise LayoutError(f"{self.name}: <slice> at {pos} does not follow an image's views")
                    if gap:
                        row += 1  # a newline between slices starts the next row
                view, gap = (SOURCE if kind == "open" else "slice", [], row), []
            elif kind in ("close", "end"):
                if view is None or (kind == "close") != (view[0] == SOURCE) or not view[1]:
                    raise LayoutError(f"{self.name}: {tokenizer.convert_ids_to_tokens(token)!r} at {pos} "
                                      f"does not close a view of placeholders")
                images[-1].append(view)
                view = None
            elif view is not None:
                raise LayoutError(f"{self.name}: view at {pos} holds {tokenizer.convert_ids_to_tokens(token)!r}")
            else:
                gap.append(token)
        if view is not None:
            raise LayoutError(f"{self.name}: the last view is not closed")
        return images

    def _earlier_views(self, inputs, example: int, processor) -> int:
        """Views (rows of ``target_sizes``) of the batch's earlier examples: their view-opening tags."""
        tokenizer = getattr(processor, "tokenizer", processor)
        opening = tokenizer.convert_tokens_to_ids([processor.image_start_token, processor.slice_start_token])
        ids = inputs["input_ids"][:example]
        mask = inputs.get("attention_mask")
        valid = mask[:example].bool() if mask is not None else ids == ids
        return int((((ids == opening[0]) | (ids == opening[1])) & valid).sum())

    def _image(self, index: int, views, shapes, sizes, processor) -> ImageLayout:
        """The source view (whole image) and the slices, each covering its share of the stretched image."""
        (kind, run, _), *slices = views
        if kind != SOURCE:
            raise LayoutError(f"{self.name}: image {index} does not start with its <image> source view")
        source = grid_from_run(as_long(run), *shapes[0], name=SOURCE)
        rows = 1 + max((r for _, _, r in slices), default=-1)
        cols = len(slices) // rows if rows else 0
        found = [r for _, _, r in slices]
        if rows and found != [r for r in range(rows) for _ in range(cols)]:
            raise LayoutError(f"{self.name}: image {index}'s slices per row {found} are not a full grid")
        if index < len(sizes):
            expected = self.arrangement(sizes[index], processor)
            if expected != (rows, cols):
                raise LayoutError(
                    f"{self.name}: image {index} of size {tuple(sizes[index])} has {rows}x{cols} slices "
                    f"in the sequence but the image processor arranges it as {expected[0]}x{expected[1]}")
        grids: list[ImageGrid] = [source]
        for s, (_, run, r) in enumerate(slices):
            c = s % cols
            box = (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)
            grids.append(grid_from_run(as_long(run), *shapes[1 + s], name=slice_name(r, c), box=box))
        return ImageLayout(index=index, grids=tuple(grids), main=SOURCE)


def gap_ends_image(gap: list[int], tokenizer) -> bool:
    """Whether the tokens between two views end the image: anything but nothing (same slice row)
    or one newline (next row)."""
    return bool(gap) and tokenizer.decode(gap) != "\n"
