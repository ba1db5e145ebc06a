"""LFM2-VL on its tiny model: tiles plus a thumbnail, or one view, each a grid shaped by the
processor's ``spatial_shapes`` and laid row-major over its own run of ``<image>`` tokens after its
``<|img_row_R_col_C|>`` / ``<|img_thumbnail|>`` marker; traced, token by token, to the feature that
``get_image_features`` and ``masked_scatter`` put there and to the patches that feature reads; and
the LFM2 short-convolution layers: causal, unmasked, indifferent to left padding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

FAMILY = "lfm2_vl"
PROMPT = "Is there a red heart?"
OTHER_PROMPT = "Is the blue star above the green circle? Answer yes or no."
# (height, width): one view (40x56), tiles in 2 rows x 1 column (72x48), 2x2 tiles (100x100),
# 1 row x 3 columns (40x120), as the processor arranges them (checked below, not assumed).
SIZES = [(40, 56), (72, 48), (100, 100), (40, 120)]


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny(FAMILY, device="cpu")


def processor_info(model, img) -> dict:
    """The image processor's own arrangement of one image: ``image_rows``, ``image_cols``,
    ``image_sizes`` (its single-view / thumbnail size), ``spatial_shapes`` of its views."""
    out = model.processor.image_processor([img], return_row_col_info=True, return_tensors="pt")
    return {"rows": int(out["image_rows"][0]), "cols": int(out["image_cols"][0]),
            "size": tuple(int(x) for x in out["image_sizes"][0]),
            "shapes": out["spatial_shapes"].tolist()}


def view_codes(batch, image_token_id: int, factor: int) -> torch.Tensor:
    """``[batch, length, 2]``: at each placeholder, ``(view, token)`` of the feature the model puts
    there: ``get_image_features`` gives each view ``prod(spatial_shapes[v] // factor)`` features
    in order and ``masked_scatter`` fills the placeholders of the whole batch in order."""
    counts = (batch.inputs["spatial_shapes"] // factor).prod(-1).tolist()
    features = torch.cat([torch.stack([torch.full((n,), v), torch.arange(n)], -1)
                          for v, n in enumerate(counts)]).float()
    ids = batch.input_ids
    codes = torch.full((*ids.shape, 2), float("nan"))
    mask = (ids == image_token_id).unsqueeze(-1).expand_as(codes)
    return codes.masked_scatter(mask, features.reshape(-1))


def patches_of(model, pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[height/p * width/p, 3 * p * p]`` normalised patches of a uint8 ``[3, H, W]`` image, in
    the processor's row-major patch order (patch rows, then columns; pixels, then channels)."""
    ip = model.processor.image_processor
    p = ip.encoder_patch_size
    x = tvF.resize(pixels, [height, width], interpolation=tvF.InterpolationMode.BILINEAR, antialias=True)
    mean = torch.tensor(ip.image_mean).view(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1)
    x = (x.float() * ip.rescale_factor - mean) / std
    x = x.reshape(3, height // p, p, width // p, p).permute(1, 3, 2, 4, 0)
    return x.reshape((height // p) * (width // p), -1)


def check_image(model, lay, img, codes, inputs, view: int) -> int:
    """Check one image's grids against the processor and the model; returns the next view."""
    info = processor_info(model, img)
    ip = model.processor.image_processor
    factor = model.config.downsample_factor
    rows, cols = info["rows"], info["cols"]
    tiled = rows * cols > 1
    names = [f"tile_{r}_{c}" for r in range(rows) for c in range(cols)] if tiled else []
    assert [g.name for g in lay.grids] == names + ["thumbnail"]
    assert lay.main == "thumbnail" and not lay.separators
    # the views' shapes in the batch are the processor's for this image alone
    n_views = len(names) + 1
    shapes = inputs["spatial_shapes"][view:view + n_views].tolist()
    assert shapes == info["shapes"]
    valid = inputs["pixel_attention_mask"][view:view + n_views].sum(-1).tolist()
    assert valid == [h * w for h, w in shapes]
    # a tile is tile_size pixels a side; the thumbnail (or only view) is the processor's resize
    per = ip.encoder_patch_size * factor
    tile_side = ip.tile_size // per
    thumb = (info["size"][0] // per, info["size"][1] // per)
    pixels = tvF.pil_to_tensor(img)
    for k, grid in enumerate(lay.grids):
        v = view + k
        h, w = shapes[k]
        assert grid.shape == (h // factor, w // factor)
        assert grid.shape == ((tile_side, tile_side) if grid.name != "thumbnail" else thumb)
        a, b = torch.meshgrid(torch.arange(grid.shape[0]), torch.arange(grid.shape[1]), indexing="ij")
        expected = torch.stack([torch.full_like(a, v), a * grid.shape[1] + b], -1).float()
        assert torch.equal(codes[grid.positions], expected)
        got = inputs["pixel_values"][v, :h * w]
        if grid.name == "thumbnail":
            assert grid.box == (0.0, 0.0, 1.0, 1.0)
            assert torch.allclose(got, patches_of(model, pixels, *info["size"]), atol=1e-5)
        else:
            r, c = divmod(k, cols)
            assert grid.box == (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)
            whole = patches_of(model, pixels, rows * ip.tile_size, cols * ip.tile_size)
            per_row = cols * ip.tile_size // ip.encoder_patch_size
            index = torch.arange(whole.shape[0]).reshape(-1, per_row)
            crop = index[r * h:(r + 1) * h, c * w:(c + 1) * w].reshape(-1)
            assert torch.allclose(got, whole[crop], atol=1e-5)
    return view + n_views


def tokens_before(layout, grid) -> str:
    return layout.tokens[int(grid.positions.reshape(-1)[0]) - 1]


@pytest.mark.parametrize("shapes", [[SIZES[0]], [SIZES[1]], [SIZES[2]], [SIZES[3]],
                                    [SIZES[0], SIZES[1]], [SIZES[2], SIZES[3]]])
def test_views_follow_the_processor_and_the_model(model, shapes):
    """A first prompt with one tiled image, then the images under test: their views are counted
    after the first prompt's in ``spatial_shapes`` and in the features."""
    first = image(*SIZES[1], seed=9)
    imgs = [image(h, w, seed=k) for k, (h, w) in enumerate(shapes)]
    batch = model.prepare(images=[[first], imgs], prompts=[OTHER_PROMPT, PROMPT])
    codes = view_codes(batch, model.image_token_id, model.config.downsample_factor)
    view = check_image(model, batch.layouts[0].images[0], first, codes[0], batch.inputs, 0)
    layout = batch.layouts[1]
    assert len(layout.images) == len(shapes)
    template = set(layout.groups["template"].tolist())
    for lay, img in zip(layout.images, imgs):
        view = check_image(model, lay, img, codes[1], batch.inputs, view)
        # markers: <|image_start|> ... <|image_end|> around the image, each tile's
        # <|img_row_R_col_C|> (1-based) and the thumbnail's <|img_thumbnail|>; all template
        pos = lay.positions
        begin, end = int(pos[0]) - 1, int(pos[-1]) + 1
        if len(lay.grids) > 1:
            begin -= 1
        assert layout.tokens[begin] == "<|image_start|>" and layout.tokens[end] == "<|image_end|>"
        markers = [tokens_before(layout, g) for g in lay.grids]
        expected = [f"<|img_row_{int(n.split('_')[1]) + 1}_col_{int(n.split('_')[2]) + 1}|>"
                    for n in (g.name for g in lay.grids[:-1])] + ["<|img_thumbnail|>"]
        assert markers == (expected if len(lay.grids) > 1 else ["<|image_start|>"])
        gaps = set(range(begin, end + 1)) - set(pos.tolist())
        assert len(gaps) == 2 + (len(lay.grids) if len(lay.grids) > 1 else 0)
        assert gaps <= template
    assert view == batch.inputs["spatial_shapes"].shape[0]
    assert torch.isfinite(model.forward(batch).logits).all()


def test_the_sizes_cover_one_view_and_three_tile_arrangements(model):
    arrangements = [(processor_info(model, image(h, w))["rows"], processor_info(model, image(h, w))["cols"])
                    for h, w in SIZES]
    assert arrangements[0] == (1, 1)
    assert len(set(arrangements[1:])) == 3 and all(r * c > 1 for r, c in arrangements[1:])


def test_each_token_reads_its_block_of_patches(model):
    """Feature ``t`` of a view with ``w`` patch columns depends on exactly the patches
    ``(f*a + i, f*b + j)``, ``a, b = divmod(t, w / f)``: the grid cell ``(a, b)``'s block."""
    batch = model.prepare(images=[[image(*SIZES[1]), image(*SIZES[0], seed=1)]], prompts=[PROMPT])
    inputs = batch.inputs
    hf = model.hf.model
    factor = model.config.downsample_factor
    with torch.no_grad():
        states = hf.vision_tower(pixel_values=inputs["pixel_values"], spatial_shapes=inputs["spatial_shapes"],
                                 pixel_attention_mask=inputs["pixel_attention_mask"]).last_hidden_state
    leaf = states.clone().requires_grad_(True)
    handle = hf.vision_tower.register_forward_hook(
        lambda module, args, kwargs, out: type(out)(last_hidden_state=leaf), with_kwargs=True)
    try:
        features = hf.get_image_features(pixel_values=inputs["pixel_values"],
                                         spatial_shapes=inputs["spatial_shapes"],
                                         pixel_attention_mask=inputs["pixel_attention_mask"]).pooler_output
    finally:
        handle.remove()
    for v, (h, w) in enumerate(inputs["spatial_shapes"].tolist()):
        assert features[v].shape[0] == (h // factor) * (w // factor)
        for t in range(features[v].shape[0]):
            (grad,) = torch.autograd.grad(features[v][t].sum(), leaf, retain_graph=True)
            read = grad.abs().sum(-1).nonzero().tolist()
            a, b = divmod(t, w // factor)
            block = [[v, (factor * a + i) * w + factor * b + j] for i in range(factor) for j in range(factor)]
            assert sorted(read) == sorted(block)


def test_conv_layers_are_the_unmasked_mixers(model):
    """Layers typed ``conv`` are declared, hold ``conv`` and no ``self_attn``, and their mixer is
    causal as ``conv(hidden_states)``: a prefix's outputs do not depend on what follows."""
    kinds = model.config.text_config.layer_types
    assert model.family.unmasked_mixing_layers(model.config) == [i for i, k in enumerate(kinds) if k == "conv"]
    assert model.family.self_attention_layers(model.config) == [
        i for i, k in enumerate(kinds) if k == "full_attention"]
    layers = model.module(model.family.lm_layers)
    for layer in model.family.unmasked_mixing_layers(model.config):
        mixer = layers[layer].get_submodule(model.family.lm_mixer)
        assert not hasattr(layers[layer], "self_attn")
        x = torch.randn(1, 9, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(layer))
        with torch.no_grad():
            full = mixer(x)
            other = mixer(torch.cat([x[:, :5], -x[:, 5:]], 1))
        assert torch.allclose(full[:, :5], mixer(x[:, :5]), atol=1e-6)
        assert torch.equal(full[:, :5], other[:, :5]) and not torch.allclose(full[:, 5:], other[:, 5:])


def test_left_padding_changes_no_logit(model):
    """The shorter prompt is left-padded: its conv layers see zeroed inputs there, which add
    nothing to the window, and attention masks them; its logits match its own unpadded run."""
    imgs = [[image(*SIZES[0])], [image(*SIZES[1], seed=1)]]
    batch = model.prepare(images=imgs, prompts=[PROMPT, OTHER_PROMPT])
    mask = batch.inputs["attention_mask"]
    assert not mask[0].all() and mask[1].all()
    alone = model.prepare(images=imgs[:1], prompts=[PROMPT])
    n = alone.input_ids.shape[1]
    assert torch.equal(batch.input_ids[0, -n:], alone.input_ids[0])
    padded = model.forward(batch).logits[0, -n:]
    assert torch.allclose(padded, model.forward(alone).logits[0], atol=1e-5)


def test_views_disagreeing_with_the_sequence_raise_layout_error(model):
    batch = model.prepare(images=[[image(*SIZES[1])]], prompts=[PROMPT])
    ids = batch.input_ids[0]
    placeholders = (ids == model.image_token_id).nonzero().flatten()
    family = model.family
    inputs = dict(batch.inputs)
    inputs["spatial_shapes"] = batch.inputs["spatial_shapes"].flip(0)  # the thumbnail's shape first
    with pytest.raises(LayoutError, match="view 0 has 16 valid patches, not its spatial_shapes 6x4"):
        family.image_layouts(inputs, 0, [0], placeholders, model.config, model.processor)
    inputs["pixel_attention_mask"] = batch.inputs["pixel_attention_mask"].flip(0)  # and its patches
    with pytest.raises(LayoutError, match="has 4 image tokens but view 0 is 6x4 patches, 3x2 tokens"):
        family.image_layouts(inputs, 0, [0], placeholders, model.config, model.processor)
    with pytest.raises(LayoutError, match="holds 1 images but 2"):
        family.image_layouts(batch.inputs, 0, [0, 1], placeholders, model.config, model.processor)
