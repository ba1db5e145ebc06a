"""ViP-LLaVA's layout on the tiny model: one fixed square grid per image, its size the processor's own
token count, laid over exactly that image's ``<image>`` run; and every cell traced through the
model: the projector's input at cell ``(r, c)`` is the concatenation, in ``vision_feature_layers``
order, of those layers' hidden states at patch ``(r, c)`` (CLS dropped), whose embedding-layer part
is computed from that patch's pixels alone; the LM's input at the cell is the projector's output
for that patch."""
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
    return lp.zoo.tiny("vipllava", device="cpu")


def _side(model) -> int:
    """Patches a side of the processed (cropped) image, from the processor's settings."""
    crop = model.processor.image_processor.crop_size
    patch = model.processor.patch_size
    assert crop["height"] == crop["width"] == model.config.vision_config.image_size
    return crop["height"] // patch


def _runs(ids: torch.Tensor, token_id: int) -> list[torch.Tensor]:
    pos = (ids == token_id).nonzero().flatten()
    breaks = (pos.diff() != 1).nonzero().flatten() + 1
    return list(torch.tensor_split(pos, breaks.tolist())) if pos.numel() else []


def _check_grids(model, batch, example: int, sizes: list[tuple[int, int]]):
    layout = batch.layouts[example]
    ids = batch.input_ids[example]
    counts = model.processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    runs = _runs(ids, model.image_token_id)
    assert len(layout.images) == len(runs) == len(sizes)
    side = _side(model)
    newline = set(model.tokenizer.encode("\n", add_special_tokens=False))
    template = set(layout.positions("template").tolist())
    for lay, run, count in zip(layout.images, runs, counts):
        assert run.numel() == count == side * side == model.config.image_seq_length
        assert len(lay.grids) == 1 and not lay.separators and lay.grid.shape == (side, side)
        assert torch.equal(lay.grid.positions.flatten(), run)
        # the "\n" the template writes after each <image> is a template position
        after = int(run[-1]) + 1
        assert int(ids[after]) in newline and after in template


@pytest.mark.parametrize("size", SIZES)
def test_one_image_grid_matches_processor_count(model, size):
    batch = model.prepare(images=[_image(*size, seed=0)], prompts=PROMPT)
    assert tuple(batch.inputs["pixel_values"].shape[-2:]) == (model.config.vision_config.image_size,) * 2
    _check_grids(model, batch, 0, [size])


def test_two_images_and_a_padded_batch(model):
    prompts = [PROMPT, "Is the blue star above the green circle? Answer yes or no."]
    imgs = [[_image(*SIZES[0], seed=0)], [_image(*SIZES[1], seed=1), _image(*SIZES[2], seed=2)]]
    batch = model.prepare(images=imgs, prompts=prompts)
    _check_grids(model, batch, 0, [SIZES[0]])
    _check_grids(model, batch, 1, [SIZES[1], SIZES[2]])


def _projector_input(model, batch) -> torch.Tensor:
    """What the projector receives: ``[images, patches, layers * vision width]``."""
    seen = []
    handle = model.hf.model.multi_modal_projector.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model.hf(**batch.inputs)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("sizes", [[SIZES[0]], [SIZES[1], SIZES[2]]])
def test_each_cell_carries_its_own_patch(model, sizes):
    imgs = [_image(*s, seed=k) for k, s in enumerate(sizes)]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    side, patch = _side(model), model.processor.patch_size
    layers = list(model.config.vision_feature_layers)
    width = model.config.vision_config.hidden_size
    pixels = batch.inputs["pixel_values"]
    tower = model.hf.model.vision_tower
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states
    features = _projector_input(model, batch)
    assert features.shape == (len(imgs), side * side, len(layers) * width)
    with model.capture(["projector.hook_out", "blocks.0.hook_resid_pre"]) as cache:
        model.forward(batch)
    projected = cache["projector.hook_out"]
    lm_input = cache["blocks.0.hook_resid_pre"][0]
    embed = tower.embeddings
    for k, lay in enumerate(batch.layouts[0].images):
        for r in range(side):
            for c in range(side):
                n = r * side + c
                # layer slices in vision_feature_layers order, CLS (position 0) dropped
                expected = torch.cat([hidden[layer][k, 1 + n] for layer in layers])
                assert torch.equal(features[k, n], expected)
                # the embeddings' slice comes from the pixels of patch (r, c) alone
                crop = pixels[k:k + 1, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
                with torch.no_grad():
                    alone = embed.patch_embedding(crop).flatten() + embed.position_embedding.weight[1 + n]
                    alone = tower.pre_layrnorm(alone)
                at = layers.index(0) * width
                torch.testing.assert_close(features[k, n, at:at + width], alone, atol=1e-5, rtol=0)
                assert torch.equal(lm_input[lay.grid.positions[r, c]], projected[k, n])


def test_changing_one_patch_changes_only_its_cell_embedding(model):
    """Pixels of patch (r, c) reach the embedding-layer slice of exactly cell (r, c)'s features."""
    batch = model.prepare(images=[_image(*SIZES[0], seed=0)], prompts=[PROMPT])
    side, patch = _side(model), model.processor.patch_size
    width = model.config.vision_config.hidden_size
    at = list(model.config.vision_feature_layers).index(0) * width
    before = _projector_input(model, batch)[0, :, at:at + width]
    r, c = 1, side - 1
    changed = batch.inputs["pixel_values"].clone()
    changed[0, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] += 1.0
    batch.inputs["pixel_values"] = changed
    after = _projector_input(model, batch)[0, :, at:at + width]
    moved = (after - before).abs().amax(-1) > 1e-6
    cell = batch.layouts[0].images[0].grid.positions[r, c]
    run = batch.layouts[0].images[0].positions
    assert moved.nonzero().flatten().tolist() == [r * side + c]
    assert int(run[r * side + c]) == int(cell)


def test_placeholder_count_mismatch_raises(model):
    batch = model.prepare(images=[[_image(*SIZES[0], seed=0), _image(*SIZES[1], seed=1)]],
                          prompts=[PROMPT])
    placeholders = batch.layouts[0].positions("image")
    with pytest.raises(LayoutError):
        model.family.image_layouts(batch.inputs, 0, [0, 1], placeholders[:-1], model.config,
                                   model.processor)
