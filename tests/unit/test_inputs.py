"""Image conversion and prompt/image pairing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_probe.errors import ImageTypeError, InputError
from lvlm_probe.inputs import normalize, to_pil
from lvlm_probe.model import resolve_dtype


def test_image_types_convert_to_the_same_pixels():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    ref = np.asarray(to_pil(Image.fromarray(arr)))
    assert np.array_equal(np.asarray(to_pil(arr)), ref)
    assert np.array_equal(np.asarray(to_pil(torch.from_numpy(arr).permute(2, 0, 1))), ref)
    assert np.array_equal(np.asarray(to_pil(arr.astype(np.float32) / 255)), ref)
    assert to_pil(arr[:, :, 0]).mode == "RGB"


def test_pairing_shapes():
    img = np.zeros((4, 4, 3), dtype=np.uint8)
    images, prompts = normalize(img, "one prompt")
    assert len(images) == 1 and len(images[0]) == 1 and prompts == ["one prompt"]
    images, _ = normalize([img, [img, img], None], ["a", "b", "c"])
    assert [len(x) for x in images] == [1, 2, 0]
    images, _ = normalize(None, ["a", "b"])
    assert images == [[], []]


def test_bad_pairings():
    with pytest.raises(InputError, match="prompts is empty"):
        normalize([], [])
    with pytest.raises(InputError, match="got dict"):
        normalize(None, {"a": 1})
    with pytest.raises(ImageTypeError, match=r"images\[1\]\[0\]: expected a PIL"):
        normalize([None, [object()]], ["a", "b"])


def test_dtypes():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype(torch.float16) is torch.float16
