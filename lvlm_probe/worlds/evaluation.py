"""The conventions every evaluation on ShapesWorld shares: its seed, question set and caption prompt."""
from __future__ import annotations

from .world import ShapesWorld

EVAL_SEED = 1000  # a world seed whose scenes the reference model's training stream never drew
CAPTION_PROMPT = "Describe the image."  # the prompt the reference model is trained to caption with


def question_set(world: ShapesWorld, n: int) -> list:
    """``n`` questions per (split, level); object questions split evenly over POPE's modes."""
    questions = []
    for split in ("typical", "counterfactual"):
        for mode in ("random", "popular", "adversarial"):
            questions += world.questions(n // 3, level="object", split=split, pope=mode)
        questions += world.questions(n, level="attribute", split=split)
        questions += world.questions(n, level="relation", split=split)
    return questions
