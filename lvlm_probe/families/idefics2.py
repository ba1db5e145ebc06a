"""Idefics2 (``Idefics2ForConditionalGeneration``): SigLIP-style vision tower, Perceiver resampler,
Mistral LM.

The image processor keeps each image's aspect ratio (its edges are scaled into
``[shortest_edge, longest_edge]``) and pads the batch's images to one size; the model reads each
view's patch grid without the padding (``pixel_attention_mask``, whole patches only). With
``do_image_splitting`` each image is cut into its four quarters (top left, top right, bottom left,
bottom right) before resizing, and the quarters and the whole image are five views, in that order.

The views do not enter the sequence as patches: the connector's Perceiver resampler maps each view
to ``resampler_n_latents`` learned latent queries that cross-attend to its patches, and the queries
replace that many ``<image>`` placeholders. In the text every view is
``<fake_token_around_image>`` + its placeholders, and the image's last view is closed by one more
``<fake_token_around_image>`` (two images in a row share the framing token between them); the
framing tokens keep their text embeddings and are template positions.

Layout: per image, one non-spatial ``[1, resampler_n_latents]`` grid per view, named
``top_left``, ``top_right``, ``bottom_left``, ``bottom_right`` (split images only) and ``global``
(the whole image), each with the box of the image it summarises; ``attended`` maps the same names to
the view's patch grid ``(rows, cols)`` that its queries read.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageLayout, grid_from_run
from .base import Family

CROPS = ("top_left", "top_right", "bottom_left", "bottom_right")
GLOBAL = "global"


class Idefics2(Family):
    name = "idefics2"
    hf_classes = ("Idefics2ForConditionalGeneration",)
    model_types = ("idefics2",)
    image_mode = "queries"
    layout_kind = "queries"
    lm_layers = "model.text_model.layers"
    lm_embed = "model.text_model.embed_tokens"
    lm_norm = "model.text_model.norm"
    vision_layers = "model.vision_model.encoder.layers"
    # modality_projection (vision width -> text width), then the Perceiver resampler
    projector = ("model.connector",)
    resampler_layers: ClassVar[str] = "model.connector.perceiver_resampler.layers"

    default_fake_token = "<fake_token_around_image>"

    def n_latents(self, config) -> int:
        """Placeholders per view: the resampler's latent queries."""
        return int(config.perceiver_config.resampler_n_latents)

    def fake_token_id(self, processor) -> int:
        tokenizer = getattr(processor, "tokenizer", processor)
        token = getattr(processor, "fake_image_token", None) or self.default_fake_token
        return int(tokenizer.convert_tokens_to_ids(token))

    # --- layout --------------------------------------------------------------------------------
    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """One layout per image: a ``[1, n_latents]`` query grid per view, ``attended`` its patch grids.

        The number of views per image comes from ``pixel_values`` as the model reads them (views
        that are all zeros are batch padding, which the model drops).

        Raises:
            LayoutError: if the views do not divide evenly into 1 or 5 per image, the placeholders
                are not ``n_latents`` per view, or a view's placeholders are not one run framed by
                ``<fake_token_around_image>`` on both sides.
        """
        n = self.n_latents(config)
        if not image_ids:
            if placeholders.numel():
                raise LayoutError(f"{placeholders.numel()} image placeholder tokens but no image")
            return []
        grids = view_patch_grids(inputs, example, int(self.vision_config(config).patch_size))
        per_image, rest = divmod(len(grids), len(image_ids))
        if rest or per_image not in (1, len(CROPS) + 1):
            raise LayoutError(
                f"{self.name} example {example}: {len(grids)} views for {len(image_ids)} images; "
                f"expected 1 view per image, or {len(CROPS) + 1} with image splitting"
            )
        if placeholders.numel() != len(grids) * n:
            raise LayoutError(
                f"{self.name} example {example}: expected {len(grids) * n} <image> placeholders "
                f"({len(grids)} views x resampler_n_latents={n}), but the sequence holds "
                f"{placeholders.numel()}"
            )
        runs = list(placeholders.split(n))
        self._check_framing(inputs["input_ids"][example], runs, processor)
        names = (*CROPS, GLOBAL) if per_image > 1 else (GLOBAL,)
        layouts = []
        for k in range(len(image_ids)):
            size = sizes[k] if k < len(sizes) else None
            views = range(k * per_image, (k + 1) * per_image)
            layouts.append(ImageLayout(
                index=k,
                grids=tuple(
                    grid_from_run(runs[v], 1, n, name=name, spatial=False, box=view_box(name, size))
                    for name, v in zip(names, views)
                ),
                attended={name: grids[v] for name, v in zip(names, views)},
            ))
        return layouts

    def _check_framing(self, ids: Tensor, runs: list[Tensor], processor) -> None:
        """Each view's placeholders are consecutive, with a framing token before and after."""
        fake = self.fake_token_id(processor)
        for v, run in enumerate(runs):
            before, after = int(run[0]) - 1, int(run[-1]) + 1
            framed = (
                bool((run.diff() == 1).all()) and before >= 0 and after < ids.numel()
                and int(ids[before]) == fake and int(ids[after]) == fake
            )
            if not framed:
                raise LayoutError(
                    f"{self.name}: the placeholders of view {v} (positions {int(run[0])}..{int(run[-1])}) "
                    "are not one run framed by <fake_token_around_image> on both sides"
                )


def view_patch_grids(inputs, example: int, patch: int) -> list[tuple[int, int]]:
    """``(rows, cols)`` of the patch grid of each view of one example, as the model derives it.

    The model drops views whose ``pixel_values`` are all zeros (batch padding) and keeps the patches
    that ``pixel_attention_mask`` covers whole; the vision tower's embeddings count a view's rows and
    columns along the first column and row of that patch mask.
    """
    pixels = inputs["pixel_values"][example]
    real = (pixels != 0).flatten(1).any(dim=1)
    mask = inputs.get("pixel_attention_mask")
    if mask is None:
        mask = torch.ones(pixels.shape[0], *pixels.shape[-2:], dtype=torch.long)
    else:
        mask = mask[example]
    grids = []
    for v in real.nonzero().flatten().tolist():
        whole = mask[v].unfold(0, patch, patch).unfold(1, patch, patch).sum(dim=(-1, -2)) == patch * patch
        grids.append((int(whole[:, 0].sum()), int(whole[0, :].sum())))
    return grids


def view_box(name: str, size: tuple[int, int] | None) -> tuple[float, float, float, float]:
    """The region of the image a view covers. The processor cuts quarters at ``height // 2`` and
    ``width // 2`` of the image as given (before resizing)."""
    if name == GLOBAL:
        return (0.0, 0.0, 1.0, 1.0)
    y, x = (size[0] // 2 / size[0], size[1] // 2 / size[1]) if size else (0.5, 0.5)
    top, left = name.startswith("top"), name.endswith("left")
    return (0.0 if left else x, 0.0 if top else y, x if left else 1.0, y if top else 1.0)
