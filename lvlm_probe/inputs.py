"""Validation of the images and prompts users pass, and the processed :class:`Batch`."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import ImageTypeError, InputError
from .layout import TokenLayout

ImageLike = Image.Image | np.ndarray | torch.Tensor
# Where an image is transparent, the model sees this colour: models take RGB, and white is what a
# transparent picture shows on a page (dropping the alpha channel instead shows whatever colour
# the transparent pixels happen to store, usually black).
BACKGROUND = (255, 255, 255)


@dataclass
class Batch:
    """Processed inputs for a batch of (images, prompt) examples.

    Attributes:
        inputs: the processor's output on the model's device, exactly what the HF model receives.
        layouts: one :class:`TokenLayout` per example.
        prompts: the user prompts.
        texts: the templated texts given to the processor.
        images: the PIL images of each example.
    """

    inputs: Any
    layouts: list[TokenLayout]
    prompts: list[str]
    texts: list[str]
    images: list[list[Image.Image]]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]


def to_pil(image: Any, where: str = "image") -> Image.Image:
    """Convert one image to an RGB PIL image.

    Accepts a PIL image, a numpy array ``[H, W]``/``[H, W, 3|4]`` (uint8, or float in [0, 1]), or a
    torch tensor ``[3, H, W]`` (uint8, or float in [0, 1]). An image with transparency (an alpha
    channel, or a palette with a transparent colour) is composited on white (``BACKGROUND``);
    :func:`has_alpha` tells which images were.

    Raises:
        ImageTypeError: for any other type or shape, naming what was received.
    """
    if isinstance(image, Image.Image):
        return _flatten(image)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ImageTypeError(f"{where}: expected a tensor [3, H, W], got shape {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ImageTypeError(f"{where}: expected an array [H, W] or [H, W, 3], got shape {image.shape}")
        if image.dtype != np.uint8:
            if not np.issubdtype(image.dtype, np.floating):
                raise ImageTypeError(f"{where}: expected uint8 or float pixels, got dtype {image.dtype}")
            image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        return _flatten(Image.fromarray(image))
    raise ImageTypeError(
        f"{where}: expected a PIL.Image.Image, numpy array or torch tensor, got {type(image).__name__}"
    )


def has_alpha(image: Any) -> bool:
    """Whether an image carries transparency: an alpha channel (RGBA, LA, PA, ``[H, W, 4]``) or a
    palette or grey image with a transparent colour."""
    if isinstance(image, Image.Image):
        return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if isinstance(image, np.ndarray):
        return image.ndim == 3 and image.shape[2] == 4
    return False


def _flatten(image: Image.Image) -> Image.Image:
    """An RGB image; transparent pixels become ``BACKGROUND`` (see :func:`to_pil`)."""
    if not has_alpha(image):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def normalize(images: Any, prompts: str | list[str]) -> tuple[list[list[Image.Image]], list[str]]:
    """Pair images with prompts: one list of PIL images per prompt.

    ``prompts`` is one string (a single example: ``images`` one image, a list of one image, or
    None) or a list of strings (``images`` then has one entry per prompt: an image, a list of
    images or None). One string with several images is refused rather than guessed: spell one
    example with two images ``images=[[a, b]], prompts=["q"]`` and two examples with one image
    each ``images=[a, b], prompts=["q", "q"]``.

    Warns:
        UserWarning: once per call for empty (or blank) prompts and once for images with
            transparency, which are composited on white (``BACKGROUND``).

    Raises:
        InputError: if the counts do not match, a prompt is not a string, or one prompt string
            comes with several images.
        ImageTypeError: for an image of an unsupported type.
    """
    if isinstance(prompts, str):
        if isinstance(images, (list, tuple)) and len(images) > 1:
            raise InputError(
                f"prompts is one string ({_short(prompts)}) but images holds {len(images)} entries; "
                f"for one example with {len(images)} images pass images=[[...]] (a list inside a "
                f"list) and prompts=[{_short(prompts)}]; for {len(images)} examples pass one prompt "
                f"per image: prompts=[{_short(prompts)}] * {len(images)}"
            )
        prompts = [prompts]
        images = [images[0] if isinstance(images, (list, tuple)) and images else images]
    elif isinstance(prompts, (list, tuple)):
        prompts = list(prompts)
        if images is None:
            images = [None] * len(prompts)
        elif not isinstance(images, (list, tuple)):
            raise InputError(
                f"with {len(prompts)} prompts, images must be a list of {len(prompts)} entries "
                f"(an image, a list of images or None each), got {type(images).__name__}"
            )
    else:
        raise InputError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise InputError("prompts is empty; expected at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InputError(f"prompts[{i}] must be a string, got {type(p).__name__}")
    if len(images) != len(prompts):
        raise InputError(
            f"got {len(images)} image entries for {len(prompts)} prompts; expected one entry (an image, "
            "a list of images or None) per prompt"
        )
    blank = [i for i, p in enumerate(prompts) if not p.strip()]
    if blank:
        warnings.warn(f"prompt(s) {blank[:10]} {'is' if len(blank) == 1 else 'are'} empty or blank: "
                      "the model sees its chat template and the image(s) with no question, so "
                      "layouts have no prompt positions; pass the question, e.g. prompts=['Describe "
                      "the image.']", UserWarning, stacklevel=3)
    paired, transparent = [], []
    for i, entry in enumerate(images):
        entries = [] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry]
        names = [f"images[{i}][{j}]" if isinstance(entry, (list, tuple)) else f"images[{i}]"
                 for j in range(len(entries))]
        transparent += [name for name, img in zip(names, entries) if has_alpha(img)]
        paired.append([to_pil(img, name) for name, img in zip(names, entries)])
    if transparent:
        warnings.warn(f"{', '.join(transparent[:5])}{' ...' if len(transparent) > 5 else ''} "
                      f"{'has' if len(transparent) == 1 else 'have'} transparency (an alpha channel); "
                      f"models take RGB, so transparent pixels were composited on white {BACKGROUND}; "
                      "composite them yourself (PIL's Image.alpha_composite) for another background",
                      UserWarning, stacklevel=3)
    return paired, prompts


def _short(prompt: str, limit: int = 40) -> str:
    """A prompt as Python would write it, cut to ``limit`` characters for a message."""
    return repr(prompt if len(prompt) <= limit else prompt[:limit] + "...")
