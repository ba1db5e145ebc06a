"""Position selectors and reductions, applied inside a hook so unselected positions are never kept.

In lvlm_probe, *positions* are always sequence positions: index tensors (``layout.positions(group)``,
``ActivationCache.positions()``), or, as the ``positions=`` argument of public functions, a
*selector* that names them. Inside the library a selector is called ``selector``.

A selector picks sequence positions of each example from its :class:`~lvlm_probe.TokenLayout`:

* ``"all"``: every position; with ``reduce="none"`` the tensor is kept whole (padding included)
  and needs no layout; with a reduction, every non-pad position;
* ``"image"``, ``"prompt"``, ``"template"``: that position group;
* ``"last"``: each example's last non-pad position;
* any other string: a word of the prompt, all its sub-tokens (``layout.word_positions``);
* a callable ``layout -> LongTensor`` of positions.

Reductions over the selected positions of each example:

* ``"none"``: keep them. Examples may select different counts, so the result is padded to
  ``[batch, n_max, ...]`` with zeros, and ``ActivationCache.positions()`` gives the kept sequence
  positions ``[batch, n_max]`` with ``-1`` at padding (the mask is ``positions >= 0``);
* ``"mean"``: their mean, ``[batch, ...]``;
* ``"last"``: the last selected position, ``[batch, ...]``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import InputError, LayoutError
from ..layout import TokenLayout

Selector = str | Callable[[TokenLayout], Tensor]
GROUP_SELECTORS = ("all", "image", "prompt", "template", "last")
REDUCTIONS = ("none", "mean", "last")


def check(selector: Selector, reduce: str) -> None:
    """Validate a selector and a reduction before any hook is registered.

    Raises:
        InputError: for a selector that is neither a string nor a callable, an empty string, or
            an unknown reduction.
    """
    if not (callable(selector) or (isinstance(selector, str) and selector.strip())):
        raise InputError(
            f"positions must be one of {GROUP_SELECTORS}, a prompt word or a callable "
            f"layout -> LongTensor; got {selector!r}"
        )
    if reduce not in REDUCTIONS:
        raise InputError(f"unknown reduce {reduce!r}; expected one of {REDUCTIONS}")


def needs_layout(selector: Selector, reduce: str) -> bool:
    """Whether capturing needs the running batch's layouts (all but whole tensors do)."""
    return not (selector == "all" and reduce == "none")


def resolve(selector: Selector, layout: TokenLayout, example: int) -> Int[Tensor, " n"]:
    """Sequence positions one example selects, sorted as the selector gives them.

    Args:
        selector: a selector (see the module docstring).
        layout: the example's layout.
        example: its index in the batch, for error messages.

    Returns:
        ``[n]`` LongTensor of positions, ``n >= 1``.

    Raises:
        LayoutError: if the selector selects nothing, returns positions outside the sequence, or
            names a word that is not in the prompt.
    """
    name = getattr(selector, "__name__", repr(selector)) if callable(selector) else repr(selector)
    try:
        if callable(selector):
            pos = torch.as_tensor(selector(layout), dtype=torch.long).reshape(-1)
        elif selector == "last":
            pos = layout.positions("all")[-1:]
        elif selector in GROUP_SELECTORS:
            pos = layout.positions(selector)
        else:
            pos = layout.word_positions(selector)
    except LayoutError as err:
        raise LayoutError(f"example {example}: positions={name}: {err}") from err
    if pos.numel() == 0:
        raise LayoutError(
            f"example {example}: positions={name} selects no position (layout: {layout.summary()})"
        )
    if int(pos.min()) < 0 or int(pos.max()) >= layout.length:
        raise LayoutError(
            f"example {example}: positions={name} gave {pos.tolist()}, outside the sequence "
            f"[0, {layout.length})"
        )
    return pos


def resolve_batch(selector: Selector, layouts: Sequence[TokenLayout]) -> Int[Tensor, "batch n_max"]:
    """Selected positions of every example, padded with ``-1`` to ``[batch, n_max]``.

    ``"all"`` here means every non-pad position (used with a reduction).
    """
    rows = [resolve(selector, layout, i) for i, layout in enumerate(layouts)]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)


def gather(
    x: Float[Tensor, "batch pos *rest"], positions: Int[Tensor, "batch n"], length: int
) -> Float[Tensor, "batch n *rest"]:
    """Keep the given positions of each example; ``-1`` entries become zeros.

    Args:
        x: a hook's value over the token sequence.
        positions: from :func:`resolve_batch`.
        length: the running batch's sequence length, which ``x`` must have.

    Raises:
        InputError: if the tensor's batch or sequence length does not fit the positions (e.g. a
            generation step after the first, which runs one new position at a time).
    """
    if x.ndim < 2 or x.shape[0] != positions.shape[0]:
        raise InputError(
            f"a hook saw a tensor of shape {tuple(x.shape)}, but the running batch has "
            f"{positions.shape[0]} examples; expected [batch, pos, ...]"
        )
    if x.shape[1] != length:
        raise InputError(
            f"a hook saw {x.shape[1]} sequence positions but the running batch has {length}; "
            "position selectors apply to a full forward pass "
            "(generation steps after the first run one new position at a time: use positions='all')"
        )
    index = positions.clamp(min=0).to(x.device)
    kept = x[torch.arange(x.shape[0], device=x.device)[:, None], index]
    valid = (positions >= 0).to(x.device).reshape(*positions.shape, *[1] * (x.ndim - 2))
    return kept * valid if not bool(valid.all()) else kept


def reduce_kept(
    kept: Float[Tensor, "batch n *rest"], positions: Int[Tensor, "batch n"], how: str
) -> Float[Tensor, "batch ..."]:
    """Reduce gathered positions: ``"none"`` -> ``[batch, n, ...]``; ``"mean"``, ``"last"`` ->
    ``[batch, ...]``. Padding entries (``positions == -1``) are excluded."""
    if how == "none":
        return kept
    valid = (positions >= 0).to(kept.device)
    if how == "mean":
        counts = valid.sum(1).reshape(-1, *[1] * (kept.ndim - 2)).to(kept.dtype)
        return kept.sum(1) / counts  # padding rows are zeros, so the sum is over selected ones
    last = valid.sum(1) - 1  # rows are left-aligned: padding comes after the selected positions
    return kept[torch.arange(kept.shape[0], device=kept.device), last]
