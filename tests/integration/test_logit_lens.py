"""The logit lens: its last layer is the model's own output, for every family."""
from __future__ import annotations

import pytest
import torch
from conftest import random_image

import lvlm_probe as lp
from lvlm_probe.attribution import logit_lens
from lvlm_probe.attribution.lens import unembed
from lvlm_probe.errors import InputError


@pytest.mark.parametrize("family", lp.families.names())
def test_last_layer_is_the_model_output(family):
    model = lp.zoo.tiny(family, device="cpu")
    batch = model.prepare(images=[[random_image(48, 48, 1)], [random_image(48, 48, 2)]],
                          prompts=["Is there a heart?", "Is there a red heart left of the star?"])
    positions = "prompt" if model.family.image_mode == "cross_attention" else "image"
    lens = logit_lens(model, batch, positions=positions, k=3)
    assert lens.top_ids.shape[:2] == (model.n_layers, len(batch)) and lens.top_ids.shape[-1] == 3
    probs = torch.softmax(model.forward(batch).logits.float(), dim=-1)
    for i in range(len(batch)):
        kept = lens.positions[i][lens.positions[i] >= 0]
        expected_probs, expected_ids = probs[i, kept].topk(3, dim=-1)
        n = len(kept)
        torch.testing.assert_close(lens.top_probs[-1, i, :n], expected_probs, atol=1e-5, rtol=0)
        assert torch.equal(lens.top_ids[-1, i, :n, 0], expected_ids[:, 0])
    assert (lens.top_probs[..., :-1] >= lens.top_probs[..., 1:]).all()  # most probable first
    assert len(lens.tokens(layer=0, example=0)) == int((lens.positions[0] >= 0).sum())


@pytest.mark.parametrize("family", ["paligemma", "gemma3"])
def test_final_soft_cap_follows_the_model(family):
    """PaliGemma caps its logits with the text config's final_logit_softcapping, Gemma 3 does not;
    the lens decodes as the model does in both."""
    model = lp.zoo.tiny(family, device="cpu")
    model.text_config.final_logit_softcapping = 0.05
    try:
        batch = model.prepare(images=[[random_image(48, 48, 1)]], prompts=["Is there a heart?"])
        with model.capture("blocks.*.hook_resid_post") as cache:
            logits = model.forward(batch).logits
        decoded = unembed(model, cache[f"blocks.{model.n_layers - 1}.hook_resid_post"])
        torch.testing.assert_close(decoded, logits.float(), atol=1e-5, rtol=0)
    finally:
        model.text_config.final_logit_softcapping = None


def test_plot_and_errors():
    model = lp.zoo.load("shapes-llava", device="cpu")
    question = lp.worlds.ShapesWorld(seed=1000, image_size=64).questions(1, level="attribute", kind="color")[0]
    batch = model.prepare(images=[question.image], prompts=[question.prompt])
    lens = logit_lens(model, batch)
    fig = lens.plot(example=0, layer=-1)
    rows, cols = batch.layouts[0].image_grids[0]
    assert fig.axes[0].get_images()[0].get_array().shape == (rows, cols)
    with pytest.raises(InputError, match="k must be an integer"):
        logit_lens(model, batch, k=0)
