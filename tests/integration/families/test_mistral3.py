"""Mistral 3 layouts on the tiny model: one ``rows x cols`` grid of ``[IMG]`` tokens per image, each
row closed by ``[IMG_BREAK]`` and the last by ``[IMG_END]`` (template positions, not image ones).

Expected grids come from the processor's own ``image_sizes`` and from the arithmetic of its resize
(scale down to a 64 px longest edge, then round each side up to whole 16 px tokens: 8 px patches
merged 2x2); expected positions come from reading the ``[IMG]`` / ``[IMG_BREAK]`` / ``[IMG_END]``
token strings.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPT = "Is there a red heart?"
TOKEN_PX = 16  # 8 px patches merged 2x2
# (height, width) -> (processed height, width) -> (rows, cols) of [IMG] tokens
SIZES = {
    (40, 56): ((48, 64), (3, 4)),  # fits: sides rounded up to whole tokens
    (72, 48): ((64, 48), (4, 3)),  # scaled to 64x42, then rounded up
    (20, 80): ((16, 64), (1, 4)),  # scaled to 16x64
    (80, 20): ((64, 16), (4, 1)),
    (10, 10): ((16, 16), (1, 1)),  # one token: its row closed by [IMG_END] alone
}


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("mistral3", device="cpu")


def token_images(tokens: tuple[str, ...]) -> list[dict]:
    """Per image, its rows of ``[IMG]`` positions and the positions closing them, from the strings."""
    images, rows, row = [], [], []
    for k, tok in enumerate(tokens):
        if tok == "[IMG]":
            row.append(k)
        elif tok in ("[IMG_BREAK]", "[IMG_END]"):
            rows.append((row, k, tok))
            row = []
            if tok == "[IMG_END]":
                images.append({"grid": torch.tensor([r for r, _, _ in rows]),
                               "breaks": [k for _, k, t in rows if t == "[IMG_BREAK]"],
                               "end": k})
                rows = []
    assert not row and not rows
    return images


def check_layout(model, layout, ids, sizes):
    expected = token_images(layout.tokens)
    assert len(layout.images) == len(expected) == len(sizes)
    brk, end = model.tokenizer.convert_tokens_to_ids(["[IMG_BREAK]", "[IMG_END]"])
    template = set(layout.positions("template").tolist())
    for lay, runs, size in zip(layout.images, expected, sizes):
        rows, cols = SIZES[size][1]
        assert [g.name for g in lay.grids] == ["patches"] and lay.separators == {}
        assert lay.grid.shape == (rows, cols) and lay.grid.box == (0.0, 0.0, 1.0, 1.0)
        assert torch.equal(lay.grid.positions, runs["grid"])
        assert lay.size == size
        # each row's closing token follows its last [IMG] and is a template position
        closing = lay.grid.positions[:, -1] + 1
        assert closing.tolist() == runs["breaks"] + [runs["end"]]
        assert ids[closing[:-1]].eq(brk).all() and int(ids[closing[-1]]) == end
        assert set(closing.tolist()) <= template
    assert torch.equal(layout.positions("image"), torch.cat([lay.positions for lay in layout.images]))


def test_patch_merger_keeps_row_major_order(model):
    """Token t of an image merges the 2x2 patch block at (t // cols, t % cols), as the layout assumes."""
    merger = model.hf.model.multi_modal_projector.patch_merger
    rows, cols, d = 3, 4, merger.merging_layer.in_features // 4
    patches = torch.arange(4 * rows * cols, dtype=torch.float)  # a (2 rows) x (2 cols) patch grid
    x = patches[:, None].expand(-1, d).contiguous()
    size = torch.tensor([[2 * rows * merger.patch_size, 2 * cols * merger.patch_size]])
    saved = merger.merging_layer
    merger.merging_layer = torch.nn.Identity()
    try:
        out = merger(x, size)
    finally:
        merger.merging_layer = saved
    assert out.shape == (rows * cols, 4 * d)
    for t in range(rows * cols):
        r, c = divmod(t, cols)
        block = {(2 * r + i) * 2 * cols + 2 * c + j for i in range(2) for j in range(2)}
        assert set(out[t].long().tolist()) == block


@pytest.mark.parametrize("size", list(SIZES))
def test_one_image_grid_matches_the_processor(model, size):
    img = random_image(*size, seed=3)
    processed, (rows, cols) = SIZES[size]
    out = model.processor.image_processor([img], patch_size=TOKEN_PX)
    assert [list(map(int, hw)) for hw in out["image_sizes"]] == [list(processed)]
    batch = model.prepare(images=[[img]], prompts=[PROMPT])
    assert batch.inputs["image_sizes"].tolist() == [list(processed)]
    (layout,) = batch.layouts
    check_layout(model, layout, batch.input_ids[0], [size])
    assert layout.image_grids == [(rows, cols)]
    assert layout.positions("image").numel() == rows * cols


def test_two_images_in_one_prompt(model):
    sizes = [(40, 56), (72, 48)]
    images = [random_image(*s, seed=k) for k, s in enumerate(sizes)]
    batch = model.prepare(images=[images], prompts=[PROMPT])
    assert batch.inputs["image_sizes"].tolist() == [list(SIZES[s][0]) for s in sizes]
    (layout,) = batch.layouts
    check_layout(model, layout, batch.input_ids[0], sizes)
    assert layout.image_grids == [(3, 4), (4, 3)]


def test_padded_batch_of_two_prompts(model):
    sizes = [[(20, 80)], [(72, 48), (10, 10)]]
    images = [[random_image(*s, seed=k) for k, s in enumerate(per)] for per in sizes]
    batch = model.prepare(images=images, prompts=[PROMPT, "Is the blue star above a green circle?"])
    for i, (layout, per) in enumerate(zip(batch.layouts, sizes)):
        check_layout(model, layout, batch.input_ids[i], per)
    assert [lay.image_grids for lay in batch.layouts] == [[(1, 4)], [(4, 3), (1, 1)]]
    with torch.no_grad():  # the model fills exactly these placeholders
        assert torch.isfinite(model.forward(batch).logits).all()


def test_broken_layouts_raise_layout_errors(model):
    img = random_image(40, 56, seed=3)
    batch = model.prepare(images=[[img]], prompts=[PROMPT])
    ids = batch.input_ids.clone()
    placeholders = (ids[0] == model.image_token_id).nonzero().flatten()
    fam, cfg, proc = model.family, model.config, model.processor
    inputs = {"input_ids": ids, "image_sizes": batch.inputs["image_sizes"]}
    assert len(fam.image_layouts(inputs, 0, [0], placeholders, cfg, proc)) == 1
    # a second image that the sequence does not hold
    two = dict(inputs, image_sizes=batch.inputs["image_sizes"].repeat(2, 1))
    with pytest.raises(LayoutError, match="need \\[12, 12\\] placeholder tokens"):
        fam.image_layouts(two, 0, [0, 1], placeholders, cfg, proc)
    # one placeholder short
    with pytest.raises(LayoutError, match="sequence holds 11"):
        fam.image_layouts(inputs, 0, [0], placeholders[1:], cfg, proc)
    # a row not closed by [IMG_BREAK]
    broken = ids.clone()
    brk = model.tokenizer.convert_tokens_to_ids("[IMG_BREAK]")
    broken[broken == brk] = model.tokenizer.convert_tokens_to_ids("[IMG_END]")
    with pytest.raises(LayoutError, match="expected \\[IMG_BREAK\\]"):
        fam.image_layouts(dict(inputs, input_ids=broken), 0, [0], placeholders, cfg, proc)
    # no image but placeholders
    with pytest.raises(LayoutError, match="but no image"):
        fam.image_layouts(inputs, 0, [], placeholders, cfg, proc)


def test_processor_token_size_must_match_the_model(model, monkeypatch):
    img = random_image(40, 56, seed=3)
    batch = model.prepare(images=[[img]], prompts=[PROMPT])
    placeholders = (batch.input_ids[0] == model.image_token_id).nonzero().flatten()
    monkeypatch.setattr(model.processor, "spatial_merge_size", 1)
    with pytest.raises(LayoutError, match="merged 1x1, the model of 8 px patches merged 2x2"):
        model.family.image_layouts(batch.inputs, 0, [0], placeholders, model.config, model.processor)


def test_family_is_found_from_the_checkpoint(model):
    assert model.family.name == "mistral3"
    assert type(model.hf).__name__ == "Mistral3ForConditionalGeneration"
    assert type(model.processor).__name__ == "PixtralProcessor"
    assert model.image_token_id == model.tokenizer.convert_tokens_to_ids("[IMG]")
    assert model.family.row_end_ids(model.processor) == tuple(
        model.tokenizer.convert_tokens_to_ids(["[IMG_BREAK]", "[IMG_END]"]))
