"""Validation of the images and prompts users pass, and the processed :class:`Batch`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import ImageTypeError, InputError
from .layout import TokenLayout

ImageLike = Image.Image | np.ndarray | torch.Tensor


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
    torch tensor ``[3, H, W]`` (uint8, or float in [0, 1]).

    Raises:
        ImageTypeError: for any other type or shape, naming what was received.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
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
        return Image.fromarray(image).convert("RGB")
    raise ImageTypeError(
        f"{where}: expected a PIL.Image.Image, numpy array or torch tensor, got {type(image).__name__}"
    )


def normalize(images: Any, prompts: str | list[str]) -> tuple[list[list[Image.Image]], list[str]]:
    """Pair images with prompts: one list of PIL images per prompt.

    ``prompts`` is one string (a single example, ``images`` one image, a list of images or None) or
    a list of strings (``images`` then has one entry per prompt: an image, a list of images or None).

    Raises:
        InputError: if the counts do not match or a prompt is not a string.
        ImageTypeError: for an image of an unsupported type.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
        images = [images]
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
    paired = []
    for i, entry in enumerate(images):
        if entry is None:
            paired.append([])
        elif isinstance(entry, (list, tuple)):
            paired.append([to_pil(img, f"images[{i}][{j}]") for j, img in enumerate(entry)])
        else:
            paired.append([to_pil(entry, f"images[{i}]")])
    return paired, prompts
