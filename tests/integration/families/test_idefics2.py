"""Idefics2 layouts on the tiny model: every view of an image (its four quarters and the whole image
with image splitting, the whole image alone without) is ``resampler_n_latents`` Perceiver queries,
framed by ``<fake_token_around_image>`` (template positions).

Expected view counts come from the processor's ``pixel_values`` (padding views are all zeros);
expected patch grids from its ``pixel_attention_mask`` and from its own resize arithmetic
(``get_resize_output_image_size``); every query position is traced to the image features of its
view through the model's own ``get_image_features``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.idefics2.image_processing_idefics2 import get_resize_output_image_size

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPT = "Is there a red heart?"
SIZES = [(40, 56), (72, 48), (20, 80)]
CROPS = ["top_left", "top_right", "bottom_left", "bottom_right"]
FAKE = "<fake_token_around_image>"


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("idefics2", device="cpu")


@pytest.fixture
def unsplit(model, monkeypatch):
    monkeypatch.setattr(model.processor.image_processor, "do_image_splitting", False)
    return model


def n_latents(model) -> int:
    return model.config.perceiver_config.resampler_n_latents


def resized(model, height: int, width: int) -> tuple[int, int]:
    """The processor's own resize of a ``height x width`` view."""
    size = model.processor.image_processor.size
    return get_resize_output_image_size(torch.empty(3, height, width), size)


def expected_views(model, height: int, width: int, split: bool) -> list[tuple[int, int]]:
    """Processed ``(height, width)`` of each view, in the processor's order."""
    if not split:
        return [resized(model, height, width)]
    h, w = height // 2, width // 2
    quarters = [(h, w), (h, width - w), (height - h, w), (height - h, width - w)]
    return [resized(model, *q) for q in quarters] + [resized(model, height, width)]


def real_views(batch, example: int) -> list[int]:
    pixels = batch.inputs["pixel_values"][example]
    return (pixels != 0).flatten(1).any(dim=1).nonzero().flatten().tolist()


def merged_embeddings(model, batch) -> torch.Tensor:
    """The embeddings the language model receives (image features merged in)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.hf.model.text_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.forward(batch)
    finally:
        handle.remove()
    return seen["embeds"]


def view_features(model, batch) -> list[torch.Tensor]:
    """Per example, ``[views * n_latents, d]`` resampler outputs, from the model itself."""
    with torch.no_grad():
        out = model.hf.model.get_image_features(
            batch.inputs["pixel_values"], batch.inputs["pixel_attention_mask"])
    return out.pooler_output


def check_example(model, batch, example: int, sizes, split: bool):
    layout = batch.layouts[example]
    n, patch = n_latents(model), model.config.vision_config.patch_size
    per_image = 5 if split else 1
    names = CROPS + ["global"] if split else ["global"]
    views = real_views(batch, example)
    assert len(views) == per_image * len(sizes)  # what the processor produced
    mask = batch.inputs["pixel_attention_mask"][example]
    tokens = layout.tokens
    placeholders = [k for k, t in enumerate(tokens) if t == "<image>"]
    assert torch.equal(layout.positions("image"), torch.tensor(placeholders))
    features = view_features(model, batch)[example]
    embeds = merged_embeddings(model, batch)[example]
    for k, (lay, size) in enumerate(zip(layout.images, sizes)):
        assert lay.size == size
        assert [g.name for g in lay.grids] == names
        assert list(lay.attended) == names
        assert lay.grid is None  # queries are not image regions
        for j, (grid, processed) in enumerate(zip(lay.grids, expected_views(model, *size, split))):
            v = k * per_image + j
            assert not grid.spatial and grid.shape == (1, n)
            # the processor's mask covers the resized view; whole patches only
            valid = mask[views[v]]
            assert (int(valid.any(1).sum()), int(valid.any(0).sum())) == processed
            assert lay.attended[grid.name] == (processed[0] // patch, processed[1] // patch)
            # the v-th run of n placeholders, framed by fake tokens
            run = placeholders[v * n:(v + 1) * n]
            assert grid.positions[0].tolist() == run
            assert tokens[run[0] - 1] == FAKE and tokens[run[-1] + 1] == FAKE
            # each query position receives exactly its view's query output
            torch.testing.assert_close(embeds[grid.positions[0]], features[v * n:(v + 1) * n], atol=0, rtol=0)
    fakes = [k for k, t in enumerate(tokens) if t == FAKE]
    assert set(fakes) <= set(layout.positions("template").tolist())
    # one framing token before every view and one after each run of adjacent images
    assert len(fakes) == len(views) + 1


@pytest.mark.parametrize("size", SIZES)
def test_one_image_five_views(model, size):
    img = random_image(*size, seed=3)
    batch = model.prepare(images=[[img]], prompts=[PROMPT])
    assert model.processor.image_processor.do_image_splitting
    check_example(model, batch, 0, [size], split=True)


@pytest.mark.parametrize("size", SIZES)
def test_one_image_without_splitting(unsplit, size):
    model = unsplit
    batch = model.prepare(images=[[random_image(*size, seed=3)]], prompts=[PROMPT])
    check_example(model, batch, 0, [size], split=False)


@pytest.mark.parametrize("split", [True, False])
def test_two_images_share_a_framing_token(model, monkeypatch, split):
    monkeypatch.setattr(model.processor.image_processor, "do_image_splitting", split)
    sizes = SIZES[:2]
    imgs = [random_image(*s, seed=i) for i, s in enumerate(sizes)]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    check_example(model, batch, 0, sizes, split=split)


def test_padding_views_are_dropped(model):
    """An example with fewer images than another has all-zero padding views; they are no image."""
    imgs = [random_image(*s, seed=i) for i, s in enumerate(SIZES[:2])]
    batch = model.prepare(images=[imgs, imgs[1:]], prompts=[PROMPT, PROMPT])
    assert batch.inputs["pixel_values"].shape[1] == 10
    assert len(real_views(batch, 1)) == 5
    check_example(model, batch, 0, SIZES[:2], split=True)
    check_example(model, batch, 1, SIZES[1:2], split=True)


def test_quarters_are_the_boxed_regions(model):
    """The top-left view's pixels are the top-left quarter of the image, processed alone."""
    height, width = SIZES[0]
    img = random_image(height, width, seed=5)
    batch = model.prepare(images=[[img]], prompts=[PROMPT])
    lay = batch.layouts[0].images[0]
    for j, grid in enumerate(lay.grids):
        x0, y0, x1, y1 = grid.box
        region = img.crop((round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)))
        alone = model.processor.image_processor([[region]], do_image_splitting=False, return_tensors="pt")
        h, w = alone["pixel_values"].shape[-2:]
        torch.testing.assert_close(batch.inputs["pixel_values"][0, j, :, :h, :w], alone["pixel_values"][0, 0])


def test_broken_layouts_raise(model, images):
    batch = model.prepare(images=[[images[0]]], prompts=[PROMPT])
    ids = batch.input_ids
    placeholders = (ids[0] == model.image_token_id).nonzero().flatten()
    fam, config, processor = model.family, model.config, model.processor
    n = n_latents(model)
    with pytest.raises(LayoutError, match=rf"expected {5 * n} <image> placeholders .* holds {5 * n - 1}"):
        fam.image_layouts(batch.inputs, 0, [0], placeholders[1:], config, processor)
    with pytest.raises(LayoutError, match="5 views for 2 images"):
        fam.image_layouts(batch.inputs, 0, [0, 1], placeholders, config, processor)
    broken = dict(batch.inputs, input_ids=ids.clone())
    fake = model.tokenizer.convert_tokens_to_ids(FAKE)
    broken["input_ids"][broken["input_ids"] == fake] = model.tokenizer.pad_token_id
    with pytest.raises(LayoutError, match="not one run framed"):
        fam.image_layouts(broken, 0, [0], placeholders, config, processor)


def test_module_paths(model):
    fam, hf = model.family, model.hf
    layers = hf.get_submodule(fam.resampler_layers)
    assert len(layers) == model.config.perceiver_config.resampler_depth
    assert hf.get_submodule(fam.projector[0]).perceiver_resampler.layers is layers
