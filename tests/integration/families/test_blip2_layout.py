"""BLIP-2: the image enters as num_query_tokens Q-Former outputs prepended to the text."""
from __future__ import annotations

import pytest
import torch

import lvlm_probe as lp
from lvlm_probe.errors import InputError, LayoutError

PROMPT = "Is there a red heart?"


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("blip2", device="cpu")


def test_queries_grid_and_mode(model, images):
    batch = model.prepare(images=[[images[0]]], prompts=[PROMPT])
    layout = batch.layouts[0]
    n_query = model.config.num_query_tokens
    assert layout.image_mode == "queries"
    assert batch.texts == [f"Question: {PROMPT} Answer:"]
    # independently of the layout code: the processor puts the queries first, then BOS
    tokens = layout.tokens
    assert list(tokens[:n_query]) == ["<image>"] * n_query
    assert "<image>" not in tokens[n_query:]
    assert tokens[n_query] == model.tokenizer.bos_token
    (image,) = layout.images
    (grid,) = image.grids
    assert grid.name == "queries" and not grid.spatial and grid.shape == (1, n_query)
    assert torch.equal(grid.positions[0], torch.arange(n_query))
    assert image.grid is None  # queries are not image regions: no heatmap grid


def test_attended_is_the_vision_patch_grid(model, images):
    batch = model.prepare(images=[[images[0]]], prompts=[PROMPT])
    num_patches = model.hf.vision_model.embeddings.num_patches
    side = int(num_patches ** 0.5)
    assert batch.layouts[0].images[0].attended == {"patches": (side, side)}
    with torch.no_grad():
        states = model.hf.vision_model(batch.inputs["pixel_values"]).last_hidden_state
    assert states.shape[1] == side * side + 1  # the Q-Former reads the class state plus the patches


def test_module_paths(model):
    fam, hf = model.family, model.hf
    layer = hf.get_submodule(fam.lm_layers)[0]
    layer.get_submodule(fam.lm_mlp_in)
    layer.get_submodule(fam.lm_mlp)
    assert len(hf.get_submodule(fam.qformer_layers)) == model.config.qformer_config.num_hidden_layers


def test_one_image_required(model, images):
    with pytest.raises(InputError, match="needs one image"):
        model.prepare(images=None, prompts=[PROMPT])
    with pytest.raises(InputError, match="at most one"):
        model.prepare(images=[images], prompts=[PROMPT])


def test_queries_stay_before_left_padding(model, images):
    """Blip2Processor prepends the queries after padding the text, so in a left-padded batch they
    come first in every row, then the padding, then BOS and the text."""
    prompts = [PROMPT, PROMPT + " Answer yes or no."]
    batch = model.prepare(images=[[images[0]], [images[1]]], prompts=prompts)
    n_query = model.config.num_query_tokens
    short = batch.layouts[0]
    assert torch.equal(short.positions("image"), torch.arange(n_query))
    pad = short.positions("pad")
    assert pad.numel() > 0 and int(pad[0]) == n_query
    assert model.tokenizer.decode(batch.input_ids[0, short.positions("prompt")]).strip() == PROMPT


def test_wrong_placeholder_count_raises(model, images):
    batch = model.prepare(images=[[images[0]]], prompts=[PROMPT])
    placeholders = (batch.input_ids[0] == model.image_token_id).nonzero().flatten()
    n_query = model.config.num_query_tokens
    fam, config, processor = model.family, model.config, model.processor
    with pytest.raises(LayoutError, match=rf"expected {n_query} .* holds {n_query - 1}"):
        fam.image_layouts(batch.inputs, 0, [0], placeholders[1:], config, processor)
    with pytest.raises(LayoutError, match=rf"expected 0 .* holds {n_query}"):
        fam.image_layouts(batch.inputs, 0, [], placeholders, config, processor)
