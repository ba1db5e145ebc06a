"""The demo behind ``make demo``.

It runs the main job on the shipped reference model ``shapes-llava``: ask it fresh ShapesWorld
questions at the three levels of misalignment (object, attribute, relation) on typical and
counterfactual scenes, and report accuracy and the priors it shows. Then every supported family,
built as a tiny random-weight model, runs through its real transformers class and processor on the
same picture and shows where its image, prompt and template tokens sit.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from PIL import Image

from . import families, zoo
from .bench import accuracy_by
from .workflows import evaluation


@dataclass(frozen=True)
class FamilyReport:
    family: str
    hf_class: str
    summary: str
    counts: dict[str, int]
    images: str
    grids: list[tuple[int, int]]
    p_yes: float


@dataclass(frozen=True)
class ReferenceReport:
    summary: str
    examples: pd.DataFrame  # a few questions with the model's answers
    accuracy: pd.DataFrame  # per split and level
    priors: dict[str, float]


def sample_image(size: int = 64) -> Image.Image:
    """One ShapesWorld scene, enough to exercise every processor."""
    from .worlds import ShapesWorld

    return ShapesWorld(seed=0, image_size=size).scenes(1, split="typical")[0].render()


def reference_report(n: int = 60, device=None, progress: bool = True) -> ReferenceReport:
    """Ask shapes-llava ``n`` fresh questions per level and split (world seed unseen in training)."""
    model = zoo.load("shapes-llava", device=device)
    results = evaluation.answers(model, n=n, progress=progress)
    examples = (results.groupby(["split", "level"]).head(1)
                [["split", "level", "prompt", "gold", "output", "correct"]])
    return ReferenceReport(summary=model.summary(), examples=examples,
                           accuracy=accuracy_by(results, "split", "level"),
                           priors=evaluation.prior_figures(results))


def family_report(family: str, prompt: str, device=None) -> FamilyReport:
    """Load the tiny model of ``family``, process the sample image and prompt, and describe it."""
    model = zoo.tiny(family, device=device)
    batch = model.prepare(images=[sample_image()], prompts=[prompt])
    layout = batch.layouts[0]
    p_yes = model.answer_logprobs(batch, ["yes", "no"], first_token=True).softmax(-1)[0, 0].item()
    return FamilyReport(
        family=family, hf_class=type(model.hf).__name__, summary=model.summary(),
        counts={g: len(layout.positions(g)) for g in ("image", "prompt", "template")},
        images=layout.describe_images(), grids=layout.image_grids, p_yes=p_yes,
    )


def run(prompt: str = "Is there a red heart in the image? Answer yes or no.",
        family_names: list[str] | None = None, device=None):
    """Yield one :class:`FamilyReport` per family (the CLI shows them with a progress bar)."""
    for family in family_names or families.names():
        yield family_report(family, prompt, device=device)
