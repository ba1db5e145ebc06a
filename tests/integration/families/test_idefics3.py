"""Idefics3 and SmolVLM layouts on the tiny models: split crops form a ``crops`` mosaic plus a
``global`` view (SmolVLM through its own connector, processor and video processor).

Expected crop counts come from the image processor (``return_row_col_info=True``) and from the
arithmetic of its resize (longest edge to 96 px, then up to whole 32 px crops); expected positions
come from reading the ``<row_i_col_j>`` / ``<global-img>`` markers in the token strings.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

SIDE = 2  # tokens per crop side: (32 px / 8 px patches) / scale factor 2
PROMPT = "Is there a red heart?"
# (height, width) -> (rows, cols) of crops: the longest edge becomes 96 px = 3 crops, the other
# edge is rounded up to whole 32 px crops.
SPLITS = {(40, 56): (3, 3), (72, 48): (3, 2), (20, 80): (1, 3), (80, 20): (3, 1)}


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def model(request):
    return lp.zoo.tiny(request.param, device="cpu")


def processor_splits(model, imgs) -> list[tuple[int, int]]:
    out = model.processor.image_processor([imgs], return_row_col_info=True)
    return list(zip(out["rows"][0], out["cols"][0]))


def marker_runs(tokens: tuple[str, ...], n: int) -> list[dict]:
    """Per image, ``{(row, col) or "global": positions}`` read from the marker tokens."""
    images, current = [], {}
    for k, tok in enumerate(tokens):
        match = re.fullmatch(r"<row_(\d+)_col_(\d+)>", tok)
        if match:
            current[(int(match[1]), int(match[2]))] = torch.arange(k + 1, k + 1 + n)
        elif tok == "<global-img>":
            current["global"] = torch.arange(k + 1, k + 1 + n)
            images.append(current)
            current = {}
    return images


def test_pixel_shuffle_keeps_row_major_order(model):
    """Token t of a crop merges the scale x scale patch block at (t // side, t % side)."""
    connector = model.hf.model.connector
    patches = 2 * SIDE
    x = torch.arange(patches * patches, dtype=torch.float).reshape(1, -1, 1)
    out = connector.pixel_shuffle(x, connector.scale_factor)[0]
    for t in range(SIDE * SIDE):
        r, c = divmod(t, SIDE)
        block = {(2 * r + i) * patches + 2 * c + j for i in range(2) for j in range(2)}
        assert set(out[t].long().tolist()) == block


@pytest.mark.parametrize("size", list(SPLITS))
def test_one_image_crops_match_the_image_processor(model, size):
    img = random_image(*size, seed=3)
    assert processor_splits(model, [img]) == [SPLITS[size]]
    layout = model.prepare(images=[[img]], prompts=[PROMPT]).layouts[0]
    (lay,) = layout.images
    rows, cols = SPLITS[size]
    assert [g.name for g in lay.grids] == ["crops", "global"]
    assert lay.main == "crops"
    assert lay.grid.shape == (rows * SIDE, cols * SIDE)
    assert lay.grids[1].shape == (SIDE, SIDE)
    assert all(g.box == (0.0, 0.0, 1.0, 1.0) for g in lay.grids)
    assert lay.size == size


def test_two_images_mosaics_are_the_marked_crops_in_order(model, images):
    assert processor_splits(model, images) == [(3, 3), (3, 2)]
    layout = model.prepare(images=[images], prompts=[PROMPT]).layouts[0]
    expected = marker_runs(layout.tokens, SIDE * SIDE)
    assert len(expected) == len(layout.images) == 2
    for lay, runs, (rows, cols) in zip(layout.images, expected, [(3, 3), (3, 2)]):
        mosaic = lay.grid.positions
        assert mosaic.shape == (rows * SIDE, cols * SIDE)
        assert {k for k in runs if k != "global"} == {(r, c) for r in range(1, rows + 1)
                                                      for c in range(1, cols + 1)}
        for r in range(rows):
            for c in range(cols):
                block = mosaic[r * SIDE:(r + 1) * SIDE, c * SIDE:(c + 1) * SIDE]
                assert torch.equal(block.reshape(-1), runs[(r + 1, c + 1)])
        assert torch.equal(lay.grids[1].positions.reshape(-1), runs["global"])
    assert layout.image_grids == [(6, 6), (6, 4)]


def test_image_not_split_is_one_global_grid(model, images, monkeypatch):
    monkeypatch.setattr(model.processor.image_processor, "do_image_splitting", False)
    assert processor_splits(model, images) == [(0, 0), (0, 0)]
    layout = model.prepare(images=[images], prompts=[PROMPT]).layouts[0]
    assert "<row_1_col_1>" not in layout.tokens
    for lay in layout.images:
        assert [g.name for g in lay.grids] == ["global"]
        assert lay.main == "global" and lay.grid.shape == (SIDE, SIDE)
    assert layout.positions("image").numel() == 2 * SIDE * SIDE


def test_broken_markers_raise_layout_errors(model, images):
    batch = model.prepare(images=[[images[0]]], prompts=[PROMPT])
    ids = batch.input_ids.clone()
    placeholders = (ids[0] == model.image_token_id).nonzero().flatten()
    fam = model.family
    with pytest.raises(LayoutError, match="1 images .* 2 images were given"):
        fam.image_layouts({"input_ids": ids}, 0, [0, 1], placeholders, model.config, model.processor)
    # Drop crop (1, 2): the remaining markers no longer enumerate a 3x3 grid.
    marker = model.tokenizer.convert_tokens_to_ids("<row_1_col_2>")
    ids[ids == marker] = model.tokenizer.convert_tokens_to_ids("<row_1_col_1>")
    with pytest.raises(LayoutError, match="do not enumerate a 3x3 grid"):
        fam.image_layouts({"input_ids": ids}, 0, [0], placeholders, model.config, model.processor)
    # A crop one placeholder short.
    with pytest.raises(LayoutError, match="has 3 placeholder tokens; the model expects 4"):
        fam.image_layouts({"input_ids": batch.input_ids}, 0, [0], placeholders[1:], model.config,
                          model.processor)


def test_smolvlm_processor_reads_markers_from_the_tokenizer(model):
    if model.family.name != "smolvlm":
        pytest.skip("Idefics3's processor hard-codes its marker strings")
    proc = model.processor
    assert type(proc).__name__ == "SmolVLMProcessor"
    assert type(proc.video_processor).__name__ == "SmolVLMVideoProcessor"
    assert (proc.image_token, proc.fake_image_token, proc.global_image_token) == (
        "<image>", "<fake_token_around_image>", "<global-img>")
    assert model.family.global_token(proc) == "<global-img>"
    assert model.image_token_id == proc.image_token_id
