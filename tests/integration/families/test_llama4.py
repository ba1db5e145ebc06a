"""Llama 4's tiles and global view on the tiny model: each tile and the global view is a 2x2 grid,
checked against the image processor's own ``aspect_ratios`` and pixels, traced token by token to
the feature that the model's ``get_image_features`` / ``masked_scatter`` puts there; the tile
separators and image markers are template tokens; the language model's dense and MoE layers, and
its chunked and full attention, are what the hooks read."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llama4.modeling_llama4 import pixel_shuffle

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPT = "Is there a red heart?"
MARKERS = ("<|image_start|>", "<|image_end|>", "<|image|>", "<|tile_x_separator|>", "<|tile_y_separator|>")
SHAPES = [[(40, 56)], [(72, 48)], [(20, 100)], [(100, 20)], [(32, 32)], [(40, 56), (20, 100)],
          [(32, 32), (72, 48)]]


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # pixel values 1..255: a zero pixel after rescaling is padding, never the image
    return Image.fromarray(rng.integers(1, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("llama4", device="cpu")


def side(model) -> int:
    """Tokens per tile side: the tower's patches per side merged by the pixel shuffle ratio."""
    vision = model.config.vision_config
    return int(vision.image_size // vision.patch_size * vision.pixel_shuffle_ratio)


def processor_arrangement(model, img) -> tuple[tuple[int, int], torch.Tensor]:
    """The image processor's own ``(rows, cols)`` of tiles for one image, and its views' pixels."""
    out = model.processor.image_processor([img], return_tensors="pt")
    rows, cols = (int(v) for v in out["aspect_ratios"].reshape(-1))
    return (rows, cols), out["pixel_values"]


def coded_sequence(batch, image_token_id: int, per_view: int) -> torch.Tensor:
    """``[batch, length, 2]``: at each placeholder, ``(view, token)`` of the feature the model puts
    there: the view's index in ``pixel_values`` and the token's index within the view, as
    ``get_image_features`` keeps one row of features per view and ``masked_scatter`` fills the
    placeholders of the whole batch in order."""
    ids = batch.input_ids
    views = batch.inputs["pixel_values"].shape[0]
    features = torch.stack(torch.meshgrid(torch.arange(views), torch.arange(per_view), indexing="ij"), -1)
    codes = torch.full((*ids.shape, 2), float("nan"))
    mask = (ids == image_token_id).unsqueeze(-1).expand_as(codes)
    return codes.masked_scatter(mask, features.reshape(-1, 2).float())


def image_extent(pixels: torch.Tensor) -> tuple[int, int]:
    """``(rows, cols)`` of a view's pixels that are image, not the processor's zero padding."""
    content = pixels.abs().sum(0) > 0
    return int(content.any(1).sum()), int(content.any(0).sum())


def check_boxes(lay, views: list[torch.Tensor], rows: int, cols: int) -> None:
    """Each tile's box is its share of the image, measured on the padded pixels: the image fills
    the canvas from the top left, and the tiles of a row (column) split its width (height)."""
    heights = [image_extent(views[r * cols])[0] for r in range(rows)]
    widths = [image_extent(views[c])[1] for c in range(cols)]
    total_h, total_w = sum(heights), sum(widths)
    grids = {g.name: g for g in lay.grids}
    for r in range(rows):
        for c in range(cols):
            assert image_extent(views[r * cols + c]) == (heights[r], widths[c])
            box = (sum(widths[:c]) / total_w, sum(heights[:r]) / total_h,
                   sum(widths[:c + 1]) / total_w, sum(heights[:r + 1]) / total_h)
            np.testing.assert_allclose(grids[f"tile_{r}_{c}"].box, box, atol=1e-9)


@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "+".join(f"{h}x{w}" for h, w in s))
def test_tiles_and_global_view_follow_the_processor_and_the_model(model, shapes):
    imgs = [image(h, w, seed=k) for k, (h, w) in enumerate(shapes)]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    layout, tokens = batch.layouts[0], batch.layouts[0].tokens
    n = side(model)
    codes = coded_sequence(batch, model.image_token_id, n * n)[0]
    pixels = batch.inputs["pixel_values"]
    template = set(layout.groups["template"].tolist())
    assert len(layout.images) == len(shapes)
    a, b = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    view = 0
    for lay, img in zip(layout.images, imgs):
        (rows, cols), own = processor_arrangement(model, img)
        tiled = rows * cols > 1
        names = [f"tile_{r}_{c}" for r in range(rows) for c in range(cols)] if tiled else []
        assert [g.name for g in lay.grids] == names + ["global"]
        assert lay.main == "global" and lay.grid.name == "global" and not lay.separators
        assert all(g.shape == (n, n) for g in lay.grids)
        # the views the processor made for this image alone are the batch's, in the same order
        assert own.shape[0] == len(lay.grids)
        assert torch.equal(pixels[view:view + len(lay.grids)], own.to(pixels.dtype))
        for k, grid in enumerate(lay.grids):
            # cell (a, b) of view k holds token a * side + b of that view's features
            expected = torch.stack([torch.full_like(a, view + k), a * n + b], -1).float()
            assert torch.equal(codes[grid.positions], expected), grid.name
        assert lay.grid.box == (0.0, 0.0, 1.0, 1.0)
        if tiled:
            check_boxes(lay, list(own[:-1]), rows, cols)
        # the span: <|image_start|>, rows of tiles split by x / y separators, <|image|>, the global
        # view, <|image_end|>; every marker is a template token
        first = max(k for k in range(int(lay.positions[0])) if tokens[k] == "<|image_start|>")
        last = int(lay.positions[-1]) + 1
        span = list(tokens[first:last + 1])
        cell = ["<|patch|>"] * (n * n)
        row = sum(([*cell, "<|tile_x_separator|>"] for _ in range(cols - 1)), []) + cell
        tiles = sum(([*row, "<|tile_y_separator|>"] for _ in range(rows)), []) if tiled else []
        assert span == ["<|image_start|>", *tiles, "<|image|>", *cell, "<|image_end|>"]
        markers = [first + k for k, t in enumerate(span) if t in MARKERS]
        assert len(markers) == 3 + (rows * (cols - 1) + rows if tiled else 0)
        assert set(markers) <= template
        view += len(lay.grids)
    assert view == pixels.shape[0]


def test_pixel_shuffle_keeps_row_major_blocks(model):
    """Token (a, b) of a tile merges patches (2a..2a+1, 2b..2b+1): the grid is spatial."""
    n = side(model)
    patches = 2 * n
    i, j = torch.meshgrid(torch.arange(patches), torch.arange(patches), indexing="ij")
    flat = torch.stack([i, j], -1).float().reshape(1, patches * patches, 2)  # row-major, as unfolded
    ratio = model.config.vision_config.pixel_shuffle_ratio
    merged = pixel_shuffle(flat, ratio)  # [1, n * n, 8]
    assert merged.shape == (1, n * n, 8)
    for a in range(n):
        for b in range(n):
            cells = merged[0, a * n + b].reshape(4, 2).long().tolist()
            assert set(map(tuple, cells)) == {(2 * a + da, 2 * b + db) for da in (0, 1) for db in (0, 1)}


def test_dense_and_moe_layers_write_what_the_hooks_read(model):
    """Layer 0 is dense, layer 1 a mixture of experts; both writes add up to the residual stream
    and equal the feed-forward module's own output (the MoE's flattened to [batch * pos, d])."""
    text = model.config.text_config
    assert [int(layer in text.moe_layers) for layer in range(text.num_hidden_layers)] == [0, 1]
    batch = model.prepare(images=[[image(40, 56)], [image(20, 100, seed=1)]],
                          prompts=[PROMPT, "Is the blue star above a green circle?"])
    raw = {}
    handles = [model.module(f"{model.family.lm_layers}.{layer}.feed_forward").register_forward_hook(
        lambda mod, args, out, layer=layer: raw.__setitem__(layer, out[0] if isinstance(out, tuple) else out))
        for layer in range(text.num_hidden_layers)]
    try:
        with model.capture(["blocks.*.hook_mlp_out", "blocks.*.hook_resid_mid", "blocks.*.hook_resid_post"]) as cache:
            model.forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    shape = batch.input_ids.shape
    assert raw[0].shape == (*shape, text.hidden_size) and raw[1].shape == (shape.numel(), text.hidden_size)
    for layer in range(text.num_hidden_layers):
        mlp = cache[f"blocks.{layer}.hook_mlp_out"]
        assert torch.equal(mlp, raw[layer].reshape(*shape, -1))
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_mid"] + mlp,
                                   cache[f"blocks.{layer}.hook_resid_post"], atol=1e-6, rtol=0)


def test_chunked_layer_attends_within_its_chunk_and_the_nope_layer_to_everything(model):
    text = model.config.text_config
    assert text.no_rope_layers == [1, 0] and text.layer_types == ["chunked_attention", "full_attention"]
    batch = model.prepare(images=[[image(40, 56)]], prompts=[PROMPT])
    length = batch.input_ids.shape[1]
    assert length > 2 * text.attention_chunk_size  # the mask really cuts the sequence
    with model.capture("blocks.*.attn.hook_pattern") as cache:
        model.forward(batch)
    q = torch.arange(length)
    same_chunk = (q[:, None] // text.attention_chunk_size) == (q[None, :] // text.attention_chunk_size)
    causal = q[:, None] >= q[None, :]
    chunked, full = cache["blocks.0.attn.hook_pattern"][0], cache["blocks.1.attn.hook_pattern"][0]
    assert torch.equal(chunked > 0, (causal & same_chunk).expand_as(chunked))
    assert torch.equal(full > 0, causal.expand_as(full))


def test_batch_of_two_prompts_runs(model):
    batch = model.prepare(images=[[image(20, 100)], [image(72, 48), image(32, 32, seed=1)]],
                          prompts=[PROMPT, "Is the blue star above a green circle?"])
    names = [[g.name for g in lay.grids] for lay in batch.layouts[1].images]
    rows, cols = processor_arrangement(model, image(72, 48))[0]
    assert names == [[f"tile_{r}_{c}" for r in range(rows) for c in range(cols)] + ["global"], ["global"]]
    assert torch.isfinite(model.forward(batch).logits).all()


def test_arrangement_disagreeing_with_the_image_size_raises_layout_error(model):
    batch = model.prepare(images=[[image(40, 56)]], prompts=[PROMPT])
    assert processor_arrangement(model, image(40, 56))[0] != processor_arrangement(model, image(20, 100))[0]
    placeholders = (batch.input_ids[0] == model.image_token_id).nonzero().flatten()
    family = model.family
    with pytest.raises(LayoutError, match="arranges it as"):
        family.image_layouts(batch.inputs, 0, [0], placeholders, model.config, model.processor,
                             sizes=((20, 100),))
    with pytest.raises(LayoutError, match="its size was not given"):
        family.image_layouts(batch.inputs, 0, [0], placeholders, model.config, model.processor)
    with pytest.raises(LayoutError, match="2 images were given"):
        family.image_layouts(batch.inputs, 0, [0, 1], placeholders, model.config, model.processor,
                             sizes=((40, 56), (40, 56)))


def test_editing_the_moe_write_sees_it_as_a_sequence(model):
    """An edit of the MoE layer's flattened output receives [batch, pos, d] like the capture, and
    replacing it by the captured value of another run reproduces that run's MLP write."""
    from lvlm_probe.hooks.patching import editing

    prompts = [PROMPT, "Is the blue star above a green circle?"]
    clean = model.prepare(images=[[image(40, 56)], [image(20, 100, seed=1)]], prompts=prompts)
    other = model.prepare(images=[[image(40, 56, seed=3)], [image(20, 100, seed=4)]], prompts=prompts)
    with model.capture("blocks.1.hook_mlp_out") as theirs:
        expected = model.forward(other).logits
    shapes = []

    def swap(value):
        shapes.append(tuple(value.shape))
        return theirs["blocks.1.hook_mlp_out"]

    with editing(model, {"blocks.1.hook_mlp_out": swap}), model.capture("blocks.1.hook_mlp_out") as ours:
        logits = model.forward(clean).logits
    assert shapes == [(*clean.input_ids.shape, model.d_model)]
    assert torch.equal(ours["blocks.1.hook_mlp_out"], theirs["blocks.1.hook_mlp_out"])
    assert not torch.allclose(logits, expected)  # layer 0 and the attention still see the clean image
