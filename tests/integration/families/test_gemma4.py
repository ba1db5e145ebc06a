"""Gemma 4 layout on the tiny model: each image is one run of soft tokens between ``<|image>`` and
``<image|>``, forming a grid whose shape follows the image's aspect ratio; the grids equal the
processor's own arithmetic and token counts, and each grid cell is the pooled block of patches the
vision tower's pooler puts there."""
from __future__ import annotations

import pytest
import torch
from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

import lvlm_probe as lp

FAMILY = "gemma4"
PROMPT = "Is there a red heart?"


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny(FAMILY, device="cpu")


def _ids(model, token: str) -> int:
    return model.tokenizer.convert_tokens_to_ids(token)


def _expected_grid(model, height: int, width: int) -> tuple[int, int]:
    """The soft-token grid from the image processor's resize arithmetic."""
    proc = model.processor.image_processor
    k = proc.pooling_kernel_size
    h, w = get_aspect_ratio_preserving_size(height, width, proc.patch_size,
                                            proc.max_soft_tokens * k * k, k)
    return h // proc.patch_size // k, w // proc.patch_size // k


def test_soft_token_is_the_placeholder(model):
    assert model.image_token_id == _ids(model, "<|image|>") == model.processor.image_token_id
    assert model.config.boi_token_id == _ids(model, "<|image>") != model.image_token_id
    assert model.config.eoi_token_id == _ids(model, "<image|>") != model.image_token_id


@pytest.mark.parametrize("n_images", [1, 2])
def test_grids_match_the_processor(model, images, n_images):
    imgs = images[:n_images]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    layout = batch.layouts[0]
    expected = [_expected_grid(model, img.height, img.width) for img in imgs]
    assert layout.image_grids == expected
    assert len(set(expected)) == n_images  # the two test images really differ in shape
    # the image processor's own token counts, and the processor's count for these sizes
    counts = model.processor.image_processor(imgs)["num_soft_tokens_per_image"]
    assert [r * c for r, c in expected] == [int(n) for n in counts]
    data = model.processor._get_num_multimodal_tokens(image_sizes=[(i.height, i.width) for i in imgs])
    assert data.num_image_tokens == [int(n) for n in counts]
    assert layout.positions("image").numel() == sum(int(n) for n in counts)


@pytest.mark.parametrize("n_images", [1, 2])
def test_each_grid_sits_between_boi_and_eoi(model, images, n_images):
    batch = model.prepare(images=[images[:n_images]], prompts=[PROMPT])
    ids = batch.input_ids[0]
    layout = batch.layouts[0]
    boi = (ids == _ids(model, "<|image>")).nonzero().flatten()
    eoi = (ids == _ids(model, "<image|>")).nonzero().flatten()
    assert len(boi) == len(eoi) == n_images
    for lay, b, e in zip(layout.images, boi.tolist(), eoi.tolist()):
        rows, cols = lay.grid.shape
        # every token strictly between BOI and EOI is a soft token, laid out row-major
        assert torch.all(ids[b + 1:e] == model.image_token_id)
        assert torch.equal(lay.grid.positions, torch.arange(b + 1, e).reshape(rows, cols))
    template = set(layout.positions("template").tolist())
    assert set(boi.tolist()) | set(eoi.tolist()) <= template
    assert ids[0] == model.tokenizer.bos_token_id and 0 in template
    assert model.tokenizer.decode(ids[layout.positions("prompt")]) == PROMPT


def test_grid_cells_are_the_pooled_patch_blocks(model, images):
    """Feed the vision tower's pooler each patch's own (x, y) as its state: the soft token at grid
    cell (r, c) must be the mean over the k x k block of patches x // k = c, y // k = r."""
    batch = model.prepare(images=[images], prompts=[PROMPT])
    pos = batch.inputs["image_position_ids"]
    vision = model.hf.model.vision_tower
    k = vision.config.pooling_kernel_size
    padding = (pos == -1).all(dim=-1)
    states = pos.clamp(min=0).float()  # [images, patches, 2]: (x, y)
    with torch.no_grad():
        pooled, mask = vision.pooler(states, pos, padding, output_length=pos.shape[1] // (k * k))
    pooled = pooled / vision.pooler.root_hidden_size
    for i, lay in enumerate(batch.layouts[0].images):
        rows, cols = lay.grid.shape
        cells = pooled[i][mask[i]]
        assert cells.shape[0] == rows * cols
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        centre = torch.stack([c * k + (k - 1) / 2, r * k + (k - 1) / 2], dim=-1).reshape(-1, 2)
        torch.testing.assert_close(cells, centre)


def test_text_only_prompt_has_no_images(model):
    batch = model.prepare(images=None, prompts=[PROMPT])
    layout = batch.layouts[0]
    assert layout.images == () and layout.positions("image").numel() == 0
    assert model.tokenizer.decode(batch.input_ids[0][layout.positions("prompt")]) == PROMPT
