"""DeepSeek-VL layouts on the tiny model: one ``p x p`` grid of ``<image_placeholder>`` tokens per
image (SigLIP patches of the padded square, no class token), adjacent runs for adjacent images.

Expected positions come from the token strings; the grid side from the vision tower's own output;
the padded box from the padding rows and columns in the processor's ``pixel_values``; every
position is traced to its patch's aligner output through the model's ``get_image_features``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPT = "Is there a red heart?"
IMAGE = "<image_placeholder>"
SIZES = [(40, 56), (72, 48), (48, 48), (20, 80)]


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("deepseek_vl", device="cpu")


def patch_features(model, batch) -> torch.Tensor:
    """``[images, patches, d]`` aligner outputs, from the model itself."""
    with torch.no_grad():
        return model.hf.model.get_image_features(batch.inputs["pixel_values"]).pooler_output


def merged_embeddings(model, batch) -> torch.Tensor:
    """The embeddings the language model receives (image features merged in)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.hf.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.forward(batch)
    finally:
        handle.remove()
    return seen["embeds"]


def tower_side(model, batch) -> int:
    """Patch states per side, from the vision tower's output (no class token)."""
    with torch.no_grad():
        states = model.hf.model.vision_model(batch.inputs["pixel_values"]).last_hidden_state
    side = int(states.shape[1] ** 0.5)
    assert side * side == states.shape[1]
    return side


def padding_box(model, pixels: torch.Tensor) -> tuple[float, ...]:
    """The padded square in fractions of the image, from the rows and columns of padding colour."""
    proc = model.processor.image_processor
    fill = (torch.tensor(proc.background_color) / 255 - torch.tensor(proc.image_mean)) / torch.tensor(proc.image_std)
    pad = (pixels - fill[:, None, None]).abs().amax(0) < 1e-5  # [H, W]
    pad_rows, pad_cols = pad.all(1), pad.all(0)
    square = pixels.shape[-1]
    h, w = square - int(pad_rows.sum()), square - int(pad_cols.sum())
    top, left = int(pad_rows.int().argmin()), int(pad_cols.int().argmin())  # leading padding lines
    return (-left / w, -top / h, (square - left) / w, (square - top) / h)


def check_images(model, batch, sizes):
    layout = batch.layouts[0]
    side = tower_side(model, batch)
    placeholders = [k for k, t in enumerate(layout.tokens) if t == IMAGE]
    assert len(placeholders) == len(sizes) * side * side
    features = patch_features(model, batch)
    embeds = merged_embeddings(model, batch)[0]
    for k, (lay, size) in enumerate(zip(layout.images, sizes)):
        (grid,) = lay.grids
        assert grid.name == "patches" and lay.grid is grid and grid.shape == (side, side)
        run = placeholders[k * side * side:(k + 1) * side * side]
        assert grid.positions.reshape(-1).tolist() == run
        assert lay.size == size
        # cell (r, c) holds patch r * side + c of this image
        for r in range(side):
            for c in range(side):
                torch.testing.assert_close(embeds[grid.positions[r, c]], features[k, r * side + c], atol=0, rtol=0)
        expected = padding_box(model, batch.inputs["pixel_values"][k])
        assert grid.box == pytest.approx(expected)
    assert layout.image_grids == [(side, side)] * len(sizes)
    # the template's "User: " comes before the images, the prompt right after them
    before, after = placeholders[0] - 1, placeholders[-1] + 1
    assert before in layout.positions("template").tolist()
    assert int(layout.positions("prompt")[0]) == after


@pytest.mark.parametrize("size", SIZES)
def test_one_image_is_one_square_grid(model, size):
    batch = model.prepare(images=[[random_image(*size, seed=1)]], prompts=[PROMPT])
    check_images(model, batch, [size])
    box = batch.layouts[0].images[0].grids[0].box
    if size[0] == size[1]:
        assert box == (0.0, 0.0, 1.0, 1.0)
    else:  # the padding is along the shorter edge only
        landscape = size[1] > size[0]
        assert (box[0], box[2]) == (0.0, 1.0) if landscape else (box[1], box[3]) == (0.0, 1.0)
        assert (box[1] < 0 < 1 < box[3]) if landscape else (box[0] < 0 < 1 < box[2])


def test_two_images_are_adjacent_runs(model):
    sizes = SIZES[:2]
    batch = model.prepare(images=[[random_image(*s, seed=i) for i, s in enumerate(sizes)]], prompts=[PROMPT])
    check_images(model, batch, sizes)
    first, second = (img.positions for img in batch.layouts[0].images)
    assert int(second[0]) == int(first[-1]) + 1


def test_broken_layouts_raise(model, images, monkeypatch):
    batch = model.prepare(images=[[images[0]]], prompts=[PROMPT])
    placeholders = (batch.input_ids[0] == model.image_token_id).nonzero().flatten()
    fam, config, processor = model.family, model.config, model.processor
    n = placeholders.numel()
    with pytest.raises(LayoutError, match=rf"expected {n} image placeholders .* holds {n - 1}"):
        fam.image_layouts(batch.inputs, 0, [0], placeholders[1:], config, processor)
    gapped = torch.cat([placeholders[:-1], placeholders[-1:] + 1])
    with pytest.raises(LayoutError, match="not consecutive"):
        fam.image_layouts(batch.inputs, 0, [0], gapped, config, processor)
    monkeypatch.setattr(processor, "num_image_tokens", n + 1)
    with pytest.raises(LayoutError, match=f"writes {n + 1} placeholders per image"):
        fam.image_layouts(batch.inputs, 0, [0], placeholders, config, processor)
