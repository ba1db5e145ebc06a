"""Janus layouts on the tiny model: per image ``<begin_of_image>``, one ``p x p`` grid of
``<image_placeholder>`` tokens (the tower's patches of the padded square, no class token),
``<end_of_image>``; the markers and the newlines between images are template tokens.

The grid side comes from the vision tower's own output, the padded box from the padding rows and
columns of the processor's ``pixel_values``, and every position is traced to its patch's aligner
output in the embeddings the language model receives. The image-generation modules never run."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

PROMPT = "Is there a red heart?"
SHAPES = [[(40, 56)], [(72, 48)], [(32, 32)], [(20, 100)], [(40, 56), (72, 48)], [(20, 100), (32, 32)]]


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("janus", device="cpu")


def tower_side(model, pixels: torch.Tensor) -> int:
    """Patch states per side of the vision tower's output (no class token)."""
    with torch.no_grad():
        states = model.hf.model.vision_model(pixels).last_hidden_state
    side = int(states.shape[1] ** 0.5)
    assert side * side == states.shape[1]
    return side


def lm_inputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The aligner's ``[images, patches, d]`` features and the embeddings the language model
    receives, both from the model's own forward pass."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.hf.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = model.hf(**batch.inputs)
    finally:
        handle.remove()
    return out.image_outputs.pooler_output, seen["embeds"]


def padded_box(model, pixels: torch.Tensor) -> tuple[float, ...]:
    """The padded square in fractions of the image, from the lines of padding colour around it."""
    ip = model.processor.image_processor
    fill = (torch.tensor(ip.background_color) / 255 - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)
    pad = (pixels - fill[:, None, None]).abs().amax(0) < 1e-5
    pad_rows, pad_cols = pad.all(1), pad.all(0)
    square = pixels.shape[-1]
    h, w = square - int(pad_rows.sum()), square - int(pad_cols.sum())
    top, left = int(pad_rows.int().argmin()), int(pad_cols.int().argmin())
    return (-left / w, -top / h, (square - left) / w, (square - top) / h)


@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "+".join(f"{h}x{w}" for h, w in s))
def test_each_image_is_one_framed_square_grid(model, shapes):
    imgs = [image(h, w, seed=k) for k, (h, w) in enumerate(shapes)]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    layout, processor = batch.layouts[0], model.processor
    pixels = batch.inputs["pixel_values"]
    side = tower_side(model, pixels)
    assert processor.num_image_tokens == side * side
    tokens = layout.tokens
    placeholders = [k for k, t in enumerate(tokens) if t == processor.image_token]
    assert len(placeholders) == len(imgs) * side * side
    features, embeds = lm_inputs(model, batch)
    template = set(layout.groups["template"].tolist())
    with torch.no_grad():
        for k, (lay, size) in enumerate(zip(layout.images, shapes)):
            (grid,) = lay.grids
            assert grid.name == "patches" and lay.grid is grid and grid.shape == (side, side)
            assert not lay.separators and lay.size == size
            run = placeholders[k * side * side:(k + 1) * side * side]
            assert grid.positions.reshape(-1).tolist() == run
            # framed by the markers, which are template tokens
            first, last = run[0], run[-1]
            assert tokens[first - 1] == processor.image_start_token and first - 1 in template
            assert tokens[last + 1] == processor.image_end_token and last + 1 in template
            # cell (r, c) holds the aligner's output for patch r * side + c of this image
            for r in range(side):
                for c in range(side):
                    assert torch.equal(embeds[0, grid.positions[r, c]], features[k, r * side + c])
            assert grid.box == pytest.approx(padded_box(model, pixels[k]))
            if size[0] == size[1]:
                assert grid.box == (0.0, 0.0, 1.0, 1.0)
    # images follow one another with only template tokens between them; the prompt comes after
    for left, right in zip(layout.images, layout.images[1:]):
        between = range(int(left.positions[-1]) + 1, int(right.positions[0]))
        assert len(between) > 2 and set(between) <= template
    after = int(layout.images[-1].positions[-1]) + 2  # past <end_of_image>
    prompt = layout.groups["prompt"]
    assert int(prompt[0]) > after - 1 and set(range(after, int(prompt[0]))) <= template
    assert model.tokenizer.decode(batch.input_ids[0, prompt]).strip() == PROMPT


def processor_system_prompt(model) -> str:
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    assert model.processor.use_default_system_prompt
    return DEFAULT_SYSTEM_PROMPT.strip()


def test_default_system_prompt_is_template(model):
    """The processor prepends the checkpoint's system prompt: template tokens before the user turn."""
    batch = model.prepare(images=[[image(40, 56)]], prompts=[PROMPT])
    layout, ids = batch.layouts[0], batch.input_ids[0]
    user = layout.tokens.index("<|User|>")
    assert processor_system_prompt(model) in model.tokenizer.decode(ids[:user])
    assert set(range(user + 1)) <= set(layout.groups["template"].tolist())


def test_generation_modules_do_not_run(model):
    """Reading an image and writing text uses the vision tower and aligner only: the VQ-VAE and the
    generation embeddings, aligner and head are outside the analysed path."""
    batch = model.prepare(images=[[image(40, 56)], [image(72, 48, seed=1)]],
                          prompts=[PROMPT, "Is the blue star above a green circle?"])
    called = []
    core = model.hf.model
    modules = [core.vqmodel, core.generation_embeddings, core.generation_aligner, core.generation_head]
    handles = [m.register_forward_hook(lambda *args: called.append(1)) for m in modules]
    used = []
    handles += [m.register_forward_hook(lambda *args: used.append(1)) for m in (core.vision_model, core.aligner)]
    try:
        model.forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    assert not called and len(used) == 2
    assert len(model.module(model.family.vision_layers)) == model.vision_layers


def test_wrong_counts_raise_layout_error(model):
    batch = model.prepare(images=[[image(40, 56)]], prompts=[PROMPT])
    ids = batch.input_ids[0]
    placeholders = (ids == model.image_token_id).nonzero().flatten()
    family, config, processor = model.family, model.config, model.processor
    with pytest.raises(LayoutError, match="expected"):
        family.image_layouts(batch.inputs, 0, [0, 1], placeholders, config, processor, sizes=((40, 56),) * 2)
    # the placeholders shifted off their markers
    with pytest.raises(LayoutError, match="not one run between"):
        family.image_layouts(batch.inputs, 0, [0], placeholders + 1, config, processor, sizes=((40, 56),))
    written = processor.num_image_tokens
    try:
        processor.num_image_tokens = written + 1
        with pytest.raises(LayoutError, match="set num_image_tokens"):
            family.image_layouts(batch.inputs, 0, [0], placeholders, config, processor, sizes=((40, 56),))
    finally:
        processor.num_image_tokens = written
