"""Perception LM's thumbnail and tiles on the tiny model: the tile count comes from the processor's
``pixel_values``, the arrangement from the image processor's own canvas choice, every placeholder is
traced to the pooled feature the model's ``get_image_features`` / ``masked_scatter`` puts there, and
every tile's pixels to its region of the image processor's canvas. The placeholders form one run
per image with no separators; the tokens around them are template tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lvlm_probe as lp
from lvlm_probe.errors import InputError, LayoutError

PROMPT = "Is there a red heart?"
SHAPES = [[(40, 56)], [(72, 48)], [(32, 96)], [(96, 32)], [(20, 100)], [(32, 32)],
          [(32, 96), (96, 32)], [(40, 56), (72, 48)]]


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("perception_lm", device="cpu")


def side(model) -> int:
    """Tokens per tile side: the tower's patches per side pooled by the projector."""
    ip, processor = model.processor.image_processor, model.processor
    assert processor.pooling_ratio == model.config.projector_pooling_ratio
    return ip.tile_size // processor.patch_size // processor.pooling_ratio


def canvas(model, img) -> tuple[torch.Tensor, int, int]:
    """The image stretched to its tile canvas and normalised by the image processor's own
    ``resize`` (which also picks the arrangement) and ``rescale_and_normalize``; and ``rows, cols``."""
    ip = model.processor.image_processor
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
    resized, (cols, rows) = ip.resize(pixels, ip.tile_size, ip.max_num_tiles, resample=ip.resample)
    normalised = ip.rescale_and_normalize(resized, ip.do_rescale, ip.rescale_factor, ip.do_normalize,
                                          ip.image_mean, ip.image_std)
    return normalised[0], rows, cols


def thumbnail(model, img) -> torch.Tensor:
    """The image as one tile: the processor's single-tile ("vanilla") input."""
    out = model.processor.image_processor([img], vision_input_type="vanilla", return_tensors="pt")
    return out["pixel_values"][0, 0]


def coded_sequence(batch, image_token_id: int, per_tile: int) -> torch.Tensor:
    """``[batch, length, 3]``: at each placeholder, ``(image, view, token)`` of the feature the model
    puts there: ``get_image_features`` flattens ``pixel_values`` to one row of pooled features per
    view (images in order, views in order) and ``masked_scatter`` fills the batch's placeholders in
    order."""
    ids = batch.input_ids
    n_images, n_views = batch.inputs["pixel_values"].shape[:2]
    features = torch.stack(torch.meshgrid(torch.arange(n_images), torch.arange(n_views), torch.arange(per_tile),
                                          indexing="ij"), -1)
    codes = torch.full((*ids.shape, 3), float("nan"))
    mask = (ids == image_token_id).unsqueeze(-1).expand_as(codes)
    return codes.masked_scatter(mask, features.reshape(-1, 3).float())


@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "+".join(f"{h}x{w}" for h, w in s))
def test_thumbnail_and_tiles_follow_the_processor_and_the_model(model, shapes):
    imgs = [image(h, w, seed=k) for k, (h, w) in enumerate(shapes)]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    layout = batch.layouts[0]
    n, tile = side(model), model.processor.image_processor.tile_size
    pixels = batch.inputs["pixel_values"]
    codes = coded_sequence(batch, model.image_token_id, n * n)[0]
    a, b = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    assert len(layout.images) == len(imgs) == pixels.shape[0]
    for k, (lay, img) in enumerate(zip(layout.images, imgs)):
        whole, rows, cols = canvas(model, img)
        assert pixels.shape[1] == rows * cols + 1  # the processor's view count: tiles + thumbnail
        assert [g.name for g in lay.grids] == ["thumbnail", "tiles"] and lay.main == "tiles"
        assert not lay.separators
        thumb, tiles = lay.grids
        assert thumb.shape == (n, n) and tiles.shape == (rows * n, cols * n)
        assert thumb.box == tiles.box == (0.0, 0.0, 1.0, 1.0)
        # thumbnail cell (a, b) holds pooled token a * side + b of view 0
        expected = torch.stack([torch.full_like(a, k), torch.zeros_like(a), a * n + b], -1).float()
        assert torch.equal(codes[thumb.positions], expected)
        torch.testing.assert_close(pixels[k, 0], thumbnail(model, img), atol=1e-5, rtol=0)
        for r in range(rows):
            for c in range(cols):
                view = 1 + r * cols + c
                cells = tiles.positions[r * n:(r + 1) * n, c * n:(c + 1) * n]
                expected = torch.stack([torch.full_like(a, k), torch.full_like(a, view), a * n + b], -1).float()
                assert torch.equal(codes[cells], expected), (r, c)
                region = whole[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
                torch.testing.assert_close(pixels[k, view], region, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shapes", [[(40, 56)], [(32, 96), (96, 32)]], ids=["one", "two"])
def test_each_image_is_one_run_between_template_tokens(model, shapes):
    """An image's placeholders are one contiguous run (images side by side with nothing between),
    after the user header and before the prompt; none of them is a separator."""
    imgs = [image(h, w, seed=k) for k, (h, w) in enumerate(shapes)]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    layout, ids = batch.layouts[0], batch.input_ids[0]
    tokens = layout.tokens
    n = side(model)
    views = batch.inputs["pixel_values"].shape[1]
    starts = []
    for lay in layout.images:
        pos = lay.positions
        assert pos.numel() == views * n * n
        assert torch.equal(pos, torch.arange(int(pos[0]), int(pos[0]) + pos.numel()))
        starts.append(int(pos[0]))
    assert starts == [starts[0] + k * views * n * n for k in range(len(imgs))]
    before, after = starts[0] - 1, int(layout.images[-1].positions[-1]) + 1
    template, prompt = set(layout.groups["template"].tolist()), layout.groups["prompt"]
    assert before in template and ids[before] != model.image_token_id
    assert "<|end_header_id|>" in tokens[:before + 1][-3:]
    assert after == int(prompt[0])
    assert model.tokenizer.decode(ids[prompt]).strip() == PROMPT


def test_pooling_averages_row_major_blocks(model):
    """Pooled token (a, b) of a tile averages patches (2a..2a+1, 2b..2b+1): the grid is spatial."""
    pooling = model.hf.model.multi_modal_projector.pooling
    ratio = model.config.projector_pooling_ratio
    patches = side(model) * ratio
    i, j = torch.meshgrid(torch.arange(patches), torch.arange(patches), indexing="ij")
    flat = torch.stack([i, j], -1).float().reshape(1, patches * patches, 2)  # row-major, as the ViT's
    pooled = pooling(flat).reshape(side(model), side(model), 2)
    offset = (ratio - 1) / 2
    for a in range(side(model)):
        for b in range(side(model)):
            assert pooled[a, b].tolist() == [ratio * a + offset, ratio * b + offset]


def test_vision_layers_are_the_timm_blocks(model):
    """The vision hooks read the timm ViT's blocks: one row per view, the class token then the
    patches; the last block's output is what the projector receives (no final norm in PE-Lang)."""
    blocks = model.module(model.family.vision_layers)
    assert len(blocks) == model.vision_layers == model.config.vision_config.model_args["depth"]
    assert blocks is model.hf.model.vision_tower.timm_model.blocks
    batch = model.prepare(images=[[image(40, 56)]], prompts=[PROMPT])
    last = f"vision.blocks.{model.vision_layers - 1}.hook_resid_post"
    with model.capture(last) as cache:
        model.forward(batch)
    pixels = batch.inputs["pixel_values"]
    with torch.no_grad():
        tower = model.hf.model.vision_tower(pixels.flatten(0, 1)).last_hidden_state
    patches = (model.processor.image_processor.tile_size // model.processor.patch_size) ** 2
    assert cache[last].shape == (pixels.shape[1], 1 + patches, model.config.vision_config.model_args["embed_dim"])
    torch.testing.assert_close(cache[last], tower, atol=1e-6, rtol=0)


def test_images_with_different_tile_counts_cannot_share_a_batch(model):
    """``pixel_values`` is one tensor: the processor cannot stack 5 views (2x2 + thumbnail) with 4."""
    counts = [canvas(model, image(*s))[1] * canvas(model, image(*s))[2] + 1 for s in ((40, 56), (32, 96))]
    assert counts[0] != counts[1]
    with pytest.raises(InputError, match="rejected the batch"):
        model.prepare(images=[[image(40, 56), image(32, 96)]], prompts=[PROMPT])


def test_tile_count_disagreeing_with_the_arrangement_raises_layout_error(model):
    batch = model.prepare(images=[[image(40, 56)]], prompts=[PROMPT])
    other = (32, 96)  # 1x3 tiles, not 2x2
    placeholders = (batch.input_ids[0] == model.image_token_id).nonzero().flatten()
    family, config, processor = model.family, model.config, model.processor
    with pytest.raises(LayoutError, match="arranges it as"):
        family.image_layouts(batch.inputs, 0, [0], placeholders, config, processor, sizes=(other,))
    with pytest.raises(LayoutError, match="its size was not given"):
        family.image_layouts(batch.inputs, 0, [0], placeholders, config, processor)
    with pytest.raises(LayoutError, match="placeholder tokens"):
        family.image_layouts(batch.inputs, 0, [0], placeholders[1:], config, processor, sizes=((40, 56),))
