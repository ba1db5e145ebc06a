"""InstructBLIP: the image enters as num_query_tokens Q-Former outputs prepended to the text, and
the Q-Former reads the instruction too (its own tokenizer's ``qformer_input_ids``).

Expected positions come from the token strings; the query count and the attended patch grid from
the config and the vision tower's own output; every query position is traced to the model's own
``get_image_features``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lvlm_probe as lp
from lvlm_probe.errors import InputError, LayoutError

PROMPT = "Is there a red heart?"
OTHER = "Is the blue star above a green circle?"
SIZES = [(40, 56), (72, 48)]


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("instructblip", device="cpu")


def image_features(model, batch) -> torch.Tensor:
    """``[batch, num_query_tokens, d]``: the projected query outputs, from the model itself."""
    inputs = batch.inputs
    with torch.no_grad():
        out = model.hf.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                          inputs["qformer_attention_mask"])
    return out.pooler_output


def merged_embeddings(model, batch) -> torch.Tensor:
    """The embeddings the language model receives (query outputs merged in)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.hf.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.forward(batch)
    finally:
        handle.remove()
    return seen["embeds"]


@pytest.mark.parametrize("size", SIZES)
def test_queries_grid_and_mode(model, size):
    batch = model.prepare(images=[[random_image(*size, seed=1)]], prompts=[PROMPT])
    layout = batch.layouts[0]
    n_query = model.config.num_query_tokens
    assert layout.image_mode == "queries"
    assert batch.texts == [PROMPT]  # no template around the instruction
    # independently of the layout code: the processor puts the queries first, then BOS
    tokens = layout.tokens
    assert list(tokens[:n_query]) == ["<image>"] * n_query
    assert "<image>" not in tokens[n_query:]
    assert tokens[n_query] == model.tokenizer.bos_token
    assert torch.equal(layout.positions("template"), torch.tensor([n_query]))
    (image,) = layout.images
    (grid,) = image.grids
    assert grid.name == "queries" and not grid.spatial and grid.shape == (1, n_query)
    # the processor's own count of placeholders per image, for this image size
    reported = model.processor._get_num_multimodal_tokens(image_sizes=[size]).num_image_tokens
    assert reported == [grid.positions.numel()] and model.processor.num_query_tokens == n_query
    assert torch.equal(grid.positions[0], torch.arange(n_query))
    assert image.grid is None and image.size == size
    # each query position receives exactly its query's projected output
    torch.testing.assert_close(merged_embeddings(model, batch)[0, grid.positions[0]],
                               image_features(model, batch)[0], atol=0, rtol=0)


@pytest.mark.parametrize("size", SIZES)
def test_attended_is_the_vision_patch_grid(model, size):
    batch = model.prepare(images=[[random_image(*size, seed=2)]], prompts=[PROMPT])
    patch = model.config.vision_config.patch_size
    rows, cols = batch.inputs["pixel_values"].shape[-2:]  # the processor's fixed square resize
    assert batch.layouts[0].images[0].attended == {"patches": (rows // patch, cols // patch)}
    with torch.no_grad():
        states = model.hf.vision_model(batch.inputs["pixel_values"]).last_hidden_state
    assert states.shape[1] == (rows // patch) * (cols // patch) + 1  # the class state plus the patches


def test_qformer_reads_the_instruction(model):
    """The Q-Former's text is the instruction in its own tokenizer, so the queries depend on it."""
    img = random_image(*SIZES[0], seed=3)
    batch = model.prepare(images=[[img], [img]], prompts=[PROMPT, OTHER])
    qformer = model.processor.qformer_tokenizer
    for i, prompt in enumerate([PROMPT, OTHER]):
        ids = batch.inputs["qformer_input_ids"][i][batch.inputs["qformer_attention_mask"][i].bool()]
        assert ids.tolist() == qformer(prompt)["input_ids"]
    features = image_features(model, batch)
    assert not torch.allclose(features[0], features[1])


def test_hide_prompt_removes_it_from_the_queries(model):
    """With the prompt hidden (``family.hide_prompt``), two instructions give the same queries; the
    rows that keep it are unchanged."""
    img = random_image(*SIZES[0], seed=3)
    batch = model.prepare(images=[[img], [img]], prompts=[PROMPT, OTHER])
    fam = model.family
    kept = fam.hide_prompt(batch.inputs, torch.tensor([True, True]))
    assert torch.equal(kept["qformer_attention_mask"], batch.inputs["qformer_attention_mask"])
    mixed = fam.hide_prompt(batch.inputs, torch.tensor([True, False]))
    assert torch.equal(mixed["qformer_attention_mask"][0], batch.inputs["qformer_attention_mask"][0])
    assert not mixed["qformer_attention_mask"][1].any()
    hidden = fam.hide_prompt(batch.inputs, torch.tensor([False, False]))
    with torch.no_grad():
        out = model.hf.get_image_features(hidden["pixel_values"], hidden["qformer_input_ids"],
                                          hidden["qformer_attention_mask"]).pooler_output
    torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=0)
    assert not torch.allclose(out[0], image_features(model, batch)[0])


def test_module_paths(model):
    fam, hf = model.family, model.hf
    assert len(hf.get_submodule(fam.qformer_layers)) == fam.n_qformer_layers(model.config)
    assert hf.get_submodule(fam.lm_layers) is hf.language_model.model.layers


def test_one_image_required(model, images):
    with pytest.raises(InputError, match="needs one image"):
        model.prepare(images=None, prompts=[PROMPT])
    with pytest.raises(InputError, match="at most one"):
        model.prepare(images=[images], prompts=[PROMPT])


def test_queries_stay_before_left_padding(model, images):
    prompts = [PROMPT, OTHER]
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
    gapped = torch.cat([placeholders[:-1], placeholders[-1:] + 1])
    with pytest.raises(LayoutError, match="not consecutive"):
        fam.image_layouts(batch.inputs, 0, [0], gapped, config, processor)


def test_padded_row_runs_as_the_example_alone(model, images):
    """The processor puts the left padding between the queries and BOS; ``prepare`` adds position
    ids counted over the unpadded tokens, so the padded row gives the logits of the example alone."""
    prompts = [PROMPT, OTHER]
    batch = model.prepare(images=[[images[0]], [images[1]]], prompts=prompts)
    mask = batch.inputs["attention_mask"]
    assert not mask[0].all()  # the shorter prompt is padded
    for i, prompt in enumerate(prompts):
        valid = mask[i].bool()
        assert torch.equal(batch.inputs["position_ids"][i][valid], torch.arange(int(valid.sum())))
        alone = model.prepare(images=[[images[i]]], prompts=[prompt])
        assert torch.equal(batch.input_ids[i][valid], alone.input_ids[0])
        expected = model.forward(alone).logits[0]
        torch.testing.assert_close(model.forward(batch).logits[i][valid], expected, atol=1e-5, rtol=0)
