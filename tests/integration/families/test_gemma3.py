"""Gemma 3 layout on the tiny model: each image is one square grid of ``mm_tokens_per_image`` soft
tokens lying strictly between its ``<start_of_image>`` and ``<end_of_image>``; BOI and EOI are
template, and pan-and-scan crops are refused rather than laid out wrongly."""
from __future__ import annotations

import pytest
import torch

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

FAMILY = "gemma3"
PROMPT = "Is there a red heart?"
# Tiny model: 32 px images, 8 px patches -> 4x4 patches, average-pooled 2x2 -> 2x2 soft tokens.
SIDE = 2


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny(FAMILY, device="cpu")


def _ids(model, token: str) -> int:
    return model.tokenizer.convert_tokens_to_ids(token)


def test_soft_token_is_the_placeholder_not_boi(model):
    assert model.config.mm_tokens_per_image == SIDE * SIDE
    assert model.image_token_id == _ids(model, "<image_soft_token>")
    assert model.processor.image_token_id == _ids(model, "<start_of_image>") != model.image_token_id


@pytest.mark.parametrize("n_images", [1, 2])
def test_each_image_grid_sits_between_boi_and_eoi(model, images, n_images):
    batch = model.prepare(images=[images[:n_images]], prompts=[PROMPT])
    ids = batch.input_ids[0]
    layout = batch.layouts[0]
    boi = (ids == _ids(model, "<start_of_image>")).nonzero().flatten()
    eoi = (ids == _ids(model, "<end_of_image>")).nonzero().flatten()
    assert len(boi) == len(eoi) == n_images
    assert layout.image_grids == [(SIDE, SIDE)] * n_images
    for lay, b, e in zip(layout.images, boi.tolist(), eoi.tolist()):
        # Every token strictly between BOI and EOI is a soft token, laid out row-major.
        assert torch.all(ids[b + 1:e] == model.image_token_id)
        assert torch.equal(lay.grid.positions, torch.arange(b + 1, e).reshape(SIDE, SIDE))
    template = set(layout.positions("template").tolist())
    assert set(boi.tolist()) | set(eoi.tolist()) <= template
    assert ids[0] == model.tokenizer.bos_token_id and 0 in template


def test_text_only_prompt_has_no_images(model):
    batch = model.prepare(images=None, prompts=[PROMPT])
    layout = batch.layouts[0]
    assert layout.images == () and layout.positions("image").numel() == 0
    assert model.tokenizer.decode(batch.input_ids[0][layout.positions("prompt")]) == PROMPT


def test_pan_and_scan_crops_raise_layout_error(model, images):
    """A 40x56 image exceeds the 1.2 aspect ratio, so pan-and-scan adds crops (one more soft-token
    run each); the processor drops ``num_crops``, so the adapter must refuse."""
    text = model.family.format_prompt(model.processor, PROMPT, 1)
    inputs = model.processor(text=[text], images=[[images[0]]], return_tensors="pt",
                             do_pan_and_scan=True, pan_and_scan_min_crop_size=8)
    placeholders = (inputs["input_ids"][0] == model.image_token_id).nonzero().flatten()
    assert placeholders.numel() > SIDE * SIDE  # crops were really added
    with pytest.raises(LayoutError, match="pan-and-scan"):
        model.family.image_layouts(inputs, 0, [0], placeholders, model.config, model.processor)
