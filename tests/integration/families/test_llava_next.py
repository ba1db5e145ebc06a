"""LLaVA-NeXT's anyres layout on the tiny model: grid shapes derived by hand from the pinpoints and
checked against the processor's own token arithmetic, and every grid cell and newline traced to
the feature that transformers' ``pack_image_features`` puts at that position."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPT = "Is there a red heart?"
SIDE = 4  # tiny tile: 32 px / 8 px patches

# (height, width) -> (tiles high, tiles wide), unpadded tile map (rows, cols), crop offset (rows, cols).
# Pinpoints (h, w) are 32 x {(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)}; select_best_resolution keeps
# the most effective pixels, then the least waste:
#   40x56 -> 64x64 (2x2 tiles, 8x8 patches); width-bound scale 8/56 gives round(40 * 8/56) = 6
#            rows, so (8 - 6) // 2 = 1 row is cropped at the top and bottom: 6x8 from row 1.
#   72x48 -> 64x64; height-bound scale 8/72 gives round(48 * 8/72) = 5 cols, (8 - 5) // 2 = 1:
#            8x6 from col 1.
#   20x100 -> 32x96 (1x3 tiles, 4x12); round(20 * 12/100) = 2 rows, (4 - 2) // 2 = 1: 2x12 from row 1.
EXPECTED = {
    (40, 56): ((2, 2), (6, 8), (1, 0)),
    (72, 48): ((2, 2), (8, 6), (0, 1)),
    (20, 100): ((1, 3), (2, 12), (1, 0)),
}


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("llava_next", device="cpu")


def coded_sequence(model, batch) -> torch.Tensor:
    """``[length, 4]`` codes of what the model places at each position of example 0.

    Each vision feature is replaced by its origin, ``[is_base, row, col, is_newline]`` (row and col in
    the stitched tile map for tiles, in the base image for the base), the newline embedding by
    ``[0, 0, 0, 1]``; the real ``pack_image_features`` arranges them and the packed sequence fills the
    placeholders in order, as the model's ``masked_scatter`` does."""
    config = model.config
    sizes = batch.inputs["image_sizes"]
    i, j = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    features = []
    for size in sizes:
        n_h, n_w = get_anyres_image_grid_shape(size.tolist(), config.image_grid_pinpoints,
                                               config.vision_config.image_size)
        tiles = [torch.stack([torch.ones_like(i), i, j, torch.zeros_like(i)], -1)]
        for t in range(n_h * n_w):
            r0, c0 = (t // n_w) * SIDE, (t % n_w) * SIDE
            tiles.append(torch.stack([torch.zeros_like(i), i + r0, j + c0, torch.zeros_like(i)], -1))
        features.append(torch.stack(tiles).reshape(len(tiles), SIDE * SIDE, 4).float())
    newline = torch.tensor([0.0, 0.0, 0.0, 1.0])
    packed, _ = model.hf.model.pack_image_features(features, sizes, "default", image_newline=newline)
    ids = batch.input_ids[0]
    codes = torch.full((ids.numel(), 4), float("nan"))
    codes[ids == model.image_token_id] = torch.cat(packed)
    return codes


@pytest.mark.parametrize("shapes", [[(40, 56)], [(72, 48)], [(20, 100)], [(40, 56), (72, 48)]])
def test_grids_and_cells_follow_pack_image_features(model, shapes):
    imgs = [image(h, w, seed=k) for k, (h, w) in enumerate(shapes)]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    layout = batch.layouts[0]
    codes = coded_sequence(model, batch)
    processor = model.processor
    assert len(layout.images) == len(shapes)
    for lay, size in zip(layout.images, shapes):
        (n_h, n_w), (rows, cols), (dr, dc) = EXPECTED[size]
        assert get_anyres_image_grid_shape(list(size), model.config.image_grid_pinpoints, 32) == (n_h, n_w)
        # the processor's own count of tile features and newlines agrees with the hand derivation
        assert processor._get_unpadded_features(*size, SIDE, SIDE, n_h, n_w) == (rows * cols, rows)
        grids = {g.name: g for g in lay.grids}
        assert set(grids) == {"base", "tiles"} and lay.main == "tiles"
        assert grids["base"].shape == (SIDE, SIDE) and grids["tiles"].shape == (rows, cols)
        assert lay.grid.name == "tiles" and set(lay.separators) == {"newline"}
        assert lay.separators["newline"].numel() == rows
        # packing order: base first, then each tile row followed by its newline
        base, tiles, newline = grids["base"].positions, grids["tiles"].positions, lay.separators["newline"]
        assert base.max() < tiles.min()
        assert torch.equal(newline, tiles[:, -1] + 1)
        # each cell holds the feature of the patch it names
        i, j = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
        assert torch.equal(codes[base], torch.stack([torch.ones_like(i), i, j, 0 * i], -1).float())
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        assert torch.equal(codes[tiles], torch.stack([0 * r, r + dr, c + dc, 0 * r], -1).float())
        assert torch.equal(codes[newline], torch.tensor([[0.0, 0, 0, 1]]).expand(rows, 4))


def test_tiny_model_runs_on_each_layout(model):
    batch = model.prepare(images=[[image(20, 100), image(40, 56)]], prompts=[PROMPT])
    assert sum(lay.positions.numel() for lay in batch.layouts[0].images) == (
        (16 + 2 * 13) + (16 + 6 * 9)  # base + rows * (cols + newline)
    )
    assert torch.isfinite(model.forward(batch).logits).all()


def test_pinpoints_disagreeing_with_the_config_raise_layout_error():
    model = lp.zoo.tiny("llava_next", device="cpu")
    model.processor.image_processor.image_grid_pinpoints = [[32, 32], [64, 64]]
    with pytest.raises(LayoutError, match="image_grid_pinpoints"):
        model.prepare(images=[[image(40, 56)]], prompts=[PROMPT])
