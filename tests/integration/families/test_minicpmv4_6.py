"""MiniCPM-V 4.6's source view and slices on the tiny model: each image's views checked against the
image processor's own slicing (``grids``, ``num_patches_per_image``, ``target_sizes``), traced token by
token to the feature that ``get_image_features`` / ``masked_scatter`` puts there, across the examples
of a padded batch; the ``<image_id>``, ``<image>``, ``<slice>`` tags and row newlines are template
tokens. Also the two mergers' row-major fusing of patch blocks, which makes each view a spatial grid."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPTS = ["Is there a red heart?", "Is the blue star above a green circle?"]
# (height, width) per image, per prompt: unsliced, a wide strip, a 2x2 cut, a tall strip, and mixes
BATCHES = [
    [[(40, 56)]], [[(40, 140)]], [[(130, 100)]], [[(150, 60)]], [[(20, 300)]],
    [[(40, 140), (130, 100)]], [[(40, 56), (150, 60)]],
    [[(130, 100)], [(40, 56), (40, 140)]], [[(20, 300), (48, 48)], [(150, 60)]],
]


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("minicpmv4_6", device="cpu")


def stride(model) -> int:
    """Patches per token side, from the processor's tokens-per-view divisor (patches / divisor)."""
    side = math.isqrt(model.processor.image_token_divisor)
    assert side * side == model.processor.image_token_divisor
    return side


def processed(model, imgs):
    """The image processor's own view of a flat image list: its slice grids, views per image and
    each view's (h, w) in patches."""
    out = model.processor.image_processor(imgs, return_tensors="pt")
    return [tuple(g) for g in out["grids"]], list(out["num_patches_per_image"]), out["target_sizes"].tolist()


def coded_sequence(batch, image_token_id: int, counts: list[int]) -> torch.Tensor:
    """``[batch, length, 2]``: at each placeholder, ``(view, token)`` of the feature the model puts
    there: the merger returns one block of features per view in ``target_sizes`` order, the model
    concatenates them and ``masked_scatter`` fills the whole batch's placeholders in order."""
    ids = batch.input_ids
    features = torch.cat([torch.stack([torch.full((n,), v), torch.arange(n)], -1) for v, n in enumerate(counts)])
    codes = torch.full((*ids.shape, 2), float("nan"))
    mask = (ids == image_token_id).unsqueeze(-1).expand_as(codes)
    return codes.masked_scatter(mask, features.float())


@pytest.mark.parametrize("shapes", BATCHES, ids=lambda b: "|".join("+".join(f"{h}x{w}" for h, w in p) for p in b))
def test_views_follow_the_processor_and_the_model(model, shapes):
    images = [[image(h, w, seed=10 * i + k) for k, (h, w) in enumerate(p)] for i, p in enumerate(shapes)]
    batch = model.prepare(images=images, prompts=PROMPTS[:len(shapes)])
    flat = [img for per_prompt in images for img in per_prompt]
    grids, views_per_image, targets = processed(model, flat)
    assert targets == batch.inputs["target_sizes"].tolist()  # the batch's views, in the same order
    n = stride(model)
    assert model.family.token_stride(model.config) == n
    counts = [(h // n) * (w // n) for h, w in targets]
    assert sum(counts) == int((batch.input_ids == model.image_token_id).sum())
    proc = model.processor
    view = image_index = 0
    for i, layout in enumerate(batch.layouts):
        codes = coded_sequence(batch, model.image_token_id, counts)[i]
        template = set(layout.groups["template"].tolist())
        tokens = layout.tokens
        assert len(layout.images) == len(images[i])
        for k, lay in enumerate(layout.images):
            rows, cols = grids[image_index]
            assert len(lay.grids) == views_per_image[image_index] == 1 + rows * cols
            names = ["source"] + [f"slice_{r}_{c}" for r in range(rows) for c in range(cols)]
            assert [g.name for g in lay.grids] == names and lay.main == "source" and not lay.separators
            for g, grid in enumerate(lay.grids):
                h, w = targets[view + g]
                assert grid.shape == (h // n, w // n), grid.name
                # cell (a, b) of view g holds token a * cols + b of that view's features
                a, b = torch.meshgrid(torch.arange(h // n), torch.arange(w // n), indexing="ij")
                expected = torch.stack([torch.full_like(a, view + g), a * (w // n) + b], -1).float()
                assert torch.equal(codes[grid.positions], expected), grid.name
                if g == 0:
                    assert grid.box == (0.0, 0.0, 1.0, 1.0)
                else:
                    r, c = divmod(g - 1, cols)
                    assert grid.box == (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)
            # the span: <image_id>k</image_id><image> source </image>, then the slices row by row,
            # rows joined by a newline; everything but the placeholders is a template token
            runs = [[proc.image_token] * grid.positions.numel() for grid in lay.grids]
            newline = model.tokenizer.convert_ids_to_tokens(model.tokenizer.encode("\n", add_special_tokens=False))
            prefix = [proc.image_id_start_token, *model.tokenizer.tokenize(str(k)), proc.image_id_end_token,
                      proc.image_start_token]
            expected_span = [*prefix, *runs[0], proc.image_end_token]
            for r in range(rows):
                row = runs[1 + r * cols:1 + (r + 1) * cols]
                expected_span += (newline if r else []) + sum(
                    ([proc.slice_start_token, *run, proc.slice_end_token] for run in row), [])
            first = int(lay.positions[0]) - len(prefix)
            span = list(tokens[first:first + len(expected_span)])
            assert span == expected_span
            assert int(lay.positions[-1]) + 1 == first + len(expected_span) - 1  # the last closing tag
            markers = [first + p for p, t in enumerate(span) if t != proc.image_token]
            assert set(markers) <= template
            view += len(lay.grids)
            image_index += 1
    assert view == len(targets)


def test_patches_are_row_major_and_the_mergers_fuse_blocks(model):
    """The processor patchifies a view row by row; a change in patch (i, j) after the encoder
    reaches exactly token (i // stride, j // stride) of the view's grid through the window merger
    and the MLP merger: the grid is spatial and row-major."""
    proc, n = model.processor.image_processor, stride(model)
    p = proc.patch_size
    height, width = 2 * n * p, 3 * n * p
    coords = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")).float()
    patches = proc.reshape_by_patch(torch.cat([coords, coords[:1]]), p)  # [C, p, patches * p]
    per_patch = patches.reshape(3, p, -1, p).permute(2, 0, 1, 3)  # [patches, C, p, p]
    for k in range(per_patch.shape[0]):
        r, c = divmod(k, width // p)
        assert per_patch[k, 0].min() == r * p and per_patch[k, 1].min() == c * p

    tower, merger = model.hf.model.vision_tower, model.hf.model.merger
    window = model.config.vision_config.window_kernel_size[0]  # the window merger's fusing
    h, w = height // p, width // p
    target = torch.tensor([[h, w]], dtype=torch.int32)
    x = torch.randn(1, h * w, model.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(0))

    def tokens(states):
        with torch.no_grad():
            merged = tower.vit_merger(states, target)
            return merger(merged, target // window)[0]

    base = tokens(x)
    assert base.shape[0] == (h // n) * (w // n)
    for i, j in [(0, 0), (1, 2), (h - 1, w - 1), (n, 2 * n + 1), (h - 1, 0)]:
        bumped = x.clone()
        bumped[0, i * w + j] += 1.0
        changed = ((tokens(bumped) - base).abs().amax(-1) > 1e-6).nonzero().flatten().tolist()
        assert changed == [(i // n) * (w // n) + j // n], (i, j)


def test_two_prompts_run_and_keep_their_views_apart(model):
    images = [[image(130, 100)], [image(40, 56, seed=1), image(40, 140, seed=2)]]
    batch = model.prepare(images=images, prompts=PROMPTS)
    assert batch.layouts[0].positions("pad").numel() or batch.layouts[1].positions("pad").numel()
    names = [[g.name for g in lay.grids] for lay in batch.layouts[1].images]
    grids, _, _ = processed(model, images[1])
    assert names[0] == ["source"] and grids[0] == (0, 0)
    rows, cols = grids[1]
    assert names[1] == ["source"] + [f"slice_{r}_{c}" for r in range(rows) for c in range(cols)]
    assert torch.isfinite(model.forward(batch).logits).all()


def test_arrangement_disagreeing_with_the_processor_raises_layout_error(model):
    batch = model.prepare(images=[[image(130, 100)]], prompts=[PROMPTS[0]])
    placeholders = (batch.input_ids[0] == model.image_token_id).nonzero().flatten()
    family, ip = model.family, model.processor.image_processor
    other = next(s for s in [(40, 140), (150, 60), (40, 56)]
                 if ip.get_sliced_grid(s, ip.max_slice_nums, ip.scale_resolution)
                 != ip.get_sliced_grid((130, 100), ip.max_slice_nums, ip.scale_resolution))
    with pytest.raises(LayoutError, match="arranges it as"):
        family.image_layouts(batch.inputs, 0, [0], placeholders, model.config, model.processor, sizes=(other,))
    with pytest.raises(LayoutError, match="2 were given"):
        family.image_layouts(batch.inputs, 0, [0, 1], placeholders, model.config, model.processor,
                             sizes=((130, 100), (130, 100)))
    short = {**batch.inputs, "target_sizes": batch.inputs["target_sizes"][:1]}
    with pytest.raises(LayoutError, match="target_sizes"):
        family.image_layouts(short, 0, [0], placeholders, model.config, model.processor)


def test_projector_hook_holds_every_view_in_order(model):
    """The merger returns one tensor per view; projector.hook_out joins them, and they are exactly
    what replaces the placeholders (the LM's input at the image positions, in sequence order)."""
    batch = model.prepare(images=[[image(72, 48)], [image(40, 56, seed=1)]], prompts=PROMPTS)
    with torch.no_grad(), model.capture(["projector.hook_out", "blocks.0.hook_resid_pre"]) as cache:
        model.forward(batch)
    image_positions = torch.stack([layout.mask("image") for layout in batch.layouts])
    placed = cache["blocks.0.hook_resid_pre"][image_positions]
    assert cache["projector.hook_out"].shape == placed.shape
    torch.testing.assert_close(cache["projector.hook_out"], placed, atol=0, rtol=0)
