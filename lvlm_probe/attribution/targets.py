"""Targets and foils of attribution methods: one answer token per example, validated.

An answer becomes a token id by one rule, :meth:`lvlm_probe.model.LVLM.answer_token`: a token id
is itself, a string must add exactly one token after the text the model sees. Attribution methods
never take the first token of a longer answer silently: such a target or foil is an
:class:`~lvlm_probe.errors.InputError`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError

Answer = str | int  # a string scored by the token it adds after the prompt, or a token id


def per_example(value: Answer | list[Answer], n: int, what: str) -> list[Answer]:
    """One answer per example from one answer or a list of ``n``."""
    values = [value] * n if isinstance(value, (str, int)) else list(value)
    valid = all((isinstance(v, str) and v.strip()) or (isinstance(v, int) and not isinstance(v, bool))
                for v in values)
    if len(values) != n or not valid:
        raise InputError(f"{what} must be a non-empty string or token id, or a list of {n} of them "
                         f"(one per example), got {value!r}")
    return values


def target_ids(
    model, batch, target: Answer | list[Answer], foil: Answer | list[Answer] | None
) -> tuple[list[str], list[str] | None, Tensor]:
    """Validated targets and foils, and their token ids ``[batch, 2]`` (or ``[batch, 1]``).

    Returns:
        The scored target token of each example, decoded; the foils likewise (None without a foil);
        and the ids ``[batch, 2]`` (target, foil) or ``[batch, 1]``.

    Raises:
        InputError: for a target or foil that is not exactly one token after the text the model
            sees (see ``LVLM.answer_token``), or a foil whose token is the target's.
    """
    n = len(batch)
    targets = per_example(target, n, "target")
    foils = per_example(foil, n, "foil") if foil is not None else None
    rows = []
    for i in range(n):
        row = [model.answer_token(batch, i, targets[i], what="target")]
        if foils:
            row.append(model.answer_token(batch, i, foils[i], what="foil"))
            if row[0] == row[1]:
                raise InputError(f"example {i}: foil {foils[i]!r} is the same token as target {targets[i]!r}")
        rows.append(row)
    ids = torch.tensor(rows, dtype=torch.long)
    names = [[model.tokenizer.decode([t]) for t in r] for r in rows]  # what was scored, readable
    return [r[0] for r in names], [r[1] for r in names] if foils else None, ids
