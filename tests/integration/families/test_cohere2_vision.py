"""Command A Vision's tiles and thumbnail on the tiny model: each view is a 2x2 grid followed by a
line break, checked against the image processor's own view count and pixels and traced, token by
token, to the feature that the model's ``get_image_features`` / ``masked_scatter`` puts there; the
markers and line breaks are template tokens. Also the Cohere2 LM's parallel blocks, its sliding
window and full attention layers, and logits read without the checkpoint's logit scale."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.cohere2_vision.image_processing_cohere2_vision import (
    get_optimal_tiled_canvas,
)

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPT = "Is there a red heart?"
SHAPES = [[(40, 56)], [(72, 48)], [(20, 100)], [(100, 20)], [(32, 32)], [(40, 56), (20, 100)],
          [(32, 32), (72, 48)]]


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("cohere2_vision", device="cpu")


def side(model) -> int:
    """Tokens per view side: the tower's patches per side merged by the downsample factor."""
    vision = model.config.vision_config
    return vision.image_size // vision.patch_size // model.config.downsample_factor


def tile(model) -> int:
    return int(model.processor.image_processor.size["height"])


def processor_views(model, img) -> int:
    """The image processor's own count of views (tiles plus thumbnail) of one image."""
    out = model.processor.image_processor([img], return_tensors="pt")
    return int(torch.as_tensor(out["num_patches"]).reshape(-1)[0])


def arrangement(model, img) -> tuple[int, int]:
    """``(rows, cols)`` by the image processor's own canvas choice (it returns ``(cols, rows)``)."""
    ip = model.processor.image_processor
    cols, rows = get_optimal_tiled_canvas((img.height, img.width), (tile(model), tile(model)),
                                          ip.min_patches, ip.max_patches)
    return rows, cols


def resized(model, img, height: int, width: int) -> torch.Tensor:
    """The image as the image processor stretches and normalises it to ``height x width``."""
    out = model.processor.image_processor([img], crop_to_patches=False, return_tensors="pt",
                                          size={"height": height, "width": width})
    return out["pixel_values"][0]


def coded_sequence(batch, image_token_id: int, per_view: int) -> torch.Tensor:
    """``[batch, length, 2]``: at each placeholder, ``(view, token)`` of the feature the model puts
    there: ``get_image_features`` keeps one row of features per view in ``pixel_values`` order and
    ``masked_scatter`` fills the placeholders of the whole batch in order."""
    ids = batch.input_ids
    views = batch.inputs["pixel_values"].shape[0]
    features = torch.stack(torch.meshgrid(torch.arange(views), torch.arange(per_view), indexing="ij"), -1)
    codes = torch.full((*ids.shape, 2), float("nan"))
    mask = (ids == image_token_id).unsqueeze(-1).expand_as(codes)
    return codes.masked_scatter(mask, features.reshape(-1, 2).float())


@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "+".join(f"{h}x{w}" for h, w in s))
def test_tiles_and_thumbnail_follow_the_processor_and_the_model(model, shapes):
    imgs = [image(h, w, seed=k) for k, (h, w) in enumerate(shapes)]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    layout, tokens = batch.layouts[0], batch.layouts[0].tokens
    n, size = side(model), tile(model)
    codes = coded_sequence(batch, model.image_token_id, n * n)[0]
    pixels = batch.inputs["pixel_values"]
    template = set(layout.groups["template"].tolist())
    processor = model.processor
    assert len(layout.images) == len(shapes)
    a, b = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    view = 0
    for lay, img in zip(layout.images, imgs):
        rows, cols = arrangement(model, img)
        tiled = rows * cols > 1
        assert processor_views(model, img) == len(lay.grids) == (rows * cols + 1 if tiled else 1)
        names = [f"tile_{r}_{c}" for r in range(rows) for c in range(cols)] if tiled else []
        assert [g.name for g in lay.grids] == names + ["thumbnail"]
        assert lay.main == "thumbnail" and not lay.separators
        assert all(g.shape == (n, n) for g in lay.grids)
        for k, grid in enumerate(lay.grids):
            # cell (a, b) of view k holds token a * side + b of that view's features
            expected = torch.stack([torch.full_like(a, view + k), a * n + b], -1).float()
            assert torch.equal(codes[grid.positions], expected), grid.name
            if grid.name == "thumbnail":
                assert grid.box == (0.0, 0.0, 1.0, 1.0)
                torch.testing.assert_close(pixels[view + k], resized(model, img, size, size), atol=1e-5, rtol=0)
            else:
                r, c = divmod(k, cols)
                assert grid.box == (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)
                whole = resized(model, img, rows * size, cols * size)
                crop = whole[:, r * size:(r + 1) * size, c * size:(c + 1) * size]
                torch.testing.assert_close(pixels[view + k], crop, atol=1e-5, rtol=0)
        # the span: <|START_OF_IMG|>, each view's placeholders then a line break, <|END_OF_IMG|>;
        # the markers and line breaks are template tokens
        first = max(k for k in range(int(lay.positions[0])) if tokens[k] == processor.boi_token)
        last = int(lay.positions[-1]) + 2
        span = list(tokens[first:last + 1])
        per_view = [processor.image_token] * (n * n) + [processor.img_line_break_token]
        assert span == [processor.boi_token, *per_view * len(lay.grids), processor.eoi_token]
        markers = [first + k for k, t in enumerate(span) if t != processor.image_token]
        assert len(markers) == 2 + len(lay.grids) and set(markers) <= template
        view += len(lay.grids)
    assert view == pixels.shape[0]


def test_pixel_shuffle_keeps_row_major_blocks(model):
    """Token (a, b) of a view merges patches (2a..2a+1, 2b..2b+1): the grid is spatial."""
    n = side(model)
    patches = 2 * n
    i, j = torch.meshgrid(torch.arange(patches), torch.arange(patches), indexing="ij")
    flat = torch.stack([i, j], -1).float().reshape(1, patches * patches, 2)  # row-major, as SigLIP's
    merged = model.hf.model.multi_modal_projector.pixel_shuffle(flat).reshape(1, n * n, -1)
    for a in range(n):
        for b in range(n):
            cells = merged[0, a * n + b].reshape(4, 2).long().tolist()
            assert set(map(tuple, cells)) == {(2 * a + da, 2 * b + db) for da in (0, 1) for db in (0, 1)}


def test_parallel_blocks_write_attention_and_mlp_beside_each_other(model):
    """Attention and MLP both read the layer's normalised input; resid_post adds both writes."""
    batch = model.prepare(images=[[image(40, 56)], [image(20, 100, seed=1)]],
                          prompts=[PROMPT, "Is the blue star above a green circle?"])
    with model.capture(["blocks.*.hook_resid_pre", "blocks.*.hook_attn_out", "blocks.*.hook_mlp_out",
                        "blocks.*.hook_resid_post"]) as cache:
        model.forward(batch)
    for layer in range(model.n_layers):
        pre, attn, mlp, post = (cache[f"blocks.{layer}.hook_{x}"] for x in ("resid_pre", "attn_out", "mlp_out",
                                                                           "resid_post"))
        torch.testing.assert_close(pre + attn + mlp, post, atol=1e-5, rtol=0)


def test_sliding_window_layer_and_full_layer(model):
    text = model.config.text_config
    assert text.layer_types == ["sliding_attention", "full_attention"]
    batch = model.prepare(images=[[image(40, 56)]], prompts=[PROMPT])
    length = batch.input_ids.shape[1]
    assert length > 2 * text.sliding_window  # the window really cuts the sequence
    with model.capture("blocks.*.attn.hook_pattern") as cache:
        model.forward(batch)
    q = torch.arange(length)
    causal = q[:, None] >= q[None, :]
    window = causal & (q[:, None] - q[None, :] < text.sliding_window)
    sliding, full = cache["blocks.0.attn.hook_pattern"][0], cache["blocks.1.attn.hook_pattern"][0]
    assert torch.equal(sliding > 0, window.expand_as(sliding))
    assert torch.equal(full > 0, causal.expand_as(full))


def test_logits_are_the_unscaled_unembedding(model):
    """The vision model's forward does not apply the text config's logit_scale (not 1 here)."""
    assert model.config.text_config.logit_scale != 1
    batch = model.prepare(images=[[image(40, 56)]], prompts=[PROMPT])
    with model.capture("ln_final.hook_out") as cache:
        logits = model.forward(batch).logits
    with torch.no_grad():
        torch.testing.assert_close(model.module(model.family.lm_head)(cache["ln_final.hook_out"]), logits,
                                   atol=1e-6, rtol=0)


def test_batch_of_two_prompts_runs(model):
    batch = model.prepare(images=[[image(20, 100)], [image(72, 48), image(32, 32, seed=1)]],
                          prompts=[PROMPT, "Is the blue star above a green circle?"])
    rows, cols = arrangement(model, image(72, 48))
    names = [[g.name for g in lay.grids] for lay in batch.layouts[1].images]
    assert names == [[f"tile_{r}_{c}" for r in range(rows) for c in range(cols)] + ["thumbnail"], ["thumbnail"]]
    assert torch.isfinite(model.forward(batch).logits).all()


def test_view_count_disagreeing_with_the_arrangement_raises_layout_error(model):
    batch = model.prepare(images=[[image(40, 56)]], prompts=[PROMPT])
    other = next(s for s in [(32, 64), (20, 100), (64, 32)]
                 if np.prod(arrangement(model, image(*s))) != np.prod(arrangement(model, image(40, 56))))
    placeholders = (batch.input_ids[0] == model.image_token_id).nonzero().flatten()
    family = model.family
    with pytest.raises(LayoutError, match="arranges it as"):
        family.image_layouts(batch.inputs, 0, [0], placeholders, model.config, model.processor, sizes=(other,))
    with pytest.raises(LayoutError, match="its size was not given"):
        family.image_layouts(batch.inputs, 0, [0], placeholders, model.config, model.processor)
    with pytest.raises(LayoutError, match="2 were given"):
        family.image_layouts(batch.inputs, 0, [0, 1], placeholders, model.config, model.processor,
                             sizes=((40, 56), (40, 56)))
