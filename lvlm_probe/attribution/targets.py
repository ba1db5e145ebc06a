"""Targets and foils of attribution methods: one answer token per example, validated."""
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

    Raises:
        InputError: for a target or foil that is not exactly one token after the text the model
            sees, or a foil whose token is the target's.
    """
    n = len(batch)
    targets = per_example(target, n, "target")
    foils = per_example(foil, n, "foil") if foil is not None else None
    rows = []
    for i in range(n):
        row = []
        for what, answer in (("target", targets[i]), ("foil", foils[i] if foils else None)):
            if answer is None:
                continue
            if isinstance(answer, int):
                if not 0 <= answer < model.d_vocab:
                    raise InputError(f"example {i}: {what} token id {answer} is outside the vocabulary "
                                     f"[0, {model.d_vocab})")
                row.append(answer)
                continue
            tokens = model.continuation_tokens(batch, i, answer)
            if len(tokens) != 1:
                pieces = model.tokenizer.convert_ids_to_tokens(tokens)
                raise InputError(f"example {i}: {what} {answer!r} is {len(tokens)} tokens {pieces} after "
                                 "the prompt; one token is required (score its first word, e.g. "
                                 f"{answer.split()[0]!r}, or pass a token id's string)")
            row.append(tokens[0])
        if foils and row[0] == row[1]:
            raise InputError(f"example {i}: foil {foils[i]!r} is the same token as target {targets[i]!r}")
        rows.append(row)
    ids = torch.tensor(rows, dtype=torch.long)
    names = [[model.tokenizer.decode([t]) for t in r] for r in rows]  # what was scored, readable
    return [r[0] for r in names], [r[1] for r in names] if foils else None, ids
