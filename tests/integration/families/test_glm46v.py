"""GLM-4.6V on its tiny model: what differs from GLM-4.1V (``test_glm4v.py``) is its own model type,
config and processor classes and chat template; the sub-models it resolves through the auto classes
must be GLM-4.1V's modules at the paths the adapter names, and its processor must lay images out
as GLM-4.1V's does (checked again here against this processor's output)."""
from __future__ import annotations

import pytest
import torch
from test_glm4v import (
    BEGIN,
    END,
    OTHER_PROMPT,
    PROMPT,
    SIZES,
    _check_example,
    _check_patch_order,
    _expected_thw,
    _image,
)
from transformers import Glm4vTextModel, Glm4vVisionModel

import lvlm_probe as lp


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("glm46v", device="cpu")


@pytest.fixture(scope="module")
def pictures():
    return [_image(h, w, seed=k) for k, (h, w) in enumerate(SIZES)]


def test_own_model_type_resolves_to_this_adapter(model):
    assert model.config.model_type == "glm46v" != "glm4v"
    assert lp.families.for_config(model.config).name == "glm46v"
    assert type(model.hf).__name__ in model.family.hf_classes
    assert type(model.processor).__name__ == "Glm46VProcessor"


def test_sub_models_are_the_dense_glm4v_modules_at_the_adapter_paths(model):
    """Glm46VModel builds its towers through the auto classes: with glm4v_text / glm4v_vision
    sub-configs they are GLM-4.1V's modules, so the sandwich-norm paths exist on every layer."""
    fam = model.family
    assert isinstance(model.hf.model.language_model, Glm4vTextModel)
    assert isinstance(model.hf.model.visual, Glm4vVisionModel)
    layers = model.module(fam.lm_layers)
    assert len(layers) == model.n_layers
    for layer in layers:
        for path in (fam.lm_attn_write, fam.lm_mlp_write, fam.lm_resid_mid, fam.lm_attn_out):
            layer.get_submodule(path)
    assert fam.nonlinear_writes is not None


def test_chat_template(model):
    text = model.family.format_prompt(model.processor, PROMPT, 2)
    image = f"{BEGIN}<|image|>{END}"
    # the assistant's turn opens without GLM-4.1V's trailing newline
    assert text == f"[gMASK]<sop><|user|>\n{image}{image}{PROMPT}<|assistant|>"


@pytest.mark.parametrize("which", [0, 2])
def test_one_image_grid(model, pictures, which):
    batch = model.prepare(images=[pictures[which]], prompts=PROMPT)
    thw = _expected_thw(model.processor, *SIZES[which])
    assert batch.inputs["image_grid_thw"].tolist() == [thw]
    counts = model.processor._get_num_multimodal_tokens(image_sizes=[SIZES[which]])
    assert batch.layouts[0].positions("image").numel() == counts["num_image_tokens"][0]
    _check_example(model, batch, 0, [0])


def test_batch_of_one_and_two_images(model, pictures):
    batch = model.prepare(images=[[pictures[0]], [pictures[2], pictures[1]]],
                          prompts=[PROMPT, OTHER_PROMPT])
    expected = [_expected_thw(model.processor, *SIZES[i]) for i in (0, 2, 1)]
    assert batch.inputs["image_grid_thw"].tolist() == expected
    _check_example(model, batch, 0, [0])
    _check_example(model, batch, 1, [1, 2])


def test_positions_trace_to_their_image_region(model):
    _check_patch_order(model, [(3, 2), (2, 4)])


def test_matches_glm4v_layout_on_the_same_images(model, pictures):
    """The same images give the same grids and image-token runs (relative to the first
    <|begin_of_image|>) as GLM-4.1V's processor: the layout arithmetic is shared."""
    other = lp.zoo.tiny("glm4v", device="cpu")
    images, prompts = [[pictures[1], pictures[2]]], [PROMPT]
    mine, theirs = model.prepare(images=images, prompts=prompts), other.prepare(images=images, prompts=prompts)
    assert torch.equal(mine.inputs["image_grid_thw"], theirs.inputs["image_grid_thw"])
    assert mine.layouts[0].image_grids == theirs.layouts[0].image_grids
    begin = model.tokenizer.convert_tokens_to_ids(BEGIN)

    def relative(batch):
        start = int((batch.input_ids[0] == begin).nonzero()[0, 0])
        return [lay.grid.positions - start for lay in batch.layouts[0].images]

    assert all(torch.equal(a, b) for a, b in zip(relative(mine), relative(theirs), strict=True))
