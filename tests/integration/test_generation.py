"""Explaining free-form generations: the per-token split batches its coalitions into few passes and
gives the same values at any batch size; generation with capture keeps the states that produced
each token; image maps explain any token of a continuation; bad input is named."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import random_image
from matplotlib.figure import Figure

import lvlm_probe as lp
from lvlm_probe.attribution import explain_generation, image_map
from lvlm_probe.errors import InputError

PROMPTS = ["Describe the image.", "What is in the image?", "Is there a red heart in the image?"]
RESID = "blocks.*.hook_resid_post"


@pytest.fixture(scope="module")
def llava():
    model = lp.zoo.tiny("llava", device="cpu")
    images = [random_image(40, 56, seed=k) for k in range(3)]
    return model, model.prepare(images=images, prompts=PROMPTS)


@pytest.fixture(scope="module")
def generated(llava):
    model, batch = llava
    return model.generation(batch, 6)


class _Passes:
    """Counts the language model's forward passes while the block runs."""

    def __init__(self, model):
        self.module, self.count = model.module(model.family.lm_layers + ".0"), 0

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(lambda *_: setattr(self, "count", self.count + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("batch_size", [1, 4, 7, 24])
def test_split_takes_whole_coalitions_per_pass_and_equals_any_batch_size(llava, generated, batch_size):
    """Three captions of six tokens: ceil(8 / (batch_size // 3)) passes (never more than
    ceil(16 B / batch_size)), counted at the language model, and the same values as one coalition
    per pass."""
    model, batch = llava
    ids = generated.token_ids
    with _Passes(model) as passes:
        split = explain_generation(model, batch, continuation=ids, batch_size=batch_size)
    expected = math.ceil(8 / max(1, batch_size // len(batch)))
    assert split.passes == passes.count == expected <= math.ceil(16 * len(batch) / batch_size)
    reference = explain_generation(model, batch, continuation=ids, batch_size=1)
    torch.testing.assert_close(split.values, reference.values, atol=1e-5, rtol=0, equal_nan=True)


def test_generated_continuation_is_explained_as_generated(llava, generated):
    """Without a continuation the split generates greedily; its texts, ids and scores are those of
    ``model.generation``, every token's sources add up, and the table and plot cover every token."""
    model, batch = llava
    split = explain_generation(model, batch, max_new_tokens=6)
    assert split.token_ids == generated.token_ids and split.continuations == generated.texts
    for i, scores in enumerate(split.generation_logprobs):
        torch.testing.assert_close(scores, generated.logprobs[i])
    table = split.to_frame()
    assert len(table) == sum(len(row) for row in generated.token_ids)
    torch.testing.assert_close(torch.tensor(table[["prior", "prompt", "image", "generated"]].sum(axis=1).values),
                               torch.tensor(table["full"].values), atol=1e-5, rtol=0)
    shares = table[[f"{s}_share" for s in ("prior", "prompt", "image", "generated")]].sum(axis=1)
    assert shares.dropna().between(1 - 1e-6, 1 + 1e-6).all()
    fig = split.plot(source="image")
    assert isinstance(fig, Figure) and "image share" in fig.axes[0].get_title()
    assert fig._suptitle.get_text().startswith("explain_generation (mask ablation") and "Describe the image." in \
        fig._suptitle.get_text()


def test_generation_capture_keeps_the_state_that_produced_each_token(llava, generated):
    """positions="last": one state per generated token, the teacher-forced state at the position
    before it; positions="image": the prompt's image positions, then the generated steps."""
    model, batch = llava
    start = batch.input_ids.shape[1]
    out = model.generate(batch, 6, capture=RESID)
    assert out.texts == generated.texts and out.token_ids == generated.token_ids
    n = min(len(row) for row in out.token_ids)
    with torch.no_grad(), model.capture(RESID) as cache:
        model.run(model.continued(batch, [row[:n] for row in out.token_ids]))
    forced = cache.stack(RESID)
    captured = out.cache.stack(RESID)
    assert captured.shape[2] == max(len(row) for row in out.token_ids)
    torch.testing.assert_close(captured[:, :, :n], forced[:, :, start - 1:start - 1 + n], atol=1e-5, rtol=1e-5)
    assert out.cache.positions()[0, :n].tolist() == list(range(start - 1, start - 1 + n))

    images = model.generate(batch, 6, capture=RESID, positions="image")
    kept = images.cache.positions()
    picked = images.cache.stack(RESID)
    for i, layout in enumerate(batch.layouts):
        where = layout.positions("image")
        torch.testing.assert_close(picked[:, i, :len(where)], forced[:, i, where], atol=1e-5, rtol=1e-5)
        assert kept[i, :len(where)].tolist() == where.tolist()


@pytest.mark.parametrize("method", lp.attribution.METHODS)
def test_image_map_of_a_continuation_token_scores_that_token(llava, generated, method):
    """image_map(continuation=..., token=k) explains token k teacher-forced, with every method: its
    full score is the split's full value at k."""
    model, batch = llava
    ids = generated.token_ids
    split = explain_generation(model, batch, continuation=ids)
    maps = image_map(model, batch, continuation=ids, token=2, method=method, n_steps=8, n_samples=2)
    torch.testing.assert_close(maps.values, split.full[:, 2], atol=1e-5, rtol=0)
    assert maps.targets == [model.tokenizer.decode([row[2]]) for row in ids]
    assert torch.isfinite(maps.scores).any()


def test_bad_generation_input_is_named(llava, generated):
    model, batch = llava
    with pytest.raises(InputError, match="got int 5"):
        explain_generation(model, batch, continuation=5)
    with pytest.raises(InputError, match="got 2 continuations"):
        explain_generation(model, batch, continuation=["a heart", "a star"])
    with pytest.raises(InputError, match="continuation 1 must be a string or a non-empty list of token ids, got dict"):
        explain_generation(model, batch, continuation=["a heart", {"text": "a star"}, "a circle"])
    with pytest.raises(InputError, match="token 6 is past the continuation of example 0, which has"):
        image_map(model, batch, continuation=[row[:6] for row in generated.token_ids], token=6)
    with pytest.raises(InputError, match="needs a target, or a continuation"):
        image_map(model, batch)
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        explain_generation(model, batch, continuation=generated.token_ids, batch_size=0)
    with pytest.raises(InputError, match="max_new_tokens must be a positive int, got 0"):
        model.generate(batch, 0, capture=RESID)
    with pytest.raises(InputError, match="cannot be captured during generation"):
        model.generate(batch, 2, capture="blocks.0.attn.hook_pattern")
    with pytest.raises(InputError, match="continuation 0 must be a list of token ids"):
        model.continued(batch, [["a"], [], []])


def test_generation_capture_keeps_values_outside_the_sequence_from_the_prompt_pass(llava):
    """A vision hook runs once (the prompt pass) and is kept whole; the language model's values
    still get one position per step after it."""
    model, batch = llava
    out = model.generate(batch, 4, capture=["vision.blocks.0.hook_resid_post", "blocks.0.hook_resid_post"])
    with torch.no_grad(), model.capture("vision.blocks.0.hook_resid_post") as cache:
        model.forward(batch)
    torch.testing.assert_close(out.cache["vision.blocks.0.hook_resid_post"], cache["vision.blocks.0.hook_resid_post"])
    n = max(len(row) for row in out.token_ids)
    assert out.cache["blocks.0.hook_resid_post"].shape[1] == n
    assert out.cache.positions().shape == (len(batch), n)
