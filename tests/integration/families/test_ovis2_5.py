"""Ovis2.5 layouts on the tiny model: one grid per image, ``image_grid_thw`` merged by the spatial
merge size, framed by the image start and end tokens (template tokens whose embeddings the model
replaces by the visual table's indicator rows, the same for every image).

Each grid cell is traced to its image region through pixels alone: in a copy of the model whose
vision layers write nothing and whose position table is zero, the embedding at a cell is the visual
tokenizer and table applied to the patch embeddings of that cell's ``merge x merge`` block of the
resized image, which does not depend on the order in which the tower visits the blocks."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import SizeDict

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPT = "Is there a red heart?"
SHAPES = [[(40, 56)], [(72, 48)], [(20, 100)], [(32, 32)], [(64, 64)], [(40, 56), (72, 48)],
          [(20, 100), (32, 32)]]


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("ovis2_5", device="cpu")


@pytest.fixture(scope="module")
def transparent(model):
    """A copy of the model whose vision layers add nothing (attention and MLP outputs zero) and
    whose learned position table is zero: a token's feature depends on its own block's pixels only."""
    hf = copy.deepcopy(model.hf)
    tower = hf.model.vision_tower
    with torch.no_grad():
        tower.embeddings.position_embedding.weight.zero_()
        for layer in tower.layers:
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
    return hf


def resized(model, img) -> torch.Tensor:
    """The image as the image processor resizes and normalises it, ``[3, H, W]``."""
    ip = model.processor.image_processor
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
    size = SizeDict(**ip.size) if isinstance(ip.size, dict) else ip.size
    out = ip.resize(pixels, size=size, resample=ip.resample, factor=ip.patch_size * ip.merge_size,
                    temporal_factor=ip.temporal_patch_size)
    return ip.rescale_and_normalize(out, ip.do_rescale, ip.rescale_factor, ip.do_normalize, ip.image_mean,
                                    ip.image_std)[0]


def lm_embeddings(hf, batch) -> torch.Tensor:
    """The embeddings the language model receives, from the model's own forward pass."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = hf.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            hf(**batch.inputs)
    finally:
        handle.remove()
    return seen["embeds"]


def block_feature(hf, pixels: torch.Tensor, r: int, c: int, patch: int, merge: int) -> torch.Tensor:
    """The transparent model's feature of merged block ``(r, c)``: its patches row-major, patch
    embeddings, then the visual tokenizer and table."""
    side = patch * merge
    block = pixels[:, r * side:(r + 1) * side, c * side:(c + 1) * side]
    patches = [block[:, a * patch:(a + 1) * patch, b * patch:(b + 1) * patch] for a in range(merge) for b in range(merge)]
    with torch.no_grad():
        embedded = hf.model.vision_tower.embeddings.patch_embedding(torch.stack(patches)).flatten(1)
        return hf.model.multi_modal_projector(embedded)[0]


@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "+".join(f"{h}x{w}" for h, w in s))
def test_each_cell_holds_its_block(model, transparent, shapes):
    imgs = [image(h, w, seed=k) for k, (h, w) in enumerate(shapes)]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    layout, processor = batch.layouts[0], model.processor
    ip = processor.image_processor
    merge, patch = ip.merge_size, ip.patch_size
    assert merge == model.config.vision_config.spatial_merge_size and patch == model.config.vision_config.patch_size
    grid_thw = batch.inputs["image_grid_thw"]
    counts = processor._get_num_multimodal_tokens(image_sizes=shapes)["num_image_tokens"]
    embeds = lm_embeddings(transparent, batch)[0]
    for k, (lay, img) in enumerate(zip(layout.images, imgs)):
        (grid,) = lay.grids
        t, h, w = grid_thw[k].tolist()
        assert t == 1 and grid.name == "patches" and grid.shape == (h // merge, w // merge)
        assert grid.positions.numel() == counts[k] and not lay.separators
        assert grid.box == (0.0, 0.0, 1.0, 1.0)
        pixels = resized(model, img)
        assert tuple(pixels.shape[1:]) == (h * patch, w * patch)
        for r in range(h // merge):
            for c in range(w // merge):
                expected = block_feature(transparent, pixels, r, c, patch, merge)
                torch.testing.assert_close(embeds[grid.positions[r, c]], expected, atol=1e-5, rtol=1e-4)


def test_window_order_is_not_row_major_on_a_wide_image(model):
    """The 40x56 image spans two windows, so the sequence order differs from row-major: the
    trace above would fail for a row-major layout."""
    batch = model.prepare(images=[[image(40, 56)]], prompts=[PROMPT])
    grid = batch.layouts[0].images[0].grids[0]
    flat = grid.positions.reshape(-1)
    assert not bool((flat.diff() > 0).all())
    assert torch.equal(flat.sort().values, torch.arange(int(flat.min()), int(flat.max()) + 1))


@pytest.mark.parametrize("shapes", [[(40, 56)], [(40, 56), (20, 100)]], ids=["one", "two"])
def test_start_and_end_tokens_frame_each_image_as_template(model, shapes):
    imgs = [image(h, w, seed=k) for k, (h, w) in enumerate(shapes)]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    layout, processor, config = batch.layouts[0], model.processor, model.config
    ids, tokens = batch.input_ids[0], layout.tokens
    template = set(layout.groups["template"].tolist())
    embeds = lm_embeddings(model.hf, batch)[0]
    indicators = model.hf.model.multi_modal_projector.get_visual_indicator_features(embeds.device)
    for lay in layout.images:
        first, last = int(lay.positions.min()), int(lay.positions.max())
        assert torch.equal(lay.positions, torch.arange(first, last + 1))
        assert tokens[first - 1] == processor.image_start_token and first - 1 in template
        assert tokens[last + 1] == processor.image_end_token and last + 1 in template
        # the indicator rows, the same for every image
        assert torch.equal(embeds[first - 1], indicators[0]) and torch.equal(embeds[last + 1], indicators[1])
    assert int((ids == config.image_start_token_id).sum()) == int((ids == config.image_end_token_id).sum()) == len(imgs)
    for left, right in zip(layout.images, layout.images[1:]):
        between = set(range(int(left.positions.max()) + 1, int(right.positions.min())))
        assert len(between) > 2 and between <= template
    prompt = layout.groups["prompt"]
    assert int(prompt[0]) > int(layout.images[-1].positions.max()) + 1
    assert model.tokenizer.decode(ids[prompt]).strip() == PROMPT


def test_wrong_counts_raise_layout_error(model):
    batch = model.prepare(images=[[image(40, 56)]], prompts=[PROMPT])
    placeholders = (batch.input_ids[0] == model.image_token_id).nonzero().flatten()
    family, config, processor = model.family, model.config, model.processor
    with pytest.raises(LayoutError, match="placeholder tokens"):
        family.image_layouts(batch.inputs, 0, [0], placeholders[1:], config, processor)
    with pytest.raises(LayoutError, match="not one run between"):
        family.image_layouts(batch.inputs, 0, [0], placeholders + 1, config, processor)
    inputs = dict(batch.inputs, image_grid_thw=torch.tensor([[1, 3, 8]]))
    with pytest.raises(LayoutError, match="whole 2x2 blocks"):
        family.image_layouts(inputs, 0, [0], placeholders, config, processor)
