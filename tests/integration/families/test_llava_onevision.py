"""LLaVA-OneVision's layout on the tiny model: anyres grids for single-image prompts (with the
"anyres_max_9" downscaling of large tile maps), base grids for multi-image prompts, each grid cell
and newline traced to the feature transformers' ``pack_image_features`` puts at that position."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPT = "Is there a red heart?"
SIDE = 4  # tiny tile: 32 px / 8 px patches

# (height, width) -> (tiles high, tiles wide), tile map (rows, cols), crop offset or None when the
# map is downscaled. Pinpoints are every 32 * (h, w) with h, w in 1..6; anyres_max_9 downscales a
# map of more than 1.1^2 * 9 tiles' features by ratio = sqrt(rows * cols / (9 * 16)).
#   40x56 -> 64x64 (2x2, 8x8): round(40 * 8/56) = 6 rows, crop (8 - 6) // 2 = 1: 6x8 from row 1.
#   20x100 -> 32x128 (1x4, 4x16): round(20 * 16/100) = 3 rows, crop (4 - 3) // 2 = 0: 4x16.
#   190x190 -> 192x192 (6x6, 24x24), nothing cropped; ratio 2: 12x12.
#   100x260 -> 96x192 (3x6, 12x24): round(100 * 24/260) = 9 rows, crop 1: 10x24; ratio
#            sqrt(240/144) = 1.29: int(10 // 1.29) x int(24 // 1.29) = 7x18.
EXPECTED = {
    (40, 56): ((2, 2), (6, 8), (1, 0)),
    (20, 100): ((1, 4), (4, 16), (0, 0)),
    (190, 190): ((6, 6), (12, 12), None),
    (100, 260): ((3, 6), (7, 18), None),
}


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("llava_onevision", device="cpu")


def coded_sequence(model, batch, example: int = 0) -> torch.Tensor:
    """``[length, 4]`` codes of what the model places at each position of one example.

    Each vision feature is replaced by its origin ``[is_base, row, col, is_newline]`` (tile-map
    coordinates for tiles), the newline embedding by ``[0, 0, 0, 1]``; the real
    ``pack_image_features`` arranges (and, past the budget, interpolates) them. Only the model's own
    rule decides which images are tiled: those alone in their prompt (``batch_num_images``)."""
    config = model.config
    sizes = batch.inputs["image_sizes"]
    alone = [int(n) == 1 for n in batch.inputs["batch_num_images"] for _ in range(int(n))]
    i, j = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    features = []
    for size, tiled in zip(sizes, alone):
        tiles = [torch.stack([torch.ones_like(i), i, j, torch.zeros_like(i)], -1)]
        if tiled:
            n_h, n_w = get_anyres_image_grid_shape(size.tolist(), config.image_grid_pinpoints, 32)
            for t in range(n_h * n_w):
                r0, c0 = (t // n_w) * SIDE, (t % n_w) * SIDE
                tiles.append(torch.stack([torch.zeros_like(i), i + r0, j + c0, torch.zeros_like(i)], -1))
        features.append(torch.stack(tiles).reshape(len(tiles), SIDE * SIDE, 4).float())
    newline = torch.tensor([0.0, 0.0, 0.0, 1.0])
    packed, _ = model.hf.model.pack_image_features(
        features, sizes, image_newline=newline, vision_aspect_ratio=config.vision_aspect_ratio
    )
    first = sum(len(x) for x in batch.images[:example])  # index of its first image in the flat list
    ids = batch.input_ids[example]
    codes = torch.full((ids.numel(), 4), float("nan"))
    codes[ids == model.image_token_id] = torch.cat(packed[first: first + len(batch.images[example])])
    return codes


def base_codes() -> torch.Tensor:
    i, j = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    return torch.stack([torch.ones_like(i), i, j, 0 * i], -1).float()


@pytest.mark.parametrize("size", list(EXPECTED))
def test_single_image_grids_and_cells_follow_pack_image_features(model, size):
    batch = model.prepare(images=[[image(*size)]], prompts=[PROMPT])
    (lay,) = batch.layouts[0].images
    (n_h, n_w), (rows, cols), offset = EXPECTED[size]
    assert get_anyres_image_grid_shape(list(size), model.config.image_grid_pinpoints, 32) == (n_h, n_w)
    # the processor's own count (after its downscaling) agrees with the hand derivation
    assert model.processor._get_unpadded_features(*size, SIDE, SIDE, n_h, n_w) == (rows * cols, rows)
    grids = {g.name: g for g in lay.grids}
    assert set(grids) == {"base", "tiles"} and lay.main == "tiles" and lay.grid.name == "tiles"
    assert grids["base"].shape == (SIDE, SIDE) and grids["tiles"].shape == (rows, cols)
    base, tiles, newline = grids["base"].positions, grids["tiles"].positions, lay.separators["newline"]
    assert set(lay.separators) == {"newline"} and newline.numel() == rows
    assert base.max() < tiles.min() and torch.equal(newline, tiles[:, -1] + 1)

    codes = coded_sequence(model, batch)
    assert torch.equal(codes[base], base_codes())
    assert torch.equal(codes[newline], torch.tensor([[0.0, 0, 0, 1]]).expand(rows, 4))
    cells = codes[tiles]
    assert (cells[..., 0] == 0).all() and (cells[..., 3] == 0).all()
    if offset is not None:
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        assert torch.equal(cells[..., 1], (r + offset[0]).float())
        assert torch.equal(cells[..., 2], (c + offset[1]).float())
    else:  # downscaled: a cell's source row depends on its row only and grows down the grid
        assert torch.allclose(cells[..., 1], cells[:, :1, 1].expand(rows, cols))
        assert torch.allclose(cells[..., 2], cells[:1, :, 2].expand(rows, cols))
        assert (cells[1:, 0, 1] > cells[:-1, 0, 1]).all() and (cells[0, 1:, 2] > cells[0, :-1, 2]).all()


def test_multi_image_prompt_packs_base_grids_with_one_newline_each(model):
    imgs = [image(40, 56, seed=1), image(72, 48, seed=2)]
    assert model.family.processor_images([imgs]) == [imgs]  # per prompt, so the processor counts them
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    assert batch.inputs["batch_num_images"].tolist() == [2]
    codes = coded_sequence(model, batch)
    layout = batch.layouts[0]
    assert len(layout.images) == 2
    for lay in layout.images:
        assert [g.name for g in lay.grids] == ["base"] and lay.main == "base"
        assert lay.grid.shape == (SIDE, SIDE)
        (newline,) = lay.separators["newline"]
        assert newline == lay.grid.positions.max() + 1
        assert torch.equal(codes[lay.grid.positions], base_codes())
        assert torch.equal(codes[newline], torch.tensor([0.0, 0, 0, 1]))
    assert layout.images[0].positions.max() < layout.images[1].positions.min()


def test_batch_of_single_image_prompts_tiles_each_and_allows_a_text_only_prompt(model):
    shapes = [(40, 56), (20, 100)]
    batch = model.prepare(images=[[image(*shapes[0])], [], [image(*shapes[1])]],
                          prompts=[PROMPT, "How many shapes are there?", PROMPT])
    assert batch.inputs["batch_num_images"].tolist() == [1, 1]
    assert batch.layouts[1].images == () and batch.layouts[1].positions("image").numel() == 0
    for example, size in ((0, shapes[0]), (2, shapes[1])):
        (lay,) = batch.layouts[example].images
        assert lay.grid.shape == EXPECTED[size][1]
        codes = coded_sequence(model, batch, example)
        assert torch.equal(codes[lay.separators["newline"]][:, 3], torch.ones(EXPECTED[size][1][0]))
    assert torch.isfinite(model.forward(batch).logits).all()


def test_unknown_vision_aspect_ratio_raises_layout_error():
    model = lp.zoo.tiny("llava_onevision", device="cpu")
    model.config.vision_aspect_ratio = "anyres"
    with pytest.raises(LayoutError, match="anyres_max"):
        model.prepare(images=[[image(40, 56)]], prompts=[PROMPT])
