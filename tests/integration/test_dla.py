"""Direct logit attribution on shapes-llava: the colour of an object reaches the answer through
heads reading the image (the terms' sum in every family is in test_conformance.py)."""
from __future__ import annotations

import numpy as np

import lvlm_probe as lp
from lvlm_probe.attribution import dla


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

