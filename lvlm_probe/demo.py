"""The demo behind ``make demo``: every supported family, built as a tiny random-weight model, runs
through its real transformers class and processor on the same picture, and shows where its image,
prompt and template tokens sit."""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw

from . import families, zoo


@dataclass(frozen=True)
class FamilyReport:
    family: str
    hf_class: str
    summary: str
    counts: dict[str, int]
    images: str
    grids: list[tuple[int, int]]
    answer: str
    p_yes: float


def sample_image(size: int = 64) -> Image.Image:
    """A red heart-ish circle left of a blue square on white: enough to exercise the processors."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((size * 0.08, size * 0.3, size * 0.42, size * 0.64), fill=(220, 30, 40))
    draw.rectangle((size * 0.58, size * 0.3, size * 0.92, size * 0.64), fill=(30, 60, 220))
    return image


def family_report(family: str, prompt: str, device=None) -> FamilyReport:
    """Load the tiny model of ``family``, process the sample image and prompt, and describe it."""
    model = zoo.tiny(family, device=device)
    batch = model.prepare(images=[sample_image()], prompts=[prompt])
    layout = batch.layouts[0]
    p_yes = model.answer_logprobs(batch, ["yes", "no"]).softmax(-1)[0, 0].item()
    answer = model.generate(batch, max_new_tokens=4)[0]
    return FamilyReport(
        family=family, hf_class=type(model.hf).__name__, summary=model.summary(),
        counts={g: len(layout.positions(g)) for g in ("image", "prompt", "template")},
        images=layout.describe_images(), grids=layout.image_grids, answer=answer, p_yes=p_yes,
    )


def run(prompt: str = "Is there a red circle left of a blue square? Answer yes or no.",
        family_names: list[str] | None = None, device=None):
    """Yield one :class:`FamilyReport` per family (the CLI shows them with a progress bar)."""
    for family in family_names or families.names():
        yield family_report(family, prompt, device=device)
