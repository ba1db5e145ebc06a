"""PaliGemma layout on the tiny model: each image is one square grid of ``image_seq_length``
``<image>`` tokens, and all image runs come first, right before BOS (no chat template)."""
from __future__ import annotations

import pytest
import torch

import lvlm_probe as lp
from lvlm_probe.errors import InputError

FAMILY = "paligemma"
PROMPT = "Is there a red heart?"
# Tiny model: 32 px images, 8 px patches -> 4x4 patches, no pooling.
SIDE = 4


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny(FAMILY, device="cpu")


def test_config_matches_expected_grid(model):
    vision = model.config.vision_config
    assert (vision.image_size // vision.patch_size) == SIDE
    assert model.processor.image_seq_length == SIDE * SIDE


@pytest.mark.parametrize("n_images", [1, 2])
def test_image_runs_precede_bos_as_square_grids(model, images, n_images):
    batch = model.prepare(images=[images[:n_images]], prompts=[PROMPT])
    ids = batch.input_ids[0].tolist()
    layout = batch.layouts[0]
    image_id = model.tokenizer.convert_tokens_to_ids("<image>")
    n_image_tokens = n_images * SIDE * SIDE
    # Independently of the layout code: the sequence is <image> x N, <bos>, prompt, "\n".
    assert ids[:n_image_tokens] == [image_id] * n_image_tokens
    assert ids[n_image_tokens] == model.tokenizer.bos_token_id
    assert model.tokenizer.decode(ids[n_image_tokens + 1:]) == PROMPT + "\n"

    assert layout.image_grids == [(SIDE, SIDE)] * n_images
    for k, lay in enumerate(layout.images):
        start = k * SIDE * SIDE
        expected = torch.arange(start, start + SIDE * SIDE).reshape(SIDE, SIDE)
        assert torch.equal(lay.grid.positions, expected)
        assert not lay.separators
    assert layout.positions("template").tolist() == [n_image_tokens, len(ids) - 1]  # BOS and "\n"


def test_left_padding_shifts_the_image_run(model, images):
    batch = model.prepare(images=[[images[0]], [images[1]]], prompts=["Is there a heart?", PROMPT])
    pad = int((batch.inputs["attention_mask"][0] == 0).sum())
    assert pad > 0
    grid = batch.layouts[0].images[0].grid.positions
    assert torch.equal(grid, torch.arange(pad, pad + SIDE * SIDE).reshape(SIDE, SIDE))


def test_prompt_without_image_is_rejected(model):
    with pytest.raises(InputError, match="paligemma needs one image"):
        model.prepare(images=None, prompts=[PROMPT])
