"""Direct logit attribution: the terms add up to the model's own logit difference exactly, and on
shapes-llava the colour of an object reaches the answer through heads reading the image."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import random_image

import lvlm_probe as lp
from lvlm_probe.attribution import dla
from lvlm_probe.attribution.dla import UNSUPPORTED
from lvlm_probe.errors import InputError


@pytest.mark.parametrize("family", lp.families.names())
def test_terms_sum_to_the_logit_difference(family):
    model = lp.zoo.tiny(family, device="cpu")
    batch = model.prepare(images=[[random_image(48, 48, 1)], [random_image(48, 48, 2)]],
                          prompts=["Is there a heart?", "Is there a red heart left of the star?"])
    yes, no = model.answer_token_ids(batch, ["yes", "no"])[0].tolist()
    if family in UNSUPPORTED:
        with pytest.raises(InputError, match=f"dla does not support {family}"):
            dla(model, batch, yes, no)
        return
    result = dla(model, batch, yes, no)
    logprobs = model.answer_logprobs(batch, [yes, no]).cpu()
    expected = (logprobs[:, 0] - logprobs[:, 1]).numpy()  # log-odds = logit difference
    np.testing.assert_allclose(result.logit.numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(result.by_source()["total"].to_numpy(), expected, atol=1e-4)
    heads = result.terms[result.terms["component"] == "head"]
    assert len(heads) == len(batch) * model.n_layers * model.n_heads * 3  # every head x source


def test_colour_comes_through_heads_reading_the_image():
    model = lp.zoo.load("shapes-llava", device="cpu")
    questions = lp.worlds.ShapesWorld(seed=1000, image_size=64).questions(40, level="attribute", kind="color")
    batch = model.prepare(images=[q.image for q in questions], prompts=[q.prompt for q in questions])
    result = dla(model, batch, [q.answer for q in questions])
    table = result.by_source()
    np.testing.assert_allclose(table["total"], result.logit.numpy(), atol=1e-3)
    assert (table["image"] > table["template"]).mean() > 0.8
    assert table["image"].mean() > 1.0
    fig = result.plot(example=0)
    assert len(fig.axes[0].patches) > 0

