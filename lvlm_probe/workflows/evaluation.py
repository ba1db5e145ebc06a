"""How well a model answers fresh ShapesWorld questions, and whether it shows the world's priors.

The figures here are the acceptance figures of ``shapes-llava``: accuracy per level on typical and
counterfactual scenes, how often its counterfactual-colour errors name the shape's typical colour,
and its yes-ratio on absent objects under POPE's random and adversarial sampling.
"""
from __future__ import annotations

import pandas as pd

from ..bench import accuracy_by, ask
from ..worlds import ShapesWorld
from ..worlds.evaluation import EVAL_SEED, question_set


def answers(model, n: int = 300, seed: int = EVAL_SEED, image_size: int | None = None,
            progress: bool = True) -> pd.DataFrame:
    """Ask ``model`` the evaluation questions; one row per question (see ``lvlm_probe.bench.ask``)."""
    if image_size is None:
        crop = getattr(model.processor.image_processor, "crop_size", None) or {}
        image_size = int(crop.get("height", 64)) if crop else 64
    world = ShapesWorld(seed=seed, image_size=image_size)
    return ask(model, question_set(world, n), progress=progress)


def prior_figures(results: pd.DataFrame) -> dict[str, float]:
    """The figures that show the training priors in a model's answers.

    Returns:
        ``color_accuracy_typical`` / ``color_accuracy_counterfactual`` (open colour questions),
        ``cf_color_errors_naming_typical`` (share of wrong counterfactual colour answers that name
        the shape's typical colour), ``pope_yes_ratio_random`` / ``pope_yes_ratio_adversarial``
        (share of "yes" on absent objects, typical split).
    """
    color = results[(results.level == "attribute") & (results.kind == "color")]
    cf = color[color.split == "counterfactual"]
    cf_wrong = cf[~cf.correct]
    negatives = results[(results.level == "object") & (results.gold == "no") & (results.split == "typical")]
    return {
        "color_accuracy_typical": float(color[color.split == "typical"].correct.mean()),
        "color_accuracy_counterfactual": float(cf.correct.mean()),
        "cf_color_errors": float(len(cf_wrong)),
        "cf_color_errors_naming_typical": float((cf_wrong.answer == cf_wrong.typical_color).mean())
        if len(cf_wrong) else float("nan"),
        "pope_yes_ratio_random": float((negatives[negatives.pope == "random"].answer == "yes").mean()),
        "pope_yes_ratio_adversarial": float((negatives[negatives.pope == "adversarial"].answer == "yes").mean()),
    }


def evaluate(model, n: int = 300, seed: int = EVAL_SEED, progress: bool = True) -> pd.DataFrame:
    """Accuracy per split and level on fresh questions (a world seed not used in training)."""
    return accuracy_by(answers(model, n=n, seed=seed, progress=progress), "split", "level")
