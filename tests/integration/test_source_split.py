"""source_split: exact Shapley credit among prior, prompt and image, on every family's tiny model
and on shapes-llava, whose colour prior is the ground truth."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import random_image

import lvlm_probe as lp
from lvlm_probe.attribution import source_split
from lvlm_probe.errors import InputError

PROMPT = "Is there a red heart in the image?"


@pytest.fixture(scope="module", params=lp.families.names())
def tiny(request):
    model = lp.zoo.tiny(request.param, device="cpu")
    batch = model.prepare(images=[[random_image(48, 48, 1)], [random_image(48, 48, 2)]], prompts=[PROMPT, PROMPT])
    yes, no = model.answer_token_ids(batch, ["yes", "no"], first_token=True)[0].tolist()  # tiny tokenizers split words
    return model, batch, yes, no


def test_batched_split_equals_one_example_at_a_time(tiny):
    model, _, yes, no = tiny
    prompts = [PROMPT, "Is the small blue star above the green circle? Answer yes or no."]
    images = [[random_image(48, 48, 3)], [random_image(48, 48, 4)]]
    together = source_split(model, model.prepare(images=images, prompts=prompts), yes, foil=no)
    for i in range(2):
        alone = source_split(model, model.prepare(images=images[i:i + 1], prompts=prompts[i:i + 1]), yes, foil=no)
        for source in ("prior", "prompt", "image", "full"):
            torch.testing.assert_close(getattr(together, source)[i], getattr(alone, source)[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "mllama"])
def test_replacing_the_image_instead_of_removing_it(family):
    model = lp.zoo.tiny(family, device="cpu")
    same = model.prepare(images=[[random_image(48, 48, 5)], [random_image(48, 48, 5)]], prompts=[PROMPT, PROMPT])
    yes, no = model.answer_token_ids(same, ["yes", "no"], first_token=True)[0].tolist()
    # the batch's mean image of two identical images is the image: it gets no credit
    mean = source_split(model, same, yes, foil=no, ablation="mean")
    torch.testing.assert_close(mean.image, torch.zeros(2), atol=1e-5, rtol=0)
    noise = source_split(model, same, yes, foil=no, ablation="noise", seed=3)
    again = source_split(model, same, yes, foil=no, ablation="noise", seed=3)
    torch.testing.assert_close(noise.prior + noise.prompt + noise.image, noise.full, atol=1e-5, rtol=0)
    assert torch.equal(noise.image, again.image)  # seeded
    masked = source_split(model, same, yes, foil=no)
    torch.testing.assert_close(noise.full, masked.full, atol=1e-5, rtol=0)  # same full run
    if family != "mllama":  # the tiny Mllama's cross-attention gates start at zero: images are inert
        assert not torch.allclose(noise.values["prompt"], masked.values["prompt"], atol=1e-7)


def test_bad_targets_and_inputs():
    model = lp.zoo.load("shapes-llava", device="cpu")
    question = lp.worlds.ShapesWorld(seed=1000, image_size=64).questions(1, level="attribute", kind="color")[0]
    batch = model.prepare(images=[question.image], prompts=[question.prompt])
    with pytest.raises(InputError, match="is 2 tokens"):
        source_split(model, batch, "red heart")
    with pytest.raises(InputError, match="same token as target"):
        source_split(model, batch, "red", foil="red")
    with pytest.raises(InputError, match="unknown ablation 'blur'"):
        source_split(model, batch, "red", ablation="blur")
    with pytest.raises(InputError, match="list of 1"):
        source_split(model, batch, ["red", "blue"])
    text_only = model.prepare(images=None, prompts=["What colour is the heart?"])
    with pytest.raises(InputError, match="example 0 has no image tokens"):
        source_split(model, text_only, "red")
    split = source_split(model, batch, "red")  # no foil: log-probabilities
    assert split.foils is None and float(split.full[0]) <= 0.0


def test_prior_driven_errors_have_small_image_shares():
    """On counterfactual-colour scenes, shapes-llava often names the shape's typical colour. Scoring
    the true colour against the typical one, those errors take less of their credit from the image
    and more from the prior and the prompt (which names the shape) than the right answers do."""
    model = lp.zoo.load("shapes-llava", device="cpu")
    questions = lp.worlds.ShapesWorld(seed=1000, image_size=64).questions(
        400, level="attribute", split="counterfactual", kind="color")
    batch = model.prepare(images=[q.image for q in questions], prompts=[q.prompt for q in questions])
    split = source_split(model, batch, [q.answer for q in questions], foil=[q.typical_color for q in questions])
    table = split.shares()
    said = [o.split()[0].strip(".").lower() if o else "" for o in model.generate(batch, max_new_tokens=2)]
    table["outcome"] = ["right" if s == q.answer else "typical" if s == q.typical_color else "other"
                        for s, q in zip(said, questions)]
    means = table.groupby("outcome")[["image", "image_share", "prior_share", "prompt_share"]].mean()
    counts = table["outcome"].value_counts()
    assert counts["right"] >= 20 and counts["typical"] >= 20
    right, typical = means.loc["right"], means.loc["typical"]
    assert typical["image_share"] < right["image_share"] - 0.1
    assert typical["prior_share"] + typical["prompt_share"] > right["prior_share"] + right["prompt_share"] + 0.1
    assert typical["image"] < 0 < right["image"]  # the image argues for the true colour only when it wins
    fig = split.plot()
    assert len(fig.axes[0].patches) == 3 * len(questions)  # a bar per source and example
    first = split.plot(labels=[q.shape for q in questions], first=10)
    assert len(first.axes[0].patches) == 3 * 10
    assert [t.get_text() for t in first.axes[0].get_xticklabels()] == [q.shape for q in questions[:10]]
    assert isinstance(table, pd.DataFrame)


def test_continuation_tokens_rebuild_the_answer(tiny):
    """An answer's continuation tokens decode back to it after the text, and their first one is
    what answer_token_ids scores."""
    model, batch, _, _ = tiny
    for answer in ("yes", "no", "a red heart"):
        tokens = model.continuation_tokens(batch, 0, answer)
        assert tokens and model.tokenizer.decode(tokens).strip() == answer
        assert model.answer_token_ids(batch, [answer], first_token=True)[0, 0].item() == tokens[0]
