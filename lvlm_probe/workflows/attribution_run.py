"""Attribution runs that write tables and figures: one prompt, or ShapesWorld colour questions.

``world_attribution`` asks a model colour questions about counterfactual scenes (objects in an
atypical colour), scores the true colour against the shape's typical one, and splits that score
among prior, prompt and image; errors that name the typical colour are the prior overriding the
image, and their split shows it. It writes ``split.parquet`` (one row per question: the split's
columns, the ``question``, the model's answer and the outcome), ``split.png`` and a few image maps
(``map_<i>.png``, each stating its model, question, target, explained value and the model's own
answer, which its PNG text chunks also hold).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..attribution.image_maps import image_map
from ..attribution.sources import source_split
from ..fileio import write_parquet
from ..viz import save_figure


def world_attribution(model, out: str | Path, n: int = 60, seed: int = 1000, maps: int = 4,
                      method: str = "ig") -> pd.DataFrame:
    """Source split (and a few image maps) of colour questions on counterfactual ShapesWorld scenes.

    Args:
        model: an :class:`~lvlm_probe.LVLM` that answers ShapesWorld questions (e.g. shapes-llava).
        out: output folder.
        n: questions.
        seed: the world's seed (1000: scenes shapes-llava never saw in training).
        maps: how many examples get an image map figure.
        method: the image map's method.

    Returns:
        The split table (also written to ``out/split.parquet``).
    """
    from ..worlds import ShapesWorld

    out = Path(out)
    questions = ShapesWorld(seed=seed, image_size=64).questions(n, level="attribute", split="counterfactual",
                                                               kind="color")
    batch = model.prepare(images=[q.image for q in questions], prompts=[q.prompt for q in questions])
    split = source_split(model, batch, [q.answer for q in questions], foil=[q.typical_color for q in questions])
    said = [s.split()[0].strip(".").lower() if s else "" for s in model.generate(batch, max_new_tokens=2)]
    table = split.shares().assign(
        question=[q.prompt for q in questions], answer=[q.answer for q in questions],
        typical=[q.typical_color for q in questions], said=said,
        outcome=["right" if s == q.answer else "typical" if s == q.typical_color else "other"
                 for s, q in zip(said, questions)])
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(out / "split.parquet", table, "split table")
    labels = [f"{o}: {q.shape}" for o, q in zip(table["outcome"], questions)]
    save_figure(split.plot(labels=labels, first=30), out / "split.png")
    if maps:
        picked = questions[:maps]
        small = model.prepare(images=[q.image for q in picked], prompts=[q.prompt for q in picked])
        result = image_map(model, small, [q.answer for q in picked], method=method)
        for i in range(len(picked)):
            save_figure(result.plot(i), out / f"map_{i}.png", metadata=result.metadata(i))
    return table
