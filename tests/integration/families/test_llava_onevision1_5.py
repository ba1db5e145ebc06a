"""LLaVA-OneVision-1.5's layout on the tiny model: one merged grid per image, shaped from the
processor's ``image_grid_thw`` (itself checked against ``smart_resize``, the processor's own
arithmetic), laid over exactly that image's ``<|image_pad|>`` run between ``<|vision_start|>`` and
``<|vision_end|>`` (template positions), and every cell traced through the model: the LM's input at
cell ``(r, c)`` is the merger's output for the ``merge x merge`` patches at patch rows
``merge * r ...`` and columns ``merge * c ...`` of the image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPT = "Is there a red heart?"
# Two sizes the processor resizes (40x56, 72x48) and three it keeps (sides already multiples of
# patch * merge and area within its bounds), whose patches can be matched to the original pixels.
RESIZED = [(40, 56), (72, 48)]
KEPT = [(32, 64), (64, 48), (48, 80)]


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("llava_onevision1_5", device="cpu")


def _expected_thw(model, height: int, width: int) -> tuple[int, int, int]:
    """``(t, h, w)`` in patches by the image processor's own resize rule."""
    proc = model.processor.image_processor
    factor = proc.patch_size * proc.merge_size
    rh, rw = smart_resize(height, width, factor=factor, min_pixels=proc.size.shortest_edge,
                          max_pixels=proc.size.longest_edge)
    return 1, rh // proc.patch_size, rw // proc.patch_size


def _runs(ids: torch.Tensor, token_id: int) -> list[torch.Tensor]:
    """Maximal runs of consecutive positions holding ``token_id``, in order."""
    pos = (ids == token_id).nonzero().flatten()
    if not pos.numel():
        return []
    breaks = (pos.diff() != 1).nonzero().flatten() + 1
    return list(torch.tensor_split(pos, breaks.tolist()))


def _check_grids(model, batch, example: int, rows_of_thw: list[int]):
    """Each image's grid is ``(h / merge) x (w / merge)`` from its ``image_grid_thw`` row, lies
    row-major over its own placeholder run, and the vision boundary tokens are template."""
    layout = batch.layouts[example]
    ids = batch.input_ids[example]
    thw = batch.inputs["image_grid_thw"]
    merge = model.processor.image_processor.merge_size
    assert merge == model.config.vision_config.spatial_merge_size
    runs = _runs(ids, model.processor.image_token_id)
    assert len(layout.images) == len(runs) == len(rows_of_thw)
    start, end = model.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    template = set(layout.positions("template").tolist())
    for lay, run, row in zip(layout.images, runs, rows_of_thw):
        t, h, w = thw[row].tolist()
        assert t == 1 and run.numel() == h * w // merge**2
        assert lay.grid is not None and len(lay.grids) == 1 and not lay.separators
        assert lay.grid.shape == (h // merge, w // merge)
        assert torch.equal(lay.grid.positions.flatten(), run)
        before, after = int(run[0]) - 1, int(run[-1]) + 1
        assert ids[before] == start and ids[after] == end
        assert before in template and after in template


def _patch_origins(model, image: Image.Image, patches: torch.Tensor) -> list[tuple[int, int]]:
    """``(patch row, patch col)`` in ``image`` of each row of ``patches`` (the processor's
    ``pixel_values`` for an image it did not resize): the crop whose rescaled, normalised pixels it
    holds."""
    proc = model.processor.image_processor
    p = proc.patch_size
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).double() * proc.rescale_factor
    mean = torch.tensor(proc.image_mean, dtype=torch.double)[:, None, None]
    std = torch.tensor(proc.image_std, dtype=torch.double)[:, None, None]
    pixels = (pixels - mean) / std
    rows, cols = pixels.shape[1] // p, pixels.shape[2] // p
    crops = pixels.reshape(3, rows, p, cols, p).permute(1, 3, 0, 2, 4).reshape(rows * cols, -1)
    distance = torch.cdist(patches.double(), crops)
    best = distance.argmin(-1)
    # every patch matches one crop, much better than any other (random pixels)
    assert torch.all(distance.gather(1, best[:, None]).squeeze(1) < 1e-3)
    assert best.unique().numel() == best.numel() == rows * cols
    return [(int(k) // cols, int(k) % cols) for k in best]


@pytest.mark.parametrize("size", RESIZED + KEPT[:1])
def test_one_image_grid_matches_processor(model, size):
    batch = model.prepare(images=[_image(*size, seed=0)], prompts=PROMPT)
    _, h, w = _expected_thw(model, *size)
    p = model.processor.image_processor.patch_size
    assert ((h * p, w * p) == size) == (size in KEPT)
    assert batch.inputs["image_grid_thw"].tolist() == [list(_expected_thw(model, *size))]
    _check_grids(model, batch, 0, [0])


def test_two_images_of_different_shapes(model):
    sizes = [RESIZED[0], RESIZED[1]]
    batch = model.prepare(images=[[_image(*s, seed=k) for k, s in enumerate(sizes)]], prompts=[PROMPT])
    assert batch.inputs["image_grid_thw"].tolist() == [list(_expected_thw(model, *s)) for s in sizes]
    _check_grids(model, batch, 0, [0, 1])
    assert batch.layouts[0].image_grids[0] != batch.layouts[0].image_grids[1]


def test_batch_indexes_the_flat_grid_list(model):
    """image_grid_thw lists the batch's images flat: example 1's images are rows 1 and 2."""
    prompts = [PROMPT, "Is the blue star above the green circle? Answer yes or no."]
    imgs = [[_image(*RESIZED[0], seed=0)], [_image(*KEPT[2], seed=1), _image(*RESIZED[1], seed=2)]]
    batch = model.prepare(images=imgs, prompts=prompts)
    sizes = [RESIZED[0], KEPT[2], RESIZED[1]]
    assert batch.inputs["image_grid_thw"].tolist() == [list(_expected_thw(model, *s)) for s in sizes]
    _check_grids(model, batch, 0, [0])
    _check_grids(model, batch, 1, [1, 2])


@pytest.mark.parametrize("sizes", [[KEPT[0]], [KEPT[1], KEPT[2]]])
def test_each_cell_carries_its_own_patches(model, sizes):
    """The LM's input at cell ``(r, c)`` of image ``k`` is the merger's output for that image's
    merged token ``r * cols + c``, and that token fuses the ``merge x merge`` patches at patch rows
    ``merge * r + i`` and columns ``merge * c + j`` (i, j < merge) of the image."""
    imgs = [_image(*s, seed=k) for k, s in enumerate(sizes)]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    thw = batch.inputs["image_grid_thw"]
    p = model.processor.image_processor.patch_size
    assert thw.tolist() == [[1, h // p, w // p] for h, w in sizes]  # not resized
    merge = model.config.vision_config.spatial_merge_size
    with model.capture(["projector.hook_out", "blocks.0.hook_resid_pre"]) as cache:
        model.forward(batch)
    merged = cache["projector.hook_out"].reshape(-1, model.config.text_config.hidden_size)
    lm_input = cache["blocks.0.hook_resid_pre"][0]
    patches = batch.inputs["pixel_values"]
    patch_start = token_start = 0
    for lay, img, (_, h, w) in zip(batch.layouts[0].images, imgs, thw.tolist()):
        origins = _patch_origins(model, img, patches[patch_start:patch_start + h * w])
        rows, cols = lay.grid.shape
        for r in range(rows):
            for c in range(cols):
                n = r * cols + c
                assert torch.equal(lm_input[lay.grid.positions[r, c]], merged[token_start + n])
                fused = origins[n * merge**2:(n + 1) * merge**2]
                assert fused == [(merge * r + i, merge * c + j) for i in range(merge) for j in range(merge)]
        patch_start += h * w
        token_start += rows * cols
    assert token_start == merged.shape[0] and patch_start == patches.shape[0]


def test_placeholder_count_mismatch_raises(model):
    batch = model.prepare(images=[[_image(*RESIZED[0], seed=0), _image(*RESIZED[1], seed=1)]],
                          prompts=[PROMPT])
    placeholders = batch.layouts[0].positions("image")
    layouts = model.family.image_layouts
    with pytest.raises(LayoutError, match="placeholder tokens"):
        layouts(batch.inputs, 0, [0, 1], placeholders[:-1], model.config, model.processor)
    with pytest.raises(LayoutError, match="image_grid_thw"):
        layouts(batch.inputs, 0, [0, 2], placeholders, model.config, model.processor)
