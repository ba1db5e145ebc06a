"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL layouts on the tiny models: one merged grid per image, shaped
from ``image_grid_thw`` and laid over exactly that image's ``<|image_pad|>`` run, row-major as the
model's M-RoPE sees it (Qwen2.5-VL's windowed vision attention reorders patches only inside the
tower; Qwen3-VL's M-RoPE is interleaved but keeps the same positions)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPT = "Is there a red heart?"
# Tiny processor: 8 px patches, 2x2 merge, so sides are rounded to multiples of 16 px
# (smart_resize: round(side / 16) * 16, area within [32*32, 80*80]).
#   40x56 -> 32x64 px -> 4x8 patches -> 2x4 merged;  72x48 -> 64x48 px -> 8x6 patches -> 4x3 merged;
#   80x32 -> 80x32 px -> 10x4 patches -> 5x2 merged.
SIZES = [(40, 56), (72, 48), (80, 32)]
EXPECTED_THW = [(1, 4, 8), (1, 8, 6), (1, 10, 4)]


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def model(request):
    return lp.zoo.tiny(request.param, device="cpu")


@pytest.fixture(scope="module")
def pictures():
    return [_image(h, w, seed=k) for k, (h, w) in enumerate(SIZES)]


def _runs(ids: torch.Tensor, token_id: int) -> list[torch.Tensor]:
    """Maximal runs of consecutive positions holding ``token_id``, in order."""
    pos = (ids == token_id).nonzero().flatten()
    if not pos.numel():
        return []
    breaks = (pos.diff() != 1).nonzero().flatten() + 1
    return list(torch.tensor_split(pos, breaks.tolist()))


def _check_example(model, batch, example: int, image_rows: list[int]):
    layout = batch.layouts[example]
    ids = batch.input_ids[example]
    thw = batch.inputs["image_grid_thw"]
    merge = model.processor.image_processor.merge_size
    assert merge == model.config.vision_config.spatial_merge_size
    runs = _runs(ids, model.processor.image_token_id)
    assert len(layout.images) == len(runs) == len(image_rows)
    rope, _ = model.hf.model.get_rope_index(
        input_ids=batch.input_ids, mm_token_type_ids=batch.inputs["mm_token_type_ids"],
        image_grid_thw=thw, attention_mask=batch.inputs["attention_mask"],
    )
    start, end = model.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    for lay, run, row in zip(layout.images, runs, image_rows):
        t, h, w = thw[row].tolist()
        assert t == 1
        assert lay.grid is not None and len(lay.grids) == 1 and not lay.separators
        assert lay.grid.shape == (h // merge, w // merge)
        assert torch.equal(lay.grid.positions.flatten(), run)
        assert ids[run[0] - 1] == start and ids[run[-1] + 1] == end
        # Row-major: the M-RoPE (height, width) positions of cell (r, c) are (base + r, base + c).
        hpos, wpos = rope[1, example][lay.grid.positions], rope[2, example][lay.grid.positions]
        base = hpos[0, 0]
        rows, cols = torch.meshgrid(torch.arange(h // merge), torch.arange(w // merge),
                                    indexing="ij")
        assert torch.equal(hpos - base, rows)
        assert torch.equal(wpos - base, cols)


@pytest.mark.parametrize("which", [0, 2])
def test_one_image_grid(model, pictures, which):
    batch = model.prepare(images=[pictures[which]], prompts=PROMPT)
    assert batch.inputs["image_grid_thw"].tolist() == [list(EXPECTED_THW[which])]
    _, h, w = EXPECTED_THW[which]
    assert batch.layouts[0].image_grids == [(h // 2, w // 2)]
    _check_example(model, batch, 0, [0])


def test_two_images_of_different_shapes(model, pictures):
    batch = model.prepare(images=[pictures[:2]], prompts=[PROMPT])
    assert batch.inputs["image_grid_thw"].tolist() == [list(x) for x in EXPECTED_THW[:2]]
    assert batch.layouts[0].image_grids == [(2, 4), (4, 3)]
    _check_example(model, batch, 0, [0, 1])


def test_batch_indexes_the_flat_grid_list(model, pictures):
    """image_grid_thw lists the batch's images flat: example 1's images are rows 1 and 2."""
    prompts = [PROMPT, "Is the blue star above the green circle? Answer yes or no."]
    batch = model.prepare(images=[[pictures[0]], [pictures[2], pictures[1]]], prompts=prompts)
    assert batch.inputs["image_grid_thw"].tolist() == [list(EXPECTED_THW[i]) for i in (0, 2, 1)]
    assert batch.layouts[0].image_grids == [(2, 4)]
    assert batch.layouts[1].image_grids == [(5, 2), (4, 3)]
    _check_example(model, batch, 0, [0])
    _check_example(model, batch, 1, [1, 2])


def test_placeholder_count_mismatch_raises(model, pictures):
    batch = model.prepare(images=[pictures[:2]], prompts=[PROMPT])
    placeholders = batch.layouts[0].positions("image")
    layouts = model.family.image_layouts
    with pytest.raises(LayoutError, match="placeholder tokens"):
        layouts(batch.inputs, 0, [0, 1], placeholders[:-1], model.config, model.processor)
    with pytest.raises(LayoutError, match="image_grid_thw"):
        layouts(batch.inputs, 0, [0, 2], placeholders, model.config, model.processor)
