"""Image maps on multi-grid images, as a careless user meets them (finding 8 of the figures issue):
LLaVA-NeXT's base and tiles grids, a 3 x 200 image whose tiles crop to nothing, a grid asked for
by a name the image lacks, a tiled family's single tile. Each gives the documented map or an
InputError naming what was received and what exists, never a traceback from a dependency."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lvlm_probe as lp
from lvlm_probe.attribution import deletion_insertion, image_map
from lvlm_probe.attribution.image_maps import _Score, features
from lvlm_probe.errors import InputError, LayoutError
from lvlm_probe.layout import ImageGrid, ImageLayout, grid_from_run

PROMPT = "Is there a heart?"


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def next_model():
    return lp.zoo.tiny("llava_next", device="cpu")


def prepared(model, height: int, width: int):
    batch = model.prepare(images=[[image(height, width)]], prompts=[PROMPT])
    target = model.answer_token_ids(batch, ["yes"], first_token=True)[0, 0].item()
    return batch, target


def packed_newlines(model, batch) -> int:
    """How many newline embeddings transformers' own ``pack_image_features`` puts in the sequence
    for the example's image (the model's truth the layout must match)."""
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    sizes = batch.inputs["image_sizes"]
    n_tiles = batch.inputs["pixel_values"].shape[1]
    features_ = [torch.zeros(n_tiles, side * side, 2)]  # channel 1 marks nothing: only newlines
    newline = torch.tensor([0.0, 1.0])
    packed, _ = model.hf.model.pack_image_features(features_, sizes, "default", image_newline=newline)
    return int(packed[0][:, 1].sum())


@pytest.mark.filterwarnings("ignore:.*smaller than the vision tower")  # prepare's own warning, tested there
@pytest.mark.parametrize("height, width", [(200, 3), (3, 200)])
def test_a_thin_image_maps_its_base_grid(next_model, height, width):
    """The tiles crop to zero rows or columns: no grid has a zero side, the base grid is mapped
    (the documented fallback) and the rows' newlines stay visible as separators."""
    batch, target = prepared(next_model, height, width)
    img = batch.layouts[0].images[0]
    assert all(min(g.shape) > 0 for g in img.grids)
    assert img.grid_names == ["base"] and img.grid.name == "base"
    assert len(img.separators["newline"]) == packed_newlines(next_model, batch)
    assert torch.equal(img.positions, batch.layouts[0].positions("image"))  # every image token accounted
    maps = image_map(next_model, batch, target, method="ablation")
    assert maps.grid_names == [["base"]] and maps.grid is None
    assert maps.grids[0][0].shape == (4, 4) and np.isfinite(maps.grids[0][0]).all()
    title = maps.plot(0).axes[0].get_title()
    newlines = len(img.separators["newline"])
    assert "grid 'base' 4x4" in title
    assert (f"visible throughout: {newlines} newline" in title) if newlines else ("visible" not in title)
    with pytest.raises(InputError) as err:
        image_map(next_model, batch, target, method="ablation", grid="tiles")
    message = str(err.value)
    assert "grid='tiles': example 0: image 0 has no grid 'tiles'; its grids: base 4x4;" in message
    assert "grid=None for each image's default" in message


def test_default_maps_the_tiles_and_base_can_be_chosen(next_model):
    batch, target = prepared(next_model, 40, 56)
    img = batch.layouts[0].images[0]
    assert img.grid_names == ["base", "tiles"]
    tiles = image_map(next_model, batch, target, method="ablation")
    assert tiles.grid_names == [["tiles"]] and tiles.grids[0][0].shape == img.grid_named("tiles").shape
    base = image_map(next_model, batch, target, method="ablation", grid="base")
    assert base.grid_names == [["base"]] and base.grid == "base" and base.grids[0][0].shape == (4, 4)
    assert "(base)" in repr(base) and "grids [(4, 4)]" in repr(base)
    # the base cells are the features and the tiles and newlines stay visible: each base cell's
    # ablation score is the drop when that cell alone is hidden
    feats = features(batch.layouts[0], "base")
    assert [int(p) for p in torch.cat(feats.positions[:16])] == img.grid_named("base").positions.reshape(-1).tolist()
    ids = torch.tensor([target, target])
    score = _Score(next_model, batch, 0, ids, False, feats)
    gates = torch.ones(2, len(feats.positions))
    gates[1, 5] = 0  # cell (1, 1)
    full, without = score.removed(gates)
    assert base.grids[0][0][1, 1] == pytest.approx(float(full - without), abs=1e-5)
    title = base.plot(0).axes[0].get_title()
    assert "grid 'base' 4x4" in title and "visible throughout: tiles 6x8, 6 newline" in title
    assert set(base.to_frame().query("kind == 'cell'")["grid"]) == {"base"}
    # faithfulness curves of the base map delete the base grid's cells (16), not the tiles'
    curves = deletion_insertion(next_model, batch, target, maps=base, random_orders=1).to_frame()
    assert curves["step"].tolist() == list(range(17)) and curves["fraction"].iloc[1] == 1 / 16


def test_a_grid_with_a_zero_side_is_no_grid():
    """Whatever a family computes, a layout keeps no grid without cells, and a ``main`` grid
    that was left out falls back to the largest spatial grid."""
    base = grid_from_run(torch.arange(16), 4, 4, name="base")
    empty = ImageGrid(name="tiles", positions=torch.empty(12, 0, dtype=torch.long))
    layout = ImageLayout(index=0, grids=(base, empty), separators={"newline": torch.arange(16, 28)}, main="tiles")
    assert layout.grid_names == ["base"] and layout.main is None and layout.grid is base
    with pytest.raises(LayoutError, match="image 0 has no grid 'tiles'; its grids: base 4x4"):
        layout.grid_named("tiles")


def test_unknown_or_bad_grid_names_are_input_errors(next_model):
    batch, target = prepared(next_model, 40, 56)
    with pytest.raises(InputError) as err:
        image_map(next_model, batch, target, method="attention", grid="tile_0_0")
    assert "grid='tile_0_0': example 0: image 0 has no grid 'tile_0_0'; its grids: base 4x4, tiles 6x8;" \
        in str(err.value)
    with pytest.raises(InputError, match=r"grid must be a grid's name \(e.g. 'base', 'tiles'\) or None, got 3"):
        image_map(next_model, batch, target, method="attention", grid=3)


def test_a_single_tile_is_mapped_on_its_region():
    """A tiled family: the default is the thumbnail (the one grid covering the whole image); a
    named tile is mapped and drawn over the part of the image it covers."""
    model = lp.zoo.tiny("internvl", device="cpu")
    picture = image(40, 56)
    batch = model.prepare(images=[[picture]], prompts=[PROMPT])
    target = model.answer_token_ids(batch, ["yes"], first_token=True)[0, 0].item()
    img = batch.layouts[0].images[0]
    assert image_map(model, batch, target, method="attention").grid_names == [["thumbnail"]]
    tile = image_map(model, batch, target, method="attention", grid="tile_0_1")
    assert tile.grid_names == [["tile_0_1"]]
    x0, y0, x1, y1 = img.grid_named("tile_0_1").box
    overlay = tile.plot(0).axes[0].get_images()[1]
    assert overlay.get_extent() == pytest.approx([x0 * 56, x1 * 56, y1 * 40, y0 * 40])
    with pytest.raises(InputError, match="its grids: tile_0_0 2x2, tile_0_1 2x2, tile_1_0 2x2, tile_1_1 2x2, "
                                         "thumbnail 2x2"):
        image_map(model, batch, target, method="attention", grid="tiles")
