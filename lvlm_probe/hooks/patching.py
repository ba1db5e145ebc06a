"""Writing activations at canonical hook names: the edit side of :mod:`lvlm_probe.hooks.capture`.

:func:`editing` is a context manager that replaces the value of some hook points during every
forward pass inside the block: each edit is a function ``value -> new value`` that sees the value
in lvlm_probe's layout (``[batch, pos, d]``, per-head names ``[batch, pos, head, d_head]``) and
returns one of the same shape. Activation and path patching (:mod:`lvlm_probe.circuits`) are
built on it; so is any ad-hoc ablation::

    def zero_head(z):                       # [batch, pos, head, d_head]
        z = z.clone(); z[:, :, 3] = 0; return z
    with editing(model, {"blocks.2.attn.hook_z": zero_head}):
        logits = model.forward(batch).logits

Edit hooks run before any other hook on the same module, so a capture open at the same time sees
the edited value. Hooks are removed when the block exits, also when it raises.

Not every value can be written: a name must be a module's input or output in the residual
computation. ``hook_result`` (a product formed for reading) is written through ``hook_z``;
``hook_resid_mid`` is read at the MLP norm's input, and writing it there would change the MLP's
input but not the residual stream; ``ln_final.hook_normalized`` and attention patterns and scores
are not passed between modules.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from ..errors import InputError, LVLMProbeError
from .names import HookPoint, expand, hook_points

Edit = Callable[[Tensor], Tensor]

# names that are read somewhere writing would not mean the same thing, and what to write instead
NOT_WRITABLE = {
    "hook_result": "write the head's input to the out-projection, hook_z, instead (it determines "
                   "hook_result exactly)",
    "hook_resid_mid": "it is read at the MLP norm's input, so writing there would skip the residual "
                      "stream; write blocks.{l}.hook_attn_out or the next block's hook_resid_pre",
    "hook_normalized": "it is the final norm's normalised input; write ln_final.hook_out or the last "
                       "block's hook_resid_post",
    "hook_pattern": "patterns are computed inside the attention function; hide keys with "
                    "lvlm_probe.hooks.attention.hiding, or write hook_q / hook_k",
    "hook_attn_scores": "scores are computed inside the attention function; write hook_q / hook_k",
}


def writable_points(model: Any, names: str | list[str]) -> list[HookPoint]:
    """The hook points of names that can be written, in forward order.

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        names: names or ``*`` patterns.

    Returns:
        Their :class:`HookPoint` s.

    Raises:
        HookNameError: for a name the model does not offer.
        InputError: for a name that cannot be written (see ``NOT_WRITABLE``), saying what to write.
    """
    points = hook_points(model)
    chosen = [points[n] for n in expand(names, list(points))]
    for point in chosen:
        leaf = point.name.rsplit(".", 1)[-1]
        if leaf in NOT_WRITABLE or point.transform not in (None, "heads"):
            reason = NOT_WRITABLE.get(leaf, f"its value is a {point.transform!r} transform of a module's value")
            raise InputError(f"cannot write {point.name!r}: {reason}")
    return chosen


@contextlib.contextmanager
def editing(model: Any, edits: Mapping[str, Edit]) -> Iterator[None]:
    """Replace hook values during every forward pass inside the block.

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        edits: ``{hook name: function}``; the function receives the value (``[batch, pos, ...]``,
            heads split for ``hook_q|k|v|z``) and returns the new value, same shape.

    Yields:
        None; run ``model.forward(batch)`` (or the HF model) inside the block.

    Raises:
        HookNameError: for a name the model does not offer.
        InputError: for a name that cannot be written, or an edit that is not callable.
        LVLMProbeError: (during the forward pass) an edit that returns a tensor of another shape.

    Example:
        >>> with editing(model, {"blocks.0.hook_resid_pre": lambda x: torch.zeros_like(x)}):
        ...     model.forward(batch)
    """
    if not isinstance(edits, Mapping):
        raise InputError(f"edits must be a mapping {{hook name: function}}, got {type(edits).__name__}")
    bad = [name for name, fn in edits.items() if not callable(fn)]
    if bad:
        raise InputError(f"the edits of {bad} are not callable; expected functions value -> new value")
    handles = []
    try:
        for name, fn in edits.items():
            for point in writable_points(model, name):
                module = model.hf.get_submodule(point.path)
                if point.kind == "input":
                    handles.append(module.register_forward_pre_hook(_pre_hook(model, point, fn),
                                                                    with_kwargs=True, prepend=True))
                else:
                    handles.append(module.register_forward_hook(_hook(model, point, fn), prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _apply(model: Any, point: HookPoint, fn: Edit, raw: Tensor) -> Tensor:
    """The new raw value: the edit applied in lvlm_probe's layout, put back in the module's."""
    value = rearrange(raw, "... (h d) -> ... h d", h=point.heads) if point.transform == "heads" else raw
    new = fn(value)
    if not torch.is_tensor(new) or new.shape != value.shape:
        got = tuple(new.shape) if torch.is_tensor(new) else type(new).__name__
        raise LVLMProbeError(f"the edit of {point.name!r} returned {got}; expected a tensor of the "
                             f"value's shape {tuple(value.shape)}")
    new = new.to(device=raw.device, dtype=raw.dtype)
    return rearrange(new, "... h d -> ... (h d)") if point.transform == "heads" else new


def _pre_hook(model: Any, point: HookPoint, fn: Edit):
    def hook(module, args, kwargs):
        if args and torch.is_tensor(args[0]):
            return (_apply(model, point, fn, args[0]), *args[1:]), kwargs
        for key in ("hidden_states", "input"):  # decoder layers take hidden_states by keyword too
            if torch.is_tensor(kwargs.get(key)):
                return args, {**kwargs, key: _apply(model, point, fn, kwargs[key])}
        raise LVLMProbeError(f"internal: {point.name}: {type(module).__name__} received no tensor input "
                             f"to edit (positional args {len(args)}, keywords {sorted(kwargs)})")
    return hook


def _hook(model: Any, point: HookPoint, fn: Edit):
    def edit(raw: Tensor, args) -> Tensor:
        # Mixture-of-experts blocks (Llama 4) take [b, p, d] and return it flattened to [b * p, d]:
        # the edit sees [b, p, d], as the capture does, and the module's shape is restored after.
        source = args[0] if args and torch.is_tensor(args[0]) else None
        if (point.space == "lm" and raw.ndim == 2 and source is not None and source.ndim == 3
                and source.shape[0] * source.shape[1] == raw.shape[0]):
            shaped = raw.reshape(*source.shape[:2], raw.shape[-1])
            return _apply(model, point, fn, shaped).reshape(raw.shape)
        return _apply(model, point, fn, raw)

    def hook(module, args, output):
        if torch.is_tensor(output):
            return edit(output, args)
        if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
            return (edit(output[0], args), *output[1:])
        raise LVLMProbeError(f"internal: {point.name}: {type(module).__name__} returned "
                             f"{type(output).__name__}, not a tensor to edit")
    return hook
