"""GLM-4.1V layout on its tiny model: one merged grid per image, shaped from ``image_grid_thw`` (the
processor's own resize arithmetic) and laid over exactly that image's ``<|image|>`` run between
``<|begin_of_image|>`` and ``<|end_of_image|>`` (template), row-major as the model's M-RoPE and
the processor's patch order see it; plus the sandwich-norm hooks and the chat template.

The helpers (underscore names) are shared with ``test_glm46v.py``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.glm4v.image_processing_glm4v import smart_resize

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPT = "Is there a red heart?"
OTHER_PROMPT = "Is the blue star above the green circle? Answer yes or no."
# Three sizes and aspect ratios: wide, tall, and one that smart_resize rounds differently per side.
SIZES = [(40, 56), (72, 48), (80, 32)]
BEGIN, END = "<|begin_of_image|>", "<|end_of_image|>"


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _expected_thw(processor, height: int, width: int) -> list[int]:
    """(t, h, w) in patches from the image processor's own resize rule and settings."""
    ip = processor.image_processor
    rh, rw = smart_resize(num_frames=ip.temporal_patch_size, height=height, width=width,
                          temporal_factor=ip.temporal_patch_size, factor=ip.patch_size * ip.merge_size,
                          min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
    return [1, rh // ip.patch_size, rw // ip.patch_size]


def _runs(ids: torch.Tensor, token_id: int) -> list[torch.Tensor]:
    """Maximal runs of consecutive positions holding ``token_id``, in order."""
    pos = (ids == token_id).nonzero().flatten()
    if not pos.numel():
        return []
    breaks = (pos.diff() != 1).nonzero().flatten() + 1
    return list(torch.tensor_split(pos, breaks.tolist()))


def _check_example(model, batch, example: int, image_rows: list[int]):
    """The example's grids against image_grid_thw, its placeholder runs, the boundary tokens, the
    processor's mm_token_type_ids and the model's M-RoPE positions."""
    layout = batch.layouts[example]
    ids = batch.input_ids[example]
    thw = batch.inputs["image_grid_thw"]
    merge = model.processor.image_processor.merge_size
    assert merge == model.config.vision_config.spatial_merge_size
    image_id = model.processor.image_token_id
    assert image_id == model.config.image_token_id == model.image_token_id
    runs = _runs(ids, image_id)
    assert len(layout.images) == len(runs) == len(image_rows)
    # the processor marks exactly the image placeholders as image modality (1), nothing as video
    types = batch.inputs["mm_token_type_ids"][example]
    assert torch.equal((types == 1).nonzero().flatten(), layout.positions("image"))
    assert not (types == 2).any()
    rope, _ = model.hf.model.get_rope_index(
        input_ids=batch.input_ids, mm_token_type_ids=batch.inputs["mm_token_type_ids"],
        image_grid_thw=thw, attention_mask=batch.inputs["attention_mask"],
    )
    begin, end = model.tokenizer.convert_tokens_to_ids([BEGIN, END])
    assert (begin, end) == (model.config.image_start_token_id, model.config.image_end_token_id)
    template = layout.positions("template")
    for lay, run, row in zip(layout.images, runs, image_rows):
        t, h, w = thw[row].tolist()
        assert t == 1
        assert lay.grid is not None and len(lay.grids) == 1 and not lay.separators
        assert lay.grid.shape == (h // merge, w // merge)
        # the processor's own count for this many patches
        assert run.numel() == t * h * w // merge**2
        assert torch.equal(lay.grid.positions.flatten(), run)
        # the boundary tokens sit right outside the run and are template, not image
        assert ids[run[0] - 1] == begin and ids[run[-1] + 1] == end
        assert torch.isin(torch.stack([run[0] - 1, run[-1] + 1]), template).all()
        # Row-major: the M-RoPE (height, width) positions of cell (r, c) are (base + r, base + c),
        # and its temporal position is the base.
        tpos, hpos, wpos = (rope[k, example][lay.grid.positions] for k in range(3))
        base = tpos[0, 0]
        assert (tpos == base).all()
        rows, cols = torch.meshgrid(torch.arange(h // merge), torch.arange(w // merge), indexing="ij")
        assert torch.equal(hpos - base, rows)
        assert torch.equal(wpos - base, cols)


def _blocks_image(rows: int, cols: int, cell: int) -> Image.Image:
    """An image of rows x cols blocks of cell x cell pixels, block (r, c) of one colour that encodes
    (r, c)."""
    pixels = np.zeros((rows * cell, cols * cell, 3), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            pixels[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = (40 * r + 10, 40 * c + 10, 128)
    return Image.fromarray(pixels)


def _check_patch_order(model, shapes: list[tuple[int, int]]):
    """Images whose sides are already multiples of patch * merge (smart_resize keeps them), with one
    colour per merged cell: the pixel_values rows that the vision tower's merge step fuses into
    token k (``merge**2`` consecutive rows) hold the colour of the grid cell at token k's position,
    so each image position is the image region of its grid cell."""
    ip = model.processor.image_processor
    merge, cell = ip.merge_size, ip.patch_size * ip.merge_size
    images = [_blocks_image(r, c, cell) for r, c in shapes]
    batch = model.prepare(images=[images], prompts=[PROMPT])
    assert batch.layouts[0].image_grids == shapes
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    pixels = batch.inputs["pixel_values"].unflatten(-1, (3, -1))  # [patches, channel, t * p * p]
    offset = 0
    for lay in batch.layouts[0].images:
        rows, cols = lay.grid.shape
        tokens = pixels[offset:offset + rows * cols * merge**2].unflatten(0, (rows * cols, merge**2))
        offset += rows * cols * merge**2
        # the model scatters the merged features into the placeholders in sequence order
        order = lay.positions
        for r in range(rows):
            for c in range(cols):
                k = int((order == lay.grid.positions[r, c]).nonzero()[0, 0])
                colour = torch.tensor([40 * r + 10, 40 * c + 10, 128]) / 255
                expected = ((colour - mean) / std)[:, None].expand_as(tokens[k][0])
                for patch in tokens[k]:
                    torch.testing.assert_close(patch, expected.to(patch.dtype), atol=2e-2, rtol=0)
    assert offset == pixels.shape[0]


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("glm4v", device="cpu")


@pytest.fixture(scope="module")
def pictures():
    return [_image(h, w, seed=k) for k, (h, w) in enumerate(SIZES)]


def test_chat_template(model):
    text = model.family.format_prompt(model.processor, PROMPT, 2)
    image = f"{BEGIN}<|image|>{END}"
    assert text == f"[gMASK]<sop><|user|>\n{image}{image}{PROMPT}<|assistant|>\n"


@pytest.mark.parametrize("which", [0, 1, 2])
def test_one_image_grid(model, pictures, which):
    batch = model.prepare(images=[pictures[which]], prompts=PROMPT)
    thw = _expected_thw(model.processor, *SIZES[which])
    assert batch.inputs["image_grid_thw"].tolist() == [thw]
    assert batch.layouts[0].image_grids == [(thw[1] // 2, thw[2] // 2)]
    # the processor's own token count for an image of this size
    counts = model.processor._get_num_multimodal_tokens(image_sizes=[SIZES[which]])
    assert batch.layouts[0].positions("image").numel() == counts["num_image_tokens"][0]
    _check_example(model, batch, 0, [0])


def test_two_images_of_different_shapes(model, pictures):
    batch = model.prepare(images=[pictures[:2]], prompts=[PROMPT])
    expected = [_expected_thw(model.processor, *size) for size in SIZES[:2]]
    assert batch.inputs["image_grid_thw"].tolist() == expected
    assert expected[0] != expected[1]  # the two grids really differ
    _check_example(model, batch, 0, [0, 1])


def test_batch_indexes_the_flat_grid_list(model, pictures):
    """image_grid_thw lists the batch's images flat: example 1's images are rows 1 and 2."""
    batch = model.prepare(images=[[pictures[0]], [pictures[2], pictures[1]]],
                          prompts=[PROMPT, OTHER_PROMPT])
    expected = [_expected_thw(model.processor, *SIZES[i]) for i in (0, 2, 1)]
    assert batch.inputs["image_grid_thw"].tolist() == expected
    _check_example(model, batch, 0, [0])
    _check_example(model, batch, 1, [1, 2])


def test_positions_trace_to_their_image_region(model):
    _check_patch_order(model, [(2, 4), (3, 2)])


def test_placeholder_count_mismatch_raises(model, pictures):
    batch = model.prepare(images=[pictures[:2]], prompts=[PROMPT])
    placeholders = batch.layouts[0].positions("image")
    layouts = model.family.image_layouts
    with pytest.raises(LayoutError, match="placeholder tokens"):
        layouts(batch.inputs, 0, [0, 1], placeholders[:-1], model.config, model.processor)
    with pytest.raises(LayoutError, match="image_grid_thw"):
        layouts(batch.inputs, 0, [0, 2], placeholders, model.config, model.processor)


def test_sandwich_norm_hooks_are_the_residual_writes(model, pictures):
    """hook_attn_out and hook_mlp_out are the normalised writes: resid_pre + attn_out = resid_mid
    and resid_mid + mlp_out = resid_post at every layer, and attn_out is not o_proj's output."""
    batch = model.prepare(images=[[pictures[0]], [pictures[1]]], prompts=[PROMPT, OTHER_PROMPT])
    names = ["blocks.*.hook_resid_pre", "blocks.*.hook_attn_out", "blocks.*.hook_resid_mid",
             "blocks.*.hook_mlp_out", "blocks.*.hook_resid_post"]
    outputs = {}
    hooks = [model.module(f"{model.family.lm_layers}.{layer}.{model.family.lm_attn_out}")
             .register_forward_hook(lambda m, i, o, layer=layer: outputs.__setitem__(layer, o))
             for layer in range(model.n_layers)]
    try:
        with torch.no_grad(), model.capture(names) as cache:
            model.forward(batch)
    finally:
        for hook in hooks:
            hook.remove()
    for layer in range(model.n_layers):
        pre, attn, mid, mlp, post = (cache[n.replace("*", str(layer))] for n in names)
        torch.testing.assert_close(pre + attn, mid, atol=1e-5, rtol=0)
        torch.testing.assert_close(mid + mlp, post, atol=1e-5, rtol=0)
        assert not torch.allclose(outputs[layer], attn, atol=1e-3)
