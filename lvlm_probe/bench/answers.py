"""Asking a model questions and scoring its free-text answers against the gold ones."""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from ..errors import InputError


def first_word(text: str) -> str:
    """The first word of an answer, lowercased, punctuation stripped (``"Yes, it is."`` -> ``"yes"``)."""
    match = re.search(r"[a-zA-Z]+", text)
    return match.group(0).lower() if match else ""


def batches(model, questions: Sequence[Any], batch_size: int, *, desc: str, progress: bool
            ) -> Iterator[tuple[Sequence[Any], Any]]:
    """``(questions, batch)`` chunks of ``batch_size`` questions, prepared for ``model``, with a
    progress bar.

    Raises:
        InputError: for an empty question list or a non-positive batch size.
    """
    if not len(questions):
        raise InputError("questions is empty; expected at least one question")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    for start in tqdm(range(0, len(questions), batch_size), desc=desc, disable=not progress):
        chunk = questions[start:start + batch_size]
        yield chunk, model.prepare(images=[q.image for q in chunk], prompts=[q.prompt for q in chunk])


def ask(model, questions: Sequence[Any], *, batch_size: int = 32, max_new_tokens: int = 3,
        progress: bool = True) -> pd.DataFrame:
    """Ask every question with greedy generation and score the first word of each answer.

    Args:
        model: an :class:`~lvlm_probe.model.LVLM`.
        questions: ShapesWorld questions (anything with ``image``, ``prompt``, ``answer``, ``id``,
            ``level`` and ``kind``; a ``labels()`` method adds its label columns).

    Returns:
        One row per question: id, its labels (level, kind, split, pope, shape, colour, ...), prompt, gold,
        output (generated text), answer (its first word), correct.

    Raises:
        InputError: for an empty question list or a non-positive batch size.
    """
    rows = []
    for chunk, batch in batches(model, questions, batch_size, desc="asking", progress=progress):
        for q, out in zip(chunk, model.generate(batch, max_new_tokens=max_new_tokens)):
            answer = first_word(out)
            labels = q.labels() if hasattr(q, "labels") else dict(level=q.level, kind=q.kind)
            rows.append(dict(id=q.id, **labels, prompt=q.prompt, gold=q.answer, output=out, answer=answer,
                             correct=answer == q.answer))
    return pd.DataFrame(rows)


def accuracy_by(results: pd.DataFrame, *by: str) -> pd.DataFrame:
    """Accuracy and count per group, e.g. ``accuracy_by(df, "split", "level")``."""
    return (results.groupby(list(by), dropna=False)["correct"].agg(accuracy="mean", n="size")
            .reset_index())
