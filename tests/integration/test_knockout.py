"""Attention knockout: exact where nothing or everything is blocked, and on shapes-llava the image
reaches the answer through attention, without which the colour prior takes over."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lvlm_probe as lp
from lvlm_probe.attribution import knockout, source_split
from lvlm_probe.errors import InputError


@pytest.fixture(scope="module")
def colour_questions():
    model = lp.zoo.load("shapes-llava", device="cpu")
    questions = lp.worlds.ShapesWorld(seed=1000, image_size=64).questions(
        60, level="attribute", split="counterfactual", kind="color")
    batch = model.prepare(images=[q.image for q in questions], prompts=[q.prompt for q in questions])
    return model, questions, batch


def test_blocking_edges_that_do_not_exist_changes_nothing(colour_questions):
    """Image tokens come before the last token, so under causal attention they never attend to it:
    knocking out last -> image blocks no edge, and every probability stays exactly the same."""
    model, _, batch = colour_questions
    curve = knockout(model, batch, source="last", dest="image", window=2).to_frame()
    assert len(curve) == model.n_layers * len(batch)
    assert (curve["p_knocked"] == curve["p"]).all()
    probs = torch.softmax(model.forward(batch).logits[:, -1].float(), dim=-1).max(-1).values
    np.testing.assert_allclose(curve.query("layer == 0")["p"], probs.numpy(), atol=1e-5)


def test_blocking_the_image_everywhere_is_removing_it(colour_questions):
    """image -> every query at every layer is the source split's prompt-only coalition."""
    model, questions, batch = colour_questions
    answers = [q.answer for q in questions]
    blocked = knockout(model, batch, answers, source="image", dest="all", layers=[0],
                       window=model.n_layers).to_frame()
    prompt_only = source_split(model, batch, answers).values["prompt"].exp()
    np.testing.assert_allclose(blocked["p_knocked"], prompt_only.numpy(), atol=1e-5)


def test_without_the_image_the_prior_answers(colour_questions):
    model, questions, batch = colour_questions
    with torch.no_grad():
        said = model.forward(batch).logits[:, -1].argmax(-1)
    gold = model.answer_token_ids(batch, [[q.answer] for q in questions])[:, 0]
    right = (said == gold).numpy()
    assert right.sum() >= 10
    kw = dict(source="image", dest="last", layers=[0], window=model.n_layers)
    true_colour = knockout(model, batch, [q.answer for q in questions], **kw).to_frame()
    typical = knockout(model, batch, [q.typical_color for q in questions], **kw).to_frame()
    # the image-dependent answers lose their colour and the shape's typical colour gains
    assert true_colour["relative_change"][right].mean() < -0.5
    assert typical["relative_change"][right].mean() > 0.5
    # the information-flow curve of the model's own answers: blocking image -> last one layer at a
    # time, the image reaches the answer in a middle layer, not in the first
    curve = knockout(model, batch).to_frame().groupby("layer")["relative_change"].mean()
    assert curve.min() < -0.2 and curve.idxmin() > 0


def test_errors(colour_questions):
    model, _, batch = colour_questions
    with pytest.raises(InputError, match="unknown token group 'images'"):
        knockout(model, batch, source="images")
    with pytest.raises(InputError, match="outside the model"):
        knockout(model, batch, layers=[model.n_layers])
    with pytest.raises(InputError, match="window must be at least 1"):
        knockout(model, batch, window=0)
    with pytest.raises(InputError, match=r"layers is empty \(got \[\]\); expected the first layer"):
        knockout(model, batch, layers=[])
    text_only = model.prepare(images=None, prompts=["What colour is the heart?"])
    with pytest.raises(InputError, match="example 0 has no image tokens"):
        knockout(model, text_only)
