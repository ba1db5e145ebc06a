"""FastVLM's layout on the tiny model: one fixed grid per image, its size the processor's own token
count and the tower's feature map (``pixel_values`` divided by the tower's total stride), laid
row-major over exactly that image's ``<image>`` run; the ``"\\n"`` after each run is a template
token. Every cell is traced through the model: the LM's input at cell ``(r, c)`` is the projector's
output for the tower's feature at map row ``r`` (the image's height axis), column ``c``, and that
feature depends on the pixels of the image's block ``(r, c)``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPT = "Is there a red heart?"
SIZES = [(40, 56), (72, 48), (32, 32)]  # wide, tall, square


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("fast_vlm", device="cpu")


def _grid_shape(model, batch) -> tuple[int, int]:
    """Rows and columns of the tower's map of the processed (resized, centre-cropped) images: the
    image's pixels divided by the processor's stride, which must be the tower's own reduction."""
    height, width = batch.inputs["pixel_values"].shape[-2:]
    patch = model.processor.patch_size
    assert model.hf.model.vision_tower.timm_model.feature_info[-1]["reduction"] == patch
    return height // patch, width // patch


def _runs(ids: torch.Tensor, token_id: int) -> list[torch.Tensor]:
    pos = (ids == token_id).nonzero().flatten()
    breaks = (pos.diff() != 1).nonzero().flatten() + 1
    return list(torch.tensor_split(pos, breaks.tolist())) if pos.numel() else []


def _check_grids(model, batch, example: int, sizes: list[tuple[int, int]], prompt_text: str = PROMPT):
    layout = batch.layouts[example]
    ids = batch.input_ids[example]
    counts = model.processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    runs = _runs(ids, model.image_token_id)
    rows, cols = _grid_shape(model, batch)
    with torch.no_grad():
        maps = model.hf.model.vision_tower(batch.inputs["pixel_values"]).last_hidden_state
    assert tuple(maps.shape[-2:]) == (rows, cols)
    assert len(layout.images) == len(runs) == len(sizes)
    newline = set(model.tokenizer.encode("\n", add_special_tokens=False))
    template = set(layout.positions("template").tolist())
    image = set(layout.positions("image").tolist())
    for lay, run, count in zip(layout.images, runs, counts):
        assert run.numel() == count == rows * cols
        assert len(lay.grids) == 1 and not lay.separators and lay.grid.shape == (rows, cols)
        assert torch.equal(lay.grid.positions.flatten(), run)
        assert set(run.tolist()) <= image
        # the "\n" the template writes after each <image> is a template position
        after = int(run[-1]) + 1
        assert int(ids[after]) in newline and after in template
    # the prompt's tokens follow the last image and spell the prompt
    prompt = layout.positions("prompt")
    assert int(prompt.min()) > int(runs[-1][-1])
    assert model.tokenizer.decode(ids[prompt]).strip() == prompt_text


@pytest.mark.parametrize("size", SIZES)
def test_one_image_grid_matches_processor_count(model, size):
    batch = model.prepare(images=[_image(*size, seed=0)], prompts=PROMPT)
    crop = model.processor.image_processor.crop_size
    assert tuple(batch.inputs["pixel_values"].shape[-2:]) == (crop["height"], crop["width"])
    _check_grids(model, batch, 0, [size])


def test_two_images_and_a_padded_batch(model):
    prompts = [PROMPT, "Is the blue star above the green circle? Answer yes or no."]
    imgs = [[_image(*SIZES[0], seed=0)], [_image(*SIZES[1], seed=1), _image(*SIZES[2], seed=2)]]
    batch = model.prepare(images=imgs, prompts=prompts)
    _check_grids(model, batch, 0, [SIZES[0]])
    _check_grids(model, batch, 1, [SIZES[1], SIZES[2]], prompts[1])


def test_map_rows_follow_the_image_height(model):
    """The tower keeps the image's orientation: a taller-than-wide input gives a map with more rows
    than columns, each the pixels divided by the stride (so the row-major grid is not transposed)."""
    patch = model.processor.patch_size
    pixels = torch.randn(1, 3, 3 * patch, 5 * patch, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tall = model.hf.model.vision_tower(pixels.transpose(-1, -2)).last_hidden_state
        wide = model.hf.model.vision_tower(pixels).last_hidden_state
    assert tuple(tall.shape[-2:]) == (5, 3) and tuple(wide.shape[-2:]) == (3, 5)


@pytest.mark.parametrize("sizes", [[SIZES[0]], [SIZES[1], SIZES[2]]])
def test_each_cell_carries_its_own_map_feature(model, sizes):
    imgs = [_image(*s, seed=k) for k, s in enumerate(sizes)]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    rows, cols = _grid_shape(model, batch)
    with torch.no_grad():
        maps = model.hf.model.vision_tower(batch.inputs["pixel_values"]).last_hidden_state
    with model.capture(["projector.hook_out", "blocks.0.hook_resid_pre"]) as cache:
        model.forward(batch)
    projected = cache["projector.hook_out"]
    lm_input = cache["blocks.0.hook_resid_pre"][0]
    projector = model.hf.model.multi_modal_projector
    assert projected.shape[:2] == (len(imgs), rows * cols)
    for k, lay in enumerate(batch.layouts[0].images):
        for r in range(rows):
            for c in range(cols):
                with torch.no_grad():
                    expected = projector(maps[k, :, r, c])
                torch.testing.assert_close(projected[k, r * cols + c], expected, atol=1e-6, rtol=0)
                assert torch.equal(lm_input[lay.grid.positions[r, c]], projected[k, r * cols + c])


def test_each_cell_depends_on_its_image_block(model):
    """The feature at cell ``(r, c)`` has a non-zero gradient with respect to the pixels of block
    ``(r, c)`` (``patch x patch`` pixels at ``(r * patch, c * patch)``) of its own image, and none
    with respect to the other image's pixels."""
    batch = model.prepare(images=[[_image(*SIZES[0], seed=0), _image(*SIZES[1], seed=1)]], prompts=[PROMPT])
    rows, cols = _grid_shape(model, batch)
    patch = model.processor.patch_size
    pixels = batch.inputs["pixel_values"].clone().requires_grad_(True)
    features = model.hf.model.get_image_features(pixels).pooler_output
    for k in range(2):
        for r in range(rows):
            for c in range(cols):
                (grad,) = torch.autograd.grad(features[k, r * cols + c].square().sum(), pixels,
                                              retain_graph=True)
                block = grad[k, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
                assert block.abs().sum() > 0
                assert grad[1 - k].abs().sum() == 0


def test_placeholder_count_mismatch_raises(model):
    batch = model.prepare(images=[[_image(*SIZES[0], seed=0), _image(*SIZES[1], seed=1)]],
                          prompts=[PROMPT])
    placeholders = batch.layouts[0].positions("image")
    with pytest.raises(LayoutError):
        model.family.image_layouts(batch.inputs, 0, [0, 1], placeholders[:-1], model.config,
                                   model.processor)
    with pytest.raises(LayoutError):  # an even split that is not the processor's grid
        model.family.image_layouts(batch.inputs, 0, [0, 1], placeholders[:-2], model.config,
                                   model.processor)
