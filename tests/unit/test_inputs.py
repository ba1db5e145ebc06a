"""Image conversion and prompt/image pairing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_probe.errors import ImageTypeError, InputError
from lvlm_probe.inputs import has_alpha, normalize, to_pil
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


def test_one_prompt_string_pairs_with_one_image_only():
    img = np.zeros((4, 4, 3), dtype=np.uint8)
    for one in (img, [img]):  # an image, or a list of one, with one string: one example
        images, prompts = normalize(one, "q")
        assert [len(x) for x in images] == [1] and prompts == ["q"]
    images, _ = normalize([[img, img]], "q")  # the explicit spelling of one two-image example
    assert [len(x) for x in images] == [2]
    with pytest.raises(InputError, match=r"prompts is one string \('q'\) but images holds 3 entries.*"
                                         r"images=\[\[\.\.\.\]\].*prompts=\['q'\] \* 3"):
        normalize([img, img, img], "q")


def test_transparent_pixels_become_white_whatever_the_image_type():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)  # transparent black ...
    rgba[0, 0] = (10, 20, 30, 255)  # ... but one opaque pixel
    white_but_one = np.full((2, 3, 3), 255, dtype=np.uint8)
    white_but_one[0, 0] = (10, 20, 30)
    palette = Image.new("P", (3, 2), 0)
    palette.info["transparency"] = 0  # palette index 0 (black) is transparent
    for image in (rgba, Image.fromarray(rgba), Image.fromarray(rgba).convert("LA"), palette):
        assert has_alpha(image)
    assert np.array_equal(np.asarray(to_pil(rgba)), white_but_one)
    assert np.array_equal(np.asarray(to_pil(Image.fromarray(rgba))), white_but_one)
    assert (np.asarray(to_pil(palette)) == 255).all()
    assert not has_alpha(rgba[:, :, :3]) and not has_alpha(Image.new("RGB", (2, 2)))


def test_normalize_warns_once_for_blank_prompts_and_transparent_images():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    with pytest.warns(UserWarning) as caught:
        normalize([rgba, rgba, None], ["", "a question", " \t"])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages
    assert messages[0].startswith("prompt(s) [0, 2] are empty or blank")
    assert messages[1].startswith("images[0], images[1] have transparency")
    assert "composited on white (255, 255, 255)" in messages[1]
