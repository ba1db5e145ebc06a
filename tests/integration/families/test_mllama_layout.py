"""Mllama: images enter through cross-attention; each is one <|image|> marker plus a tile grid."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPT = "Is there a red heart?"


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("mllama", device="cpu")


def tiled_image(rows: int, cols: int, tile: int) -> Image.Image:
    """An image exactly ``rows x cols`` tiles large, each tile a different grey, brighter row-major."""
    pixels = np.zeros((rows * tile, cols * tile, 3), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            pixels[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = 30 + 50 * (r * cols + c)
    return Image.fromarray(pixels)


def test_markers_and_mode(model, images):
    batch = model.prepare(images=[images], prompts=[PROMPT])
    layout = batch.layouts[0]
    assert layout.image_mode == "cross_attention"
    # independently of the layout code: the marker tokens' strings, and where the processor's
    # cross-attention mask starts letting tokens see each image
    tokens = model.tokenizer.convert_ids_to_tokens(batch.input_ids[0].tolist())
    markers = [i for i, t in enumerate(tokens) if t == "<|image|>"]
    mask = batch.inputs["cross_attention_mask"][0]  # [seq, images, tiles]
    starts = [int(mask[:, k].any(-1).nonzero()[0]) for k in range(len(images))]
    assert markers == starts
    assert [int(img.separators["marker"]) for img in layout.images] == markers
    assert all(img.grids == () and img.grid is None for img in layout.images)
    assert layout.image_grids == [(0, 0), (0, 0)]


def test_cross_attention_layers_and_paths(model):
    fam, hf = model.family, model.hf
    cross = fam.cross_attention_layers(model.config)
    assert cross == [1]
    layers = hf.get_submodule(fam.lm_layers)
    for i, layer in enumerate(layers):
        rel = fam.lm_cross_attn_out if i in cross else fam.lm_attn_out
        layer.get_submodule(rel)
        assert hasattr(layer, "cross_attn") == (i in cross)
    assert len(hf.get_submodule(fam.vision_global_layers)) == fam.n_vision_global_layers(model.config)


@pytest.mark.parametrize("rows, cols", [(1, 1), (1, 2), (3, 1), (2, 2), (1, 4)])
def test_attended_tiles_follow_aspect_ratio(model, rows, cols):
    vision = model.config.vision_config
    tile = vision.image_size
    batch = model.prepare(images=[[tiled_image(rows, cols, tile)]], prompts=[PROMPT])
    attended = batch.layouts[0].images[0].attended
    assert attended["tiles"] == (rows, cols)
    side = vision.image_size // vision.patch_size
    assert attended["patches"] == (side, side)
    assert model.hf.model.vision_model.num_patches == side * side + 1  # + one class state per tile
    # the processor's own tile count, and its tiles in row-major order (each tile's grey level)
    n_tiles = rows * cols
    assert int(batch.inputs["aspect_ratio_mask"][0, 0].sum()) == n_tiles
    means = batch.inputs["pixel_values"][0, 0, :n_tiles].mean(dim=(1, 2, 3))
    assert torch.all(means[1:] > means[:-1])


def test_images_of_different_ratios_in_one_batch(model):
    tile = model.config.vision_config.image_size
    images = [[tiled_image(1, 2, tile)], [tiled_image(3, 1, tile), tiled_image(2, 2, tile)]]
    batch = model.prepare(images=images, prompts=[PROMPT, "Describe the image."])
    assert [img.attended["tiles"] for img in batch.layouts[0].images] == [(1, 2)]
    assert [img.attended["tiles"] for img in batch.layouts[1].images] == [(3, 1), (2, 2)]


def test_wrong_marker_count_raises(model, images):
    batch = model.prepare(images=[images], prompts=[PROMPT])
    ids = batch.input_ids[0]
    placeholders = (ids == model.image_token_id).nonzero().flatten()
    args = (batch.inputs, 0, [0, 1])
    with pytest.raises(LayoutError, match=r"2 images.*holds 1 markers"):
        model.family.image_layouts(*args, placeholders[:1], model.config, model.processor)
    extra = torch.cat([placeholders, placeholders[-1:] + 1])
    with pytest.raises(LayoutError, match=r"2 images.*holds 3 markers"):
        model.family.image_layouts(*args, extra, model.config, model.processor)


def test_removed_image_equals_the_forward_pass_without_pixels(model, images):
    # source_split removes a cross-attended image with the adapter's hide_images and
    # image_write_hooks; transformers' own forward without pixel_values skips the cross-attention
    # layers: the coalitions without the image must score exactly that.
    batch = model.prepare(images=[[images[0]]], prompts=[PROMPT])
    yes, no = (model.continuation_tokens(batch, 0, word)[0] for word in ("yes", "no"))
    split = lp.attribution.source_split(model, batch, target=yes, foil=no)
    text_only = {k: v for k, v in batch.inputs.items()
                 if k not in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")}
    with torch.no_grad():
        logprobs = model.hf(**text_only).logits[0, -1].float().log_softmax(-1)
    torch.testing.assert_close(split.values["prompt"][0], logprobs[yes] - logprobs[no], atol=1e-5, rtol=0)
    # and the image does reach the answer, so the equality is not vacuous
    assert abs(float(split.full[0] - split.values["prompt"][0])) > 1e-4
