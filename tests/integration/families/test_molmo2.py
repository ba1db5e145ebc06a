"""Molmo2's two views per image on the tiny model: the ``global`` (low-resolution) and ``high_res``
grids, checked against the processor's ``image_grids``, crop counts and pooling indices, and traced
token by token to the pooled feature the model adds at each placeholder. Each cell's pooling window
is checked to be exactly the patches whose centres lie in the region its grid's ``box`` gives it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.molmo2.image_processing_molmo2 import compute_crop_geometry

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPT = "Is there a red heart?"
SHAPES = [[(40, 56)], [(72, 48)], [(20, 100)], [(40, 56), (72, 48)]]


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("molmo2", device="cpu")


def settings(model) -> dict:
    return model.processor.image_processor._merge_and_standardize_kwargs()


def geometry(model, size):
    """The processor's own arithmetic for one image: (tiling_h, tiling_w), canvas patches, the
    pooled grids ``[low_h, low_w, high_h, high_w]`` and the crop count."""
    s = settings(model)
    tiling_h, tiling_w, canvas_h, canvas_w = compute_crop_geometry(
        *size, max_crops=s["max_crops"], overlap_margins=s["overlap_margins"],
        crop_size=s["size"].height, patch_size=s["patch_size"])
    grid, crops = model.processor.image_processor.get_image_grid_and_crops(*size)
    return (tiling_h, tiling_w), (canvas_h // s["patch_size"], canvas_w // s["patch_size"]), grid, crops


def centres_in(box, shape, patches, r, c):
    """Patches ``(row, col)`` of a ``patches`` grid whose centres lie in cell ``(r, c)`` of a grid of
    ``shape`` cells spread evenly over ``box`` (fractions of the view)."""
    x0, y0, x1, y1 = box
    rows, cols = shape
    top, bottom = y0 + r * (y1 - y0) / rows, y0 + (r + 1) * (y1 - y0) / rows
    left, right = x0 + c * (x1 - x0) / cols, x0 + (c + 1) * (x1 - x0) / cols
    return {(i, j) for i in range(patches[0]) for j in range(patches[1])
            if top < (i + 0.5) / patches[0] < bottom and left < (j + 0.5) / patches[1] < right}


def check_image(model, batch, example: int, lay, img, image_index: int, first_token: int) -> int:
    """Check one image's grids against the processor and trace every cell to its pooling window;
    returns the index of the next image's first pooled token in the batch."""
    size = (img.height, img.width)
    (tiling_h, tiling_w), canvas, grid, crops = geometry(model, size)
    low_h, low_w, high_h, high_w = grid
    inputs = batch.inputs
    assert inputs["image_grids"][image_index].tolist() == grid
    assert int(inputs["image_num_crops"][image_index]) == crops == tiling_h * tiling_w + 1
    assert [g.name for g in lay.grids] == ["global", "high_res"]
    assert lay.main == "high_res" and lay.grid.name == "high_res" and lay.size == size
    assert lay.grids[0].shape == (low_h, low_w) and lay.grids[1].shape == (high_h, high_w)

    s = settings(model)
    side = s["size"].height // s["patch_size"]
    window = side - sum(s["overlap_margins"])
    per_crop = side * side
    pooling = inputs["image_token_pooling"]
    # the model pools token j of the batch from row j of image_token_pooling (indices into this
    # image's crops) and adds it to the j-th placeholder, in sequence order
    placeholders = (batch.input_ids == model.image_token_id).nonzero()
    seq_order = {(int(b), int(p)): j for j, (b, p) in enumerate(placeholders.tolist())}
    n_tokens = low_h * low_w + high_h * high_w
    for g, (view, patches) in enumerate(((0, (side, side)), (1, canvas))):
        grid_ = lay.grids[g]
        seen = []
        for r in range(grid_.shape[0]):
            for c in range(grid_.shape[1]):
                j = seq_order[(example, int(grid_.positions[r, c]))]
                assert first_token <= j < first_token + n_tokens
                idx = pooling[j][pooling[j] >= 0]
                crop, patch = idx // per_crop, idx % per_crop
                pr, pc = patch // side, patch % side
                if view == 0:  # the low-resolution view is crop 0
                    assert (crop == 0).all()
                    cells = {(int(a), int(b)) for a, b in zip(pr, pc)}
                else:  # crop t >= 1 sits at (ti, tj) of the tiling, one window apart
                    assert (crop >= 1).all()
                    ti, tj = (crop - 1) // tiling_w, (crop - 1) % tiling_w
                    cells = {(int(a), int(b)) for a, b in zip(ti * window + pr, tj * window + pc)}
                assert cells == centres_in(grid_.box, grid_.shape, patches, r, c), (grid_.name, r, c)
                seen += sorted(cells)
        # the cells tile the view's patches exactly once
        assert sorted(seen) == [(i, j) for i in range(patches[0]) for j in range(patches[1])]
    return first_token + n_tokens


def check_overlapping_crops_share_pixels(model, batch, img, image_index: int, first_crop: int):
    """Crop t's patch (pr, pc) is canvas patch (ti * window + pr, tj * window + pc): where crops
    overlap, their patches there hold the same pixels, and the crops cover the whole canvas."""
    (tiling_h, tiling_w), canvas, _, crops = geometry(model, (img.height, img.width))
    s = settings(model)
    side = s["size"].height // s["patch_size"]
    window = side - sum(s["overlap_margins"])
    pixels = batch.inputs["pixel_values"]
    found: dict[tuple[int, int], torch.Tensor] = {}
    for t in range(tiling_h * tiling_w):
        ti, tj = divmod(t, tiling_w)
        for p in range(side * side):
            pr, pc = divmod(p, side)
            key = (ti * window + pr, tj * window + pc)
            value = pixels[first_crop + 1 + t, p]
            if key in found:
                assert torch.equal(found[key], value), key
            found[key] = value
    assert sorted(found) == [(i, j) for i in range(canvas[0]) for j in range(canvas[1])]
    return first_crop + crops


@pytest.mark.parametrize("shapes", SHAPES)
def test_grids_follow_the_processor_and_the_pooling(model, shapes):
    imgs = [image(h, w, seed=k) for k, (h, w) in enumerate(shapes)]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    layout = batch.layouts[0]
    assert len(layout.images) == len(imgs)
    token, crop = 0, 0
    for k, (lay, img) in enumerate(zip(layout.images, imgs)):
        token = check_image(model, batch, 0, lay, img, k, token)
        crop = check_overlapping_crops_share_pixels(model, batch, img, k, crop)
    assert token == batch.inputs["image_token_pooling"].shape[0]
    assert crop == batch.inputs["pixel_values"].shape[0]


@pytest.mark.parametrize("shapes", SHAPES)
def test_start_end_and_column_tokens_are_template(model, shapes):
    """Each image is <low_res_im_start> global rows <im_end> <im_start> (high_res row <im_col>)...
    <im_end>, as the processor's flags say; the markers and the "Image i" labels are template."""
    imgs = [image(h, w, seed=k) for k, (h, w) in enumerate(shapes)]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    layout = batch.layouts[0]
    tokens = layout.tokens
    template = set(layout.groups["template"].tolist())
    proc = model.processor
    low_cols = proc.image_use_col_tokens if proc.use_single_crop_col_tokens is None else proc.use_single_crop_col_tokens
    start = "<low_res_im_start>" if proc.use_single_crop_start_token else "<im_start>"
    for lay in layout.images:
        low, high = lay.grids
        markers = []
        first, last = int(low.positions[0, 0]), int(high.positions[-1, -1])
        assert tokens[first - 1] == start
        markers.append(first - 1)
        for grid, cols in ((low, low_cols), (high, proc.image_use_col_tokens)):
            rows = grid.positions
            for r, row in enumerate(rows):
                # a row is a contiguous run of placeholders, followed by <im_col> where enabled,
                # else directly by the next row
                assert torch.equal(row, torch.arange(int(row[0]), int(row[-1]) + 1))
                if cols:
                    assert tokens[int(row[-1]) + 1] == "<im_col>"
                    markers.append(int(row[-1]) + 1)
                elif r + 1 < len(rows):
                    assert int(rows[r + 1, 0]) == int(row[-1]) + 1
        end_low = int(low.positions[-1, -1]) + 1 + int(low_cols)
        assert tokens[end_low] == "<im_end>" and tokens[end_low + 1] == "<im_start>"
        assert int(high.positions[0, 0]) == end_low + 2
        end_high = last + 1 + int(proc.image_use_col_tokens)
        assert tokens[end_high] == "<im_end>"
        markers += [end_low, end_low + 1, end_high]
        assert set(markers) <= template
        # every position from the start marker to the end marker is this image's or a marker
        span = set(range(first - 1, end_high + 1))
        assert span == set(markers) | set(lay.positions.tolist())
    if len(imgs) > 1:
        text = model.tokenizer.decode(batch.input_ids[0, sorted(template)])
        for k in range(len(imgs)):
            assert f"Image {k + 1}" in text


def test_pooled_features_are_added_at_the_grid_cells(model):
    """The language model's input at cell (r, c) is the <im_patch> embedding plus the adapter's
    feature of that cell's token (Molmo2 adds the image features to the placeholder embeddings)."""
    imgs = [image(40, 56), image(72, 48, seed=1)]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    inputs = batch.inputs
    with torch.no_grad():
        features = torch.cat(model.hf.model.get_image_features(
            inputs["pixel_values"], inputs["image_token_pooling"], inputs["image_grids"],
            inputs["image_num_crops"]).pooler_output)
    with model.capture(["hook_embed", "blocks.0.hook_resid_pre"]) as cache:
        model.forward(batch)
    embed, resid = cache["hook_embed"][0], cache["blocks.0.hook_resid_pre"][0]
    j = 0
    for lay in batch.layouts[0].images:
        for grid in lay.grids:
            for pos in grid.positions.reshape(-1).tolist():
                torch.testing.assert_close(resid[pos], embed[pos] + features[j], atol=1e-6, rtol=0)
                j += 1
    assert j == features.shape[0]
    assert not torch.allclose(resid, embed)


def test_padded_batch_of_two_prompts(model):
    batch = model.prepare(images=[[image(20, 100)], [image(72, 48), image(40, 56, seed=1)]],
                          prompts=[PROMPT, "Is the blue star above a green circle?"])
    grids = batch.inputs["image_grids"].tolist()
    shapes = [[g.shape for g in lay.grids] for layout in batch.layouts for lay in layout.images]
    assert shapes == [[(a, b), (c, d)] for a, b, c, d in grids]
    assert batch.layouts[0].positions("pad").numel() > 0
    token, index = 0, 0
    for example, (layout, imgs) in enumerate(zip(batch.layouts, batch.images)):
        for lay, img in zip(layout.images, imgs):
            token = check_image(model, batch, example, lay, img, index, token)
            index += 1
    assert torch.isfinite(model.forward(batch).logits).all()


def test_sizes_that_disagree_with_the_grid_raise_layout_error(model):
    batch = model.prepare(images=[[image(40, 56)]], prompts=[PROMPT])
    family = model.family
    ids = batch.input_ids[0]
    placeholders = (ids == model.image_token_id).nonzero().flatten()
    args = (batch.inputs, 0, [0], placeholders, model.config, model.processor)
    assert geometry(model, (72, 48))[2] != geometry(model, (40, 56))[2]
    with pytest.raises(LayoutError, match="pools into"):
        family.image_layouts(*args, sizes=((72, 48),))
    with pytest.raises(LayoutError, match="size was not given"):
        family.image_layouts(*args)
    with pytest.raises(LayoutError, match="do not split|need"):
        family.image_layouts(*args[:3], placeholders[1:], *args[4:], sizes=((40, 56),))
