"""The capture context manager and the :class:`ActivationCache` it fills.

Usage::

    with model.capture(["blocks.*.hook_resid_post", "blocks.3.attn.hook_z"], positions="image") as cache:
        model.forward(batch)
    cache["blocks.3.attn.hook_z"]            # [batch, pos, head, d_head]
    cache.stack("blocks.*.hook_resid_post")  # [layer, batch, pos, d_model]

Hooks exist only inside the ``with`` block: ``__exit__`` removes them, also when the block
raises. Hooks never return a value, so the model's outputs are unchanged. Captured tensors are
detached copies that stay on the model's device (moving them to the CPU is the caller's choice, so a
GPU capture costs no transfer it does not need).

Position selectors need the running batch's layouts: :meth:`LVLM.forward` and
:meth:`LVLM.generate` run inside :func:`running`, which publishes the batch to the hooks through a
context variable. Calling the HF model directly works with ``positions="all", reduce="none"`` only.
Vision, Q-Former and projector values (and cross-attention keys and values) are not in the token
sequence, so they are captured whole: asking for them with another selector or a reduction raises
:class:`InputError`.

Attention patterns and scores (``attn.hook_pattern``, ``attn.hook_attn_scores``,
``[batch, head, query, key]``) switch the language model to eager attention for the duration of
the block (see :mod:`lvlm_probe.hooks.attention`); the other names leave the configured
implementation alone. Position selectors and reductions apply to their query axis: with
``positions="last", reduce="last"`` the pattern is ``[batch, head, key]``, the attention of each
example's last token to every key.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError, LVLMProbeError
from . import attention, values
from .names import HookPoint, expand, hook_points, pattern_regex
from .selectors import Selector, gather, needs_layout, reduce_kept, resolve_batch
from .selectors import check as check_selector

_RUNNING: contextvars.ContextVar[Any] = contextvars.ContextVar("lvlm_probe_running_batch", default=None)


@contextlib.contextmanager
def running(batch: Any) -> Iterator[None]:
    """Tell active captures which :class:`~lvlm_probe.Batch` the model is running."""
    token = _RUNNING.set(batch)
    try:
        yield
    finally:
        _RUNNING.reset(token)


class ActivationCache:
    """Captured values by hook name.

    ``cache[name]`` is the value of one forward pass; LM values are ``[batch, pos, ...]`` (``pos``
    the selected positions, padded, see :meth:`positions`), or ``[batch, ...]`` after a reduction.
    A hook that ran several times (``generate`` runs one forward per new token) keeps every call:
    see :meth:`calls`.
    """

    def __init__(self, selector: Selector = "all", reduce: str = "none"):
        self.selector, self.reduce = selector, reduce
        self._calls: dict[str, list[Tensor]] = {}
        self._kept: list[Tensor | None] = []  # the kept positions of each forward pass that resolved them

    def __getitem__(self, name: str) -> Tensor:
        calls = self.calls(name)
        if len(calls) != 1:
            raise LVLMProbeError(
                f"hook {name!r} ran {len(calls)} times inside the capture (generate runs one forward "
                "per new token); use cache.calls(name) for the list of values"
            )
        return calls[0]

    def calls(self, name: str) -> list[Tensor]:
        """The value of every call of a hook, in call order.

        Raises:
            KeyError: for a name that was not captured or whose module never ran.
        """
        if name not in self._calls:
            raise KeyError(f"{name!r} was not captured (or its module did not run); captured: {self.names()}")
        return self._calls[name]

    def __contains__(self, name: object) -> bool:
        return name in self._calls

    def names(self) -> list[str]:
        """Captured names, in the order their hooks first ran."""
        return list(self._calls)

    def stack(self, pattern: str) -> Float[Tensor, "layer ..."]:
        """Stack the captured names matching a ``*`` pattern along a new first axis, by layer.

        Returns:
            ``[layer, ...]``, e.g. ``[layer, batch, pos, d_model]`` for ``blocks.*.hook_resid_post``.

        Raises:
            KeyError: if no captured name matches.
            LVLMProbeError: if the matched values have different shapes.
        """
        regex = pattern_regex(pattern)
        hits = sorted((tuple(int(g) for g in m.groups()), n) for n in self._calls if (m := regex.match(n)))
        if not hits:
            raise KeyError(f"no captured name matches {pattern!r}; captured: {self.names()}")
        values = [self[n] for _, n in hits]
        # with a device_map the layers (and so their values) live on different devices
        values = [v.to(values[0].device) for v in values]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise LVLMProbeError(f"cannot stack {pattern!r}: shapes differ {sorted(shapes)}")
        return torch.stack(values)

    def positions(self) -> Tensor | None:
        """Sequence positions kept for each example, ``[batch, n_max]`` with ``-1`` at padding
        (``mask = positions >= 0``); None when whole tensors were kept (``"all"``, ``"none"``)."""
        return self._kept[-1] if self._kept else None

    def __repr__(self) -> str:
        return (f"ActivationCache({len(self._calls)} names, positions={self.selector!r}, "
                f"reduce={self.reduce!r})")


class Capture:
    """Context manager registering the hooks of some names; see :meth:`LVLM.capture`.

    Args:
        model: the :class:`~lvlm_probe.LVLM`.
        names: names or ``*`` patterns (see :mod:`lvlm_probe.hooks.names`).
        positions: a selector (see :mod:`lvlm_probe.hooks.selectors`).
        reduce: ``"none"``, ``"mean"`` or ``"last"``.

    Raises:
        HookNameError: for a name the model does not offer.
        InputError: for a bad selector or reduction, or one applied to vision/projector names.
    """

    def __init__(
        self, model: Any, names: str | list[str], positions: Selector = "all", reduce: str = "none"
    ):
        check_selector(positions, reduce)
        points = hook_points(model)
        self.points = [points[n] for n in expand(names, list(points))]
        outside = [p.name for p in self.points if p.space != "lm"]
        if outside and needs_layout(positions, reduce):
            raise InputError(
                f"{outside[:3]} are not in the token sequence, so they are captured whole; got "
                f"positions={positions!r}, reduce={reduce!r}; capture them in a separate "
                "model.capture(names) with positions='all', reduce='none'"
            )
        self.model, self.selector, self.reduce = model, positions, reduce
        self.cache = ActivationCache(positions, reduce)
        self._handles: list[Any] = []
        self._resolved: tuple[Any, Tensor] | None = None  # (batch, its kept positions) of the running batch
        self._entered = False
        self._seq_shape: tuple[int, int] | None = None  # [batch, pos] of the last block input
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> ActivationCache:
        if self._entered:
            raise LVLMProbeError("a capture context can be entered once; call model.capture(...) again")
        self._entered = True
        try:
            # OPT (BLIP-2) flattens [batch, pos] before its MLP; a pre-hook on each block records
            # the sequence shape so such values can be unflattened (see _store).
            lm_layers = self.model.family.lm_layers + "."
            blocks = {p.layer for p in self.points if p.path.startswith(lm_layers)}
            for layer in sorted(blocks):
                module = self.model.hf.get_submodule(f"{self.model.family.lm_layers}.{layer}")
                self._handles.append(module.register_forward_pre_hook(self._shape_hook, with_kwargs=True))
            watch = []
            for point in self.points:
                module = self.model.hf.get_submodule(point.path)
                if point.kind == "attention":
                    watch.append((module, self._listener(point)))
                elif point.kind == "input":
                    self._handles.append(module.register_forward_pre_hook(self._pre_hook(point), with_kwargs=True))
                else:
                    self._handles.append(module.register_forward_hook(self._hook(point)))
            if watch:
                self._stack.enter_context(attention.listening(watch))
        except BaseException:
            self._remove()
            raise
        return self.cache

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        try:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
        finally:
            self._stack.close()  # restores the attention implementation

    # --- hooks ---------------------------------------------------------------------------------
    def _shape_hook(self, module, args, kwargs):
        value = args[0] if args else kwargs.get("hidden_states")
        if torch.is_tensor(value) and value.ndim == 3:
            self._seq_shape = tuple(value.shape[:2])

    def _pre_hook(self, point: HookPoint):
        def hook(module, args, kwargs):
            # hidden_states reach a decoder layer positionally or by keyword, depending on the family
            value = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            if not torch.is_tensor(value):
                raise LVLMProbeError(
                    f"internal: {point.name}: {type(module).__name__} received no tensor input "
                    f"(positional args {len(args)}, keywords {sorted(kwargs)})"
                )
            self._store(point, value)
        return hook

    def _hook(self, point: HookPoint):
        def hook(module, args, output):
            self._store(point, values.module_value(output))
        return hook

    def _listener(self, point: HookPoint):
        def listener(pattern: Tensor, scores):
            value = scores() if point.transform == "scores" else pattern
            # the query axis is the sequence axis position selectors apply to
            self._store(point, rearrange(value, "b h q k -> b q h k"))
        return listener

    def _store(self, point: HookPoint, value: Tensor) -> None:
        value = values.as_sequence(point, value.detach(), self._seq_shape)
        pos = self._batch_positions() if point.space == "lm" else None
        if pos is not None:
            value = gather(value, pos, length=self._resolved[0].input_ids.shape[1])
        elif point.kind != "attention" and point.transform not in ("result", "normalized"):
            # a whole tensor still shares memory with the model's; copy it so in-place updates
            # later in the forward pass cannot change what was captured (gather and the two
            # transforms make new tensors; patterns and scores are never written to)
            value = value.clone()
        value = values.finish(self.model, point, value)
        if pos is not None:
            value = reduce_kept(value, pos, self.reduce)
        if point.kind == "attention" and value.ndim == 4:
            # back to [batch, head, query, key]; a reduction over queries leaves [batch, head, key]
            value = rearrange(value, "b q h k -> b h q k")
        self.cache._calls.setdefault(point.name, []).append(value)

    def _batch_positions(self) -> Tensor | None:
        if not needs_layout(self.selector, self.reduce):
            return None
        batch = _RUNNING.get()
        if batch is None:
            raise LVLMProbeError(
                f"a hook ran without a known batch, but positions={self.selector!r}, "
                f"reduce={self.reduce!r} need the batch's layouts; run model.forward(batch) or "
                "model.generate(batch) inside the capture, or capture with positions='all', reduce='none'"
            )
        if self._resolved is None or self._resolved[0] is not batch:
            self._resolved = (batch, resolve_batch(self.selector, batch.layouts))
            self.cache._kept.append(self._resolved[1])
        return self._resolved[1]
