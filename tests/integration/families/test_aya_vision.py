"""Aya Vision's tiled layout on the tiny model: per image, one ``side x side`` grid per crop tile
(row by row, in the arrangement the image processor's ``get_optimal_tiled_canvas`` picks) and one
for the thumbnail, checked against the processor's own tile and token counts; the
``<|START_OF_IMG|>``, ``TILE_i``, ``TILE_GLOBAL`` and ``<|END_OF_IMG|>`` text around the tiles is
template. Each tile grid is traced to the right crop of the image (images made of one solid colour
per tile region) and each cell to the right ``2 x 2`` patches (the model's own ``pixel_shuffle``
on coded features), and the LM's input at every cell is the projector's output for it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPT = "Is there a red heart?"
# tall (2 rows x 1 col), square and large (2 x 2), a strip (1 x 4), small (one tile: thumbnail only)
SIZES = [(72, 48), (100, 100), (20, 100), (40, 56)]


def _noise(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _arrangement(model, size) -> tuple[int, int]:
    """``(rows, cols)`` of crop tiles by the image processor's own rule (``(1, 1)``: no crops)."""
    ip = model.processor.image_processor
    cols, rows = get_optimal_tiled_canvas(size, (ip.size.height, ip.size.width), ip.min_patches,
                                          ip.max_patches)
    return rows, cols


def _colours(rows: int, cols: int) -> np.ndarray:
    """A distinct RGB colour per tile region, ``[rows, cols, 3]``."""
    rng = np.random.default_rng(rows * 10 + cols)
    return rng.permutation(np.linspace(20, 235, rows * cols * 3)).reshape(rows, cols, 3).astype(np.uint8)


def _blocks(model, size) -> tuple[Image.Image, np.ndarray]:
    """An image of ``size`` with one solid colour per tile region of its arrangement."""
    rows, cols = _arrangement(model, size)
    height, width = size
    assert height % rows == 0 and width % cols == 0
    colours = _colours(rows, cols)
    pixels = np.repeat(np.repeat(colours, height // rows, axis=0), width // cols, axis=1)
    return Image.fromarray(pixels), colours


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("aya_vision", device="cpu")


def _side(model) -> int:
    """Tokens per tile side: the processor's ``img_size // patch_size`` (its patch size already
    multiplied by the downsample factor)."""
    proc = model.processor
    assert proc.img_size == model.config.vision_config.image_size
    return proc.img_size // proc.patch_size


def _check_example(model, batch, example: int, sizes: list[tuple[int, int]]):
    """Grids against the processor's counts and arrangement, and the text around each tile."""
    layout = batch.layouts[example]
    ids = batch.input_ids[example]
    tokens = model.tokenizer.convert_ids_to_tokens(ids.tolist())
    template = set(layout.positions("template").tolist())
    side = _side(model)
    counts = model.processor._get_num_multimodal_tokens(image_sizes=sizes)
    assert len(layout.images) == len(sizes)
    for lay, size, n_tiles, n_tokens in zip(layout.images, sizes, counts["num_image_patches"],
                                           counts["num_image_tokens"]):
        rows, cols = _arrangement(model, size)
        assert n_tiles == (rows * cols + 1 if rows * cols > 1 else 1)
        assert lay.positions.numel() == n_tokens == n_tiles * side * side
        assert len(lay.grids) == n_tiles and not lay.separators
        assert all(g.shape == (side, side) for g in lay.grids)
        assert lay.main == "thumbnail" and lay.grids[-1].name == "thumbnail"
        assert lay.grids[-1].box == (0.0, 0.0, 1.0, 1.0)
        names = [g.name for g in lay.grids[:-1]]
        assert names == [f"tile_{r}_{c}" for r in range(rows) for c in range(cols)][:len(names)]
        for t, grid in enumerate(lay.grids[:-1]):
            r, c = divmod(t, cols)
            assert grid.box == (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)
        # each grid is one run of placeholders, row-major, preceded by its label
        for t, grid in enumerate(lay.grids):
            run = grid.positions.flatten()
            assert torch.equal(run, torch.arange(int(run[0]), int(run[0]) + side * side))
            label = model.processor.tile_global_token if grid.name == "thumbnail" else \
                f"{model.processor.tile_token}_{t + 1}"
            before = int(run[0]) - 1
            text = ""
            while not text.endswith(label) and before in template:
                text = tokens[before] + text
                before -= 1
            assert text == label, (text, label)
            if t == 0:  # the image opens with its marker right before the first label
                assert tokens[before] == model.processor.start_of_img_token and before in template
        last = int(lay.positions.max())
        assert tokens[last + 1] == model.processor.end_of_img_token and last + 1 in template
    # the processor writes no line-break tokens between grid rows: rows are implicit
    assert model.processor.img_line_break_token not in tokens


@pytest.mark.parametrize("size", SIZES)
def test_one_image(model, size):
    batch = model.prepare(images=[_noise(*size, seed=0)], prompts=PROMPT)
    assert batch.inputs["pixel_values"].shape[0] == model.processor._get_num_multimodal_tokens(
        image_sizes=[size])["num_image_patches"][0]
    _check_example(model, batch, 0, [size])


def test_two_images_and_a_padded_batch(model):
    prompts = [PROMPT, "Is the blue star above the green circle? Answer yes or no."]
    imgs = [[_noise(*SIZES[3], seed=0)], [_noise(*SIZES[0], seed=1), _noise(*SIZES[1], seed=2)]]
    batch = model.prepare(images=imgs, prompts=prompts)
    _check_example(model, batch, 0, [SIZES[3]])
    _check_example(model, batch, 1, [SIZES[0], SIZES[1]])
    assert batch.layouts[1].describe_images().splitlines() == [
        "tile_0_0 3x3 + tile_1_0 3x3 + thumbnail 3x3",
        "tile_0_0 3x3 + tile_0_1 3x3 + tile_1_0 3x3 + tile_1_1 3x3 + thumbnail 3x3"]


@pytest.mark.parametrize("sizes", [[SIZES[0]], [SIZES[2], SIZES[1]]])
def test_each_tile_shows_its_region(model, sizes):
    """Tile grid ``tile_r_c`` is fed the crop whose pixels are the colour of region (r, c); the
    thumbnail shows every region where its box says."""
    pictures = [_blocks(model, size) for size in sizes]
    batch = model.prepare(images=[[img for img, _ in pictures]], prompts=[PROMPT])
    ip = model.processor.image_processor
    mean = torch.tensor(ip.image_mean)[:, None, None]
    std = torch.tensor(ip.image_std)[:, None, None]
    pixels = batch.inputs["pixel_values"].float() * std + mean  # back to [0, 1]
    tile = ip.size.height
    offset = 0
    for lay, (_, colours) in zip(batch.layouts[0].images, pictures):
        rows, cols = colours.shape[:2]
        expected = torch.from_numpy(colours).float() / 255  # [rows, cols, 3]
        for t, grid in enumerate(lay.grids):
            crop = pixels[offset + t]  # [3, tile, tile]
            for r in range(rows):
                for c in range(cols):
                    if grid.name == "thumbnail":
                        y0, y1 = r * tile // rows, (r + 1) * tile // rows
                        x0, x1 = c * tile // cols, (c + 1) * tile // cols
                        region, colour = crop[:, y0 + 3:y1 - 3, x0 + 3:x1 - 3], expected[r, c]
                    elif grid.name == f"tile_{r}_{c}":
                        region, colour = crop[:, 3:-3, 3:-3], expected[r, c]
                    else:
                        continue
                    got = region.mean((1, 2))
                    assert torch.allclose(got, colour, atol=0.02), (grid.name, r, c, got, colour)
                    # and no other region's colour is as close
                    others = (expected.reshape(-1, 3) - got).abs().amax(-1)
                    assert int((others < 0.02).sum()) == 1
        offset += len(lay.grids)


def test_each_cell_carries_its_own_patches(model):
    """Cell (i, j) of a tile fuses that tile's patches at rows 2i, 2i+1 and columns 2j, 2j+1
    (the model's ``pixel_shuffle`` on features coded by patch position), and the LM's input at the
    cell is the projector's output for that tile and cell."""
    factor = model.config.downsample_factor
    vision = model.config.vision_config
    patches = vision.image_size // vision.patch_size
    side, width = _side(model), vision.hidden_size
    assert patches == side * factor
    r, c = torch.meshgrid(torch.arange(patches), torch.arange(patches), indexing="ij")
    codes = torch.zeros(1, patches * patches, width)
    codes[0, :, 0], codes[0, :, 1] = r.flatten(), c.flatten()
    shuffled = model.hf.model.multi_modal_projector.pixel_shuffle(codes)[0]  # [side, side, f*f*width]
    for i in range(side):
        for j in range(side):
            fused = shuffled[i, j].reshape(factor * factor, width)[:, :2].long().tolist()
            assert sorted(map(tuple, fused)) == [(factor * i + a, factor * j + b)
                                                 for a in range(factor) for b in range(factor)]

    sizes = [SIZES[0], SIZES[3]]
    batch = model.prepare(images=[[_noise(*s, seed=k) for k, s in enumerate(sizes)]], prompts=[PROMPT])
    with model.capture(["projector.hook_out", "blocks.0.hook_resid_pre"]) as cache:
        model.forward(batch)
    projected = cache["projector.hook_out"]  # [tiles, side, side, d_model]
    lm_input = cache["blocks.0.hook_resid_pre"][0]
    grids = [g for lay in batch.layouts[0].images for g in lay.grids]
    assert projected.shape[:3] == (len(grids), side, side)
    for t, grid in enumerate(grids):
        assert torch.equal(lm_input[grid.positions], projected[t])


def test_tile_count_disagreeing_with_the_size_raises(model):
    batch = model.prepare(images=[[_noise(*SIZES[0], seed=0), _noise(*SIZES[1], seed=1)]],
                          prompts=[PROMPT])
    placeholders = batch.layouts[0].positions("image")
    layouts = model.family.image_layouts
    with pytest.raises(LayoutError, match="arranges it as"):  # 100x100 is 2x2, not 2x1
        layouts(batch.inputs, 0, [0, 1], placeholders, model.config, model.processor,
                sizes=(SIZES[1], SIZES[1]))
    with pytest.raises(LayoutError, match="every tile needs"):
        layouts(batch.inputs, 0, [0, 1], placeholders[:-1], model.config, model.processor,
                sizes=tuple(SIZES[:2]))
    with pytest.raises(LayoutError, match="markers"):
        layouts(batch.inputs, 0, [0], placeholders, model.config, model.processor,
                sizes=(SIZES[0],))
