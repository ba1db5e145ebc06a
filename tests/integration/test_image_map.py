"""Image maps through captum: exact identities of each method, and on shapes-llava the map points
at the object the question asks about."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lvlm_probe as lp
from lvlm_probe.attribution import image_map
from lvlm_probe.attribution.faithfulness import deletion_insertion, randomization_check
from lvlm_probe.attribution.image_maps import _Score, features
from lvlm_probe.errors import InputError
from lvlm_probe.worlds.masks import patch_objects


@pytest.fixture(scope="module")
def shapes():
    model = lp.zoo.load("shapes-llava", device="cpu")
    questions = lp.worlds.ShapesWorld(seed=1000, image_size=64).questions(
        60, level="attribute", split="typical", kind="color")
    batch = model.prepare(images=[q.image for q in questions], prompts=[q.prompt for q in questions])
    return model, questions, batch


def score_of(model, batch, i, answer, gates):
    ids = model.answer_token_ids(batch, [[answer]] * len(batch))[i]
    return _Score(model, batch, i, ids, False, features(batch.layouts[i])).removed(gates)


def test_ablation_and_shapley_identities(shapes):
    model, questions, batch = shapes
    sub = model.prepare(images=[q.image for q in questions[:3]], prompts=[q.prompt for q in questions[:3]])
    answers = [q.answer for q in questions[:3]]
    ablation = image_map(model, sub, answers, method="ablation")
    shapley = image_map(model, sub, answers, method="shapley", n_samples=4)
    for i in range(3):
        feats = features(sub.layouts[i])
        n = len(feats.positions)
        all_on = torch.ones(1, n)
        full = score_of(model, sub, i, answers[i], all_on)[0]
        # FeatureAblation: a cell's score is what removing that cell alone costs
        r, c = 1, 2
        cell = feats.cells.index((0, r, c))
        without = all_on.clone()
        without[0, cell] = 0
        expected = full - score_of(model, sub, i, answers[i], without)[0]
        assert abs(ablation.grids[i][0][r, c] - float(expected)) < 1e-4
        # Shapley values add up to score(everything) - score(nothing)
        none = score_of(model, sub, i, answers[i], torch.zeros(1, n))[0]
        total = np.nansum(shapley.grids[i][0]) + sum(v for _, v in shapley.words[i])
        assert abs(total - float(full - none)) < 1e-3


def test_ig_completeness(shapes):
    model, questions, batch = shapes
    sub = model.prepare(images=[q.image for q in questions[:6]], prompts=[q.prompt for q in questions[:6]])
    maps = image_map(model, sub, [q.answer for q in questions[:6]], method="ig")
    for i, q in enumerate(questions[:6]):
        ids = model.answer_token_ids(sub, [[q.answer]] * 6)[i]
        score = _Score(model, sub, i, ids, False, features(sub.layouts[i]))
        n = len(score.feats.positions)
        with torch.no_grad():
            ends = score.scaled(torch.cat([torch.ones(1, n), torch.zeros(1, n)]))
        gap = abs(float(ends[0] - ends[1]))
        assert abs(float(maps.delta[i])) < 0.01 * gap


@pytest.fixture(scope="module")
def default_maps(shapes):
    """The colour questions answered right, the default method's maps and their deletion /
    insertion curves."""
    model, questions, batch = shapes
    said = model.generate(batch, max_new_tokens=2)
    right = [i for i, (s, q) in enumerate(zip(said, questions)) if s and s.split()[0].strip(".").lower() == q.answer]
    maps = image_map(model, batch, [q.answer for q in questions])  # the default method
    return right, maps, deletion_insertion(model, batch, [q.answer for q in questions], maps=maps).to_frame()


def test_map_points_at_the_asked_object(shapes, default_maps):
    """Pointing game on colour questions the model answers right, and deletion / insertion: cells
    taken in the map's order lower (raise) the score faster than in a random order."""
    _, questions, _ = shapes
    right, maps, curves = default_maps
    assert len(right) >= 30
    hits = []
    for i in right:
        grid = maps.grids[i][0]
        r, c = np.unravel_index(np.nanargmax(grid), grid.shape)
        hits.append(patch_objects(questions[i].scene, grid.shape[0])[r, c] == questions[i].about[0] + 1)
    assert np.mean(hits) >= 0.7
    areas = curves[curves["example"].isin(right[:12])].groupby("example").mean()
    assert (areas["deletion"] < areas["random_deletion"]).mean() >= 0.8
    assert (areas["insertion"] > areas["random_insertion"]).mean() >= 0.8


def test_deletion_and_random_deletion_start_from_the_whole_image(default_maps):
    _, _, curves = default_maps
    full = curves[curves["step"] == 0].set_index("example")
    assert np.allclose(full["deletion"], full["random_deletion"])  # both start from the whole image


def test_maps_change_when_the_model_is_randomized(shapes):
    model, questions, _ = shapes
    sub = model.prepare(images=[q.image for q in questions[:8]], prompts=[q.prompt for q in questions[:8]])
    before = [p.detach().clone() for p in model.hf.parameters()]
    check = randomization_check(model, sub, [q.answer for q in questions[:8]]).to_frame()
    assert check["spearman"].abs().mean() < 0.5
    assert all(torch.equal(p, q) for p, q in zip(model.hf.parameters(), before))  # randomized a copy
    again = image_map(model, sub, [q.answer for q in questions[:8]])
    first = image_map(model, sub, [q.answer for q in questions[:8]])
    assert np.allclose(again.scores.numpy(), first.scores.numpy(), equal_nan=True)


def test_errors_and_families(shapes):
    model, questions, batch = shapes
    with pytest.raises(InputError, match="unknown method 'gradcam'"):
        image_map(model, batch, "red", method="gradcam")
    for family in ("mllama", "blip2"):
        tiny = lp.zoo.tiny(family, device="cpu")
        image = Image.fromarray(np.zeros((48, 48, 3), dtype=np.uint8))
        tiny_batch = tiny.prepare(images=[[image]], prompts=["Is there a heart?"])
        with pytest.raises(InputError, match="needs image tokens in the sequence"):
            image_map(tiny, tiny_batch, tiny.answer_token_ids(tiny_batch, ["yes"], first_token=True)[0, 0].item())
    qwen = lp.zoo.tiny("qwen2_vl", device="cpu")
    images = [[Image.fromarray(np.full((48, 48, 3), v, dtype=np.uint8))] for v in (0, 255)]
    pair = qwen.prepare(images=images, prompts=["Is there a heart?"] * 2)
    yes = qwen.answer_token_ids(pair, ["yes"], first_token=True)[0, 0].item()
    with pytest.raises(InputError, match="one example per batch"):
        image_map(qwen, pair, yes)
    single = qwen.prepare(images=images[:1], prompts=["Is there a heart?"])
    maps = image_map(qwen, single, yes, method="ablation")
    rows, cols = single.layouts[0].image_grids[0]
    assert maps.scores.shape == (1, rows, cols) and not torch.isnan(maps.scores).any()
    sub = model.prepare(images=[q.image for q in questions[:4]], prompts=[q.prompt for q in questions[:4]])
    answers = [q.answer for q in questions[:4]]
    rollout = image_map(model, sub, answers, method="rollout")
    for i in range(4):  # rollout rows are distributions: the features hold at most all the mass
        total = np.nansum(rollout.grids[i][0]) + sum(v for _, v in rollout.words[i])
        assert 0.0 < total <= 1.0 + 1e-5
    # Two Shapley estimators on counterfactual colours, whose right answer must come from the image:
    # on a typical scene the model can answer from the shape's name alone, and patches whose
    # values are near zero leave both estimates at their sampling noise.
    cf = lp.worlds.ShapesWorld(seed=1000, image_size=64).questions(
        4, level="attribute", split="counterfactual", kind="color")
    sub = model.prepare(images=[q.image for q in cf], prompts=[q.prompt for q in cf])
    answers = [q.answer for q in cf]
    kernel = image_map(model, sub, answers, method="kernelshap", n_samples=400)
    sampled = image_map(model, sub, answers, method="shapley", n_samples=20)
    agree = [np.corrcoef(kernel.grids[i][0].ravel(), sampled.grids[i][0].ravel())[0, 1] for i in range(4)]
    assert min(agree) > 0.5 and np.mean(agree) > 0.7  # two estimates of the same Shapley values
    attention_maps = image_map(model, batch, [q.answer for q in questions], method="attention")
    assert (attention_maps.scores >= 0).all()  # attention weights, averaged
    assert len(attention_maps.plot(0).axes) >= 2
