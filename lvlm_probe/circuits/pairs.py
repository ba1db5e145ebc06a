"""Clean and corrupted batches from counterfactual question pairs."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import InputError
from ..inputs import Batch
from .metrics import check_pair


def pair_batches(model, pairs: Sequence[tuple[Any, Any]]) -> tuple[Batch, Batch, tuple[list, list]]:
    """Prepare the clean and the corrupted batch of ``(clean, corrupted)`` question pairs.

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        pairs: e.g. ``ShapesWorld.pairs(n, change="color")``; each question has ``image``,
            ``prompt`` and ``answer``, and both questions of a pair the same prompt.

    Returns:
        ``(clean, corrupted, answers)`` with ``answers = (clean answers, corrupted answers)``, ready
        for ``patch(model, clean, corrupted, ..., answers=answers)``.

    Raises:
        InputError: for an empty list, a malformed pair, or pairs whose batches do not share a
            token layout.

    Example:
        >>> clean, corrupted, answers = lp.circuits.pair_batches(model, world.pairs(8, change="color"))
    """
    pairs = list(pairs)
    if not pairs or any(not isinstance(p, (tuple, list)) or len(p) != 2 for p in pairs):
        raise InputError(f"pairs must be a non-empty list of (clean, corrupted) questions, got {pairs[:2]!r}")
    for i, (a, b) in enumerate(pairs):
        if getattr(a, "prompt", None) != getattr(b, "prompt", None):
            raise InputError(f"pair {i} has different prompts ({getattr(a, 'prompt', None)!r} vs "
                             f"{getattr(b, 'prompt', None)!r}); patching needs the same prompt")
    clean = model.prepare(images=[a.image for a, _ in pairs], prompts=[a.prompt for a, _ in pairs])
    corrupted = model.prepare(images=[b.image for _, b in pairs], prompts=[b.prompt for _, b in pairs])
    check_pair(clean, corrupted)
    return clean, corrupted, ([a.answer for a, _ in pairs], [b.answer for _, b in pairs])
