"""Ground-truth object masks of a scene: which object covers each pixel or image patch.

The masks come from the same polygons as the rendered image, so they are the reference for
anything spatial: a heatmap's mass on the object asked about, or per-patch labels.
"""
from __future__ import annotations

import numpy as np
from einops import rearrange
from PIL import Image, ImageDraw

from ..errors import InputError
from .render import SUPERSAMPLE, polygon
from .scene import Scene


def object_mask(scene: Scene, size: int | None = None) -> np.ndarray:
    """``[size, size]`` int array: 0 for background, ``k + 1`` where object ``k`` covers most of
    the pixel.

    Drawn like the image (``SUPERSAMPLE`` x finer, later objects on top) and reduced per pixel to
    the label of most sub-samples, so a pixel labelled ``k + 1`` is at least half object ``k``'s
    colour in the rendered image.
    """
    size = scene.image_size if size is None else int(size)
    big = size * SUPERSAMPLE
    canvas = Image.new("I", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    scale = big / scene.image_size
    for k, obj in enumerate(scene.objects):
        draw.polygon(polygon(obj, scale), fill=k + 1)
    # votes per (pixel, label) in one bincount: each sub-sample adds to its pixel's count of its label
    labels = len(scene.objects) + 1
    pixel = np.arange(big) // SUPERSAMPLE
    slot = (pixel[:, None] * size + pixel[None, :]) * labels + np.asarray(canvas, dtype=np.intp)
    counts = np.bincount(slot.ravel(), minlength=size * size * labels).reshape(size, size, labels)
    return counts.argmax(-1)  # ties go to the lower label, as before


def patch_objects(scene: Scene, grid: int, min_fraction: float = 0.125, size: int | None = None) -> np.ndarray:
    """``[grid, grid]`` int array: the object (``k + 1``) covering most of each patch, 0 if no
    object covers at least ``min_fraction`` of it.

    Raises:
        InputError: if the image side is not a multiple of ``grid``.
    """
    mask = object_mask(scene, size)
    if mask.shape[0] % grid:
        raise InputError(f"image side {mask.shape[0]} is not a multiple of the grid {grid}")
    patches = rearrange(mask, "(r h) (c w) -> r c (h w)", r=grid, c=grid)
    counts = np.stack([(patches == k).sum(-1) for k in range(len(scene.objects) + 1)], axis=-1)
    counts[..., 0] = 0
    best = counts.argmax(-1)
    enough = counts.max(-1) >= min_fraction * patches.shape[-1]
    return np.where(enough, best, 0)
