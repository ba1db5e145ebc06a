"""Token groups of a batch as masks, and batch inputs repeated for runs in one forward pass."""
from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from ..errors import InputError

GROUPS = ("image", "prompt", "template", "last", "all")


def group_mask(batch, group: str, *, required: bool = True) -> Bool[Tensor, "batch seq"]:
    """The positions of a token group in each example.

    Args:
        batch: from ``model.prepare``.
        group: one of ``GROUPS`` (``"last"``: each example's last non-pad token).
        required: raise when an example has no token of the group.

    Raises:
        InputError: for an unknown group, or an empty one when ``required``.
    """
    if group not in GROUPS:
        raise InputError(f"unknown token group {group!r}; expected one of {GROUPS}")
    n, length = batch.input_ids.shape
    mask = torch.zeros(n, length, dtype=torch.bool)
    for i, layout in enumerate(batch.layouts):
        positions = layout.positions("all")[-1:] if group == "last" else layout.positions(group)
        if required and len(positions) == 0:
            raise InputError(f"example {i} has no {group} tokens (layout: {layout.summary()})")
        mask[i, positions] = True
    return mask


def repeat_inputs(inputs: dict[str, Any], times: int, packed: dict[str, int] | None = None) -> dict[str, Any]:
    """The processor's inputs with every tensor repeated ``times`` along its first axis: the batch
    run ``times`` over in one pass (packed inputs such as Qwen2-VL's pixels repeat whole, which
    keeps them in example order). Inputs in ``packed`` (the family's ``packed_inputs``) hold the
    whole batch in one row and repeat along their given axis instead."""
    packed = packed or {}
    return {k: torch.cat([v] * times, dim=packed.get(k, 0)) if torch.is_tensor(v) else v
            for k, v in inputs.items()}
