"""InternVL's dynamic tiles on the tiny model: each tile and the thumbnail is a 2x2 grid, checked
against the image processor's own tile count and pixels and traced, token by token, to the feature
that the model's ``get_image_features`` / ``pixel_shuffle`` / ``masked_scatter`` puts there."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPT = "Is there a red heart?"
SIDE = 2  # tokens per tile side: (32 px / 8 px patches) * downsample ratio 0.5
TILE = 32
# (height, width) -> (rows, cols) of tiles. With 1..4 tiles, get_optimal_tiled_canvas takes the
# (cols, rows) whose cols / rows is closest to width / height, ties going to more tiles while the
# image covers more than half of them:
#   40x56 (1.4): 1x1 and 2x2 are both 0.4 off; 40 * 56 > 0.5 * 4 * 32^2, so 2x2.
#   72x48 (0.67): 1 column x 2 rows (0.5) is closest.
#   20x100 (5): 4 columns x 1 row.
#   32x32 (1): 1x1; 2x2 ties, but 32 * 32 < 0.5 * 4 * 32^2, so one tile and no thumbnail.
ARRANGEMENT = {(40, 56): (2, 2), (72, 48): (2, 1), (20, 100): (1, 4), (32, 32): (1, 1)}


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("internvl", device="cpu")


def processor_patches(model, img) -> int:
    """The image processor's own count of views (tiles plus thumbnail) of one image."""
    out = model.processor.image_processor([img], crop_to_patches=True, return_tensors="pt")
    return int(torch.as_tensor(out["num_patches"]).reshape(-1)[0])


def resized(model, img, height: int, width: int) -> torch.Tensor:
    """The image as the image processor stretches and normalises it to ``height x width``."""
    out = model.processor.image_processor([img], crop_to_patches=False, return_tensors="pt",
                                          size={"height": height, "width": width})
    return out["pixel_values"][0]


def coded_sequence(batch, image_token_id: int) -> torch.Tensor:
    """``[batch, length, 2]``: at each placeholder, ``(view, token)`` of the feature the model puts
    there: the view's index in ``pixel_values`` and the token's index within the view, as
    ``get_image_features`` flattens each view and ``masked_scatter`` fills the placeholders of the
    whole batch in order."""
    ids = batch.input_ids
    views = batch.inputs["pixel_values"].shape[0]
    features = torch.stack(torch.meshgrid(torch.arange(views), torch.arange(SIDE * SIDE),
                                          indexing="ij"), -1).float()
    codes = torch.full((*ids.shape, 2), float("nan"))
    mask = (ids == image_token_id).unsqueeze(-1).expand_as(codes)
    return codes.masked_scatter(mask, features.reshape(-1, 2))


def check_image(model, lay, img, codes, pixels, first_view: int) -> int:
    """Check one image's layout; returns the index in ``pixel_values`` of the next image's first view."""
    size = (img.height, img.width)
    rows, cols = ARRANGEMENT[size]
    tiled = rows * cols > 1
    n_views = rows * cols + 1 if tiled else 1
    assert processor_patches(model, img) == n_views
    grids = {g.name: g for g in lay.grids}
    names = [f"tile_{r}_{c}" for r in range(rows) for c in range(cols)] if tiled else []
    assert [g.name for g in lay.grids] == names + ["thumbnail"]
    assert lay.main == "thumbnail" and lay.grid.name == "thumbnail"
    assert lay.size == size and not lay.separators
    assert all(g.shape == (SIDE, SIDE) for g in lay.grids)
    a, b = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    for k, name in enumerate(names + ["thumbnail"]):
        grid = grids[name]
        view = first_view + k
        # each cell holds token (a, b) of its view, row-major
        expected = torch.stack([torch.full_like(a, view), a * SIDE + b], -1).float()
        assert torch.equal(codes[grid.positions], expected)
        if name == "thumbnail":
            assert grid.box == (0.0, 0.0, 1.0, 1.0)
            assert torch.allclose(pixels[view], resized(model, img, TILE, TILE), atol=1e-5)
        else:
            r, c = divmod(k, cols)
            assert grid.box == (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)
            whole = resized(model, img, rows * TILE, cols * TILE)
            crop = whole[:, r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
            assert torch.allclose(pixels[view], crop, atol=1e-5)
    return first_view + n_views


@pytest.mark.parametrize("shapes", [[(40, 56)], [(72, 48)], [(20, 100)], [(32, 32)],
                                    [(40, 56), (72, 48)]])
def test_tiles_and_thumbnail_follow_the_processor_and_the_model(model, shapes):
    imgs = [image(h, w, seed=k) for k, (h, w) in enumerate(shapes)]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    layout = batch.layouts[0]
    codes = coded_sequence(batch, model.image_token_id)[0]
    assert len(layout.images) == len(shapes)
    view = 0
    tokens = layout.tokens
    for lay, img in zip(layout.images, imgs):
        view = check_image(model, lay, img, codes, batch.inputs["pixel_values"], view)
        # the image's tokens are one run between its <img> and </img> markers (template tokens)
        pos = lay.positions
        assert torch.equal(pos, torch.arange(int(pos[0]), int(pos[-1]) + 1))
        assert tokens[int(pos[0]) - 1] == "<img>" and tokens[int(pos[-1]) + 1] == "</img>"
        assert int(pos[0]) - 1 in layout.groups["template"].tolist()
    assert view == batch.inputs["pixel_values"].shape[0]


def test_pixel_shuffle_keeps_row_major_blocks(model):
    """Token (a, b) of a tile merges patches (2a..2a+1, 2b..2b+1): the grid is spatial."""
    i, j = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    patches = torch.stack([i, j], -1).float()[None]  # [1, rows, cols, 2]
    merged = model.hf.model.pixel_shuffle(patches, scale_factor=0.5)  # [1, 2, 2, 8]
    assert merged.shape == (1, SIDE, SIDE, 8)
    for a in range(SIDE):
        for b in range(SIDE):
            cells = merged[0, a, b].reshape(4, 2)
            assert set(map(tuple, cells.long().tolist())) == {
                (2 * a + da, 2 * b + db) for da in (0, 1) for db in (0, 1)}


def test_batch_of_two_prompts_runs(model):
    batch = model.prepare(images=[[image(20, 100)], [image(72, 48), image(40, 56, seed=1)]],
                          prompts=[PROMPT, "Is the blue star above a green circle?"])
    shapes = [[g.name for g in lay.grids] for lay in batch.layouts[1].images]
    assert shapes == [["tile_0_0", "tile_1_0", "thumbnail"],
                      ["tile_0_0", "tile_0_1", "tile_1_0", "tile_1_1", "thumbnail"]]
    assert [len(lay.grids) for lay in batch.layouts[0].images] == [5]
    assert torch.isfinite(model.forward(batch).logits).all()


def test_tile_count_disagreeing_with_the_arrangement_raises_layout_error(model):
    batch = model.prepare(images=[[image(40, 56)]], prompts=[PROMPT])
    family = model.family
    ids = batch.input_ids[0]
    placeholders = (ids == model.image_token_id).nonzero().flatten()
    with pytest.raises(LayoutError, match="2x1"):  # a size the processor cuts into 2x1 tiles, not 2x2
        family.image_layouts(batch.inputs, 0, [0], placeholders, model.config, model.processor,
                             sizes=((72, 48),))
    with pytest.raises(LayoutError, match="its size was not given"):
        family.image_layouts(batch.inputs, 0, [0], placeholders, model.config, model.processor)
