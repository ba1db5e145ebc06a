"""The logit lens: the final soft cap, the plot and errors (its last layer equals the model's
output in every family: test_conformance.py)."""
from __future__ import annotations

import pytest
import torch
from conftest import random_image

import lvlm_probe as lp
from lvlm_probe.attribution import logit_lens
from lvlm_probe.attribution.lens import unembed
from lvlm_probe.errors import InputError


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
