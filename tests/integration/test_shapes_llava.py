"""The shipped reference model: loads offline, answers ShapesWorld questions from a world seed it
never saw in training, and shows the priors it was given (the acceptance figures of shapes-llava)."""
from __future__ import annotations

import json

import pytest

import lvlm_probe as lp
from lvlm_probe.bench import accuracy_by
from lvlm_probe.workflows import evaluation
from lvlm_probe.zoo.shapes_llava import COMMAND, Recipe

pytestmark = pytest.mark.skipif("shapes-llava" not in lp.zoo.checkpoints(),
                                reason="shapes-llava checkpoint not shipped")


@pytest.fixture(scope="module")
def model():
    return lp.zoo.load("shapes-llava", device="cpu")


@pytest.fixture(scope="module")
def results(model):
    return evaluation.answers(model, n=150, seed=evaluation.EVAL_SEED + 7, progress=False)


def test_checkpoint_is_small_and_records_its_recipe():
    path = lp.zoo.checkpoint_dir("shapes-llava")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    recipe = json.loads((path / "recipe.json").read_text())
    assert recipe["command"].startswith(COMMAND)
    assert Recipe.from_dict(recipe).world["image_size"] == 64
    assert evaluation.EVAL_SEED != recipe["seed"]


def test_it_is_a_standard_llava(model):
    assert type(model.hf).__name__ == "LlavaForConditionalGeneration"
    assert model.family.name == "llava"
    assert 1e6 <= sum(p.numel() for p in model.hf.parameters()) <= 5e6


def _typical(results):
    return accuracy_by(results[results.split == "typical"], "level").set_index("level")["accuracy"]


def test_it_answers_from_the_image(results):
    """Well above chance on typical scenes (yes/no 0.5, colour 1/6, relation mix ~0.38)."""
    typical = _typical(results)
    assert typical["object"] >= 0.8
    assert typical["attribute"] >= 0.8


def test_accuracy_targets_on_typical_scenes(results):
    typical = _typical(results)
    assert typical["attribute"] >= 0.95
    assert typical["relation"] >= 0.90


def test_object_accuracy_target_on_typical_scenes(results):
    assert _typical(results)["object"] >= 0.95


def test_it_shows_its_colour_prior(results):
    attribute = accuracy_by(results[results.level == "attribute"], "split").set_index("split")["accuracy"]
    assert attribute["counterfactual"] <= attribute["typical"] - 0.05
    assert evaluation.prior_figures(results)["cf_color_errors_naming_typical"] > 0.5


def test_it_shows_its_cooccurrence_prior(results):
    figures = evaluation.prior_figures(results)
    assert figures["pope_yes_ratio_adversarial"] > figures["pope_yes_ratio_random"]
