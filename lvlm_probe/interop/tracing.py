"""nnsight over a loaded :class:`~lvlm_probe.LVLM`, and lvlm_probe's hook names inside its traces.

:func:`nnsight` wraps a twin of ``model.hf`` (see :func:`~lvlm_probe.interop.twin`: new module
objects, the same parameter tensors) in ``nnsight.NNsight``: wrapping installs nnsight's controller
as the ``forward`` of every module it wraps, for good, so ``model.hf`` itself is left alone. A trace
takes exactly what the HF model takes, so ``nn_model.trace(**batch.inputs)`` runs the batch that
``model.forward(batch)`` runs.

:func:`nnsight_paths` says where each hook name lives (module path relative to the nnsight root,
input or output, transform), for ad-hoc reads and edits; :func:`nnsight_save`, called inside a
trace, records names through nnsight's own ``tracer.cache`` and gives them back after the trace in
lvlm_probe's layout (heads split for ``hook_q|k|v|z``, per-head out-projection for
``hook_result``), so they compare with ``model.capture`` directly::

    nn_model = lp.interop.nnsight(model)
    with nn_model.trace(**batch.inputs) as tracer:
        values = lp.interop.nnsight_save(tracer, model, ["blocks.*.attn.hook_z"])
        logits = nn_model.output.logits.save()
    values["blocks.0.attn.hook_z"]    # [batch, pos, head, d_head]

nnsight is imported only when one of these functions is called (importing it patches torch and
``object``).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from torch import Tensor

from ..errors import HookNameError, InputError, LVLMProbeError
from ..hooks import values
from ..hooks.names import HookPoint, expand, hook_points
from .bridge import twin


class NNsightPath(NamedTuple):
    """Where one hook name's value is in an nnsight trace.

    Attributes:
        path: dotted module path from the nnsight root (``nn_model.get(path)``), which is the
            HF module path.
        kind: ``"output"`` (``.output``, its first element when a tuple) or ``"input"``
            (``.input``, the module's first input).
        transform: None, ``"heads"`` (split the last axis into heads,
            ``b p (h d) -> b p h d``) or ``"result"`` (heads of z through the out-projection).
    """

    path: str
    kind: str
    transform: str | None


def nnsight(model: Any, *, share_weights: bool = True) -> Any:
    """An ``nnsight.NNsight`` over the model's weights.

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        share_weights: wrap a twin of ``model.hf`` that shares its parameter tensors (default);
            False wraps a full copy.

    Returns:
        ``nnsight.NNsight``; trace it with the HF model's inputs: ``nn_model.trace(**batch.inputs)``.

    Example:
        >>> nn_model = lp.interop.nnsight(model)
        >>> with nn_model.trace(**batch.inputs):
        ...     logits = nn_model.output.logits.save()
    """
    import nnsight as ns

    return ns.NNsight(twin(model.hf, share_weights=share_weights))


def _points(model: Any, names: str | list[str]) -> list[HookPoint]:
    points = hook_points(model)
    chosen = [points[n] for n in expand(names, list(points))]
    inside = [p.name for p in chosen if p.kind not in ("output", "input")]
    if inside:
        raise InputError(
            f"{inside[:3]} are computed inside the attention function, not passed between modules, "
            "so nnsight cannot read them by module path; capture them with model.capture(names)"
        )
    return chosen


def nnsight_paths(model: Any, names: str | list[str]) -> dict[str, NNsightPath]:
    """The nnsight module path, input/output and transform of each name.

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        names: names or ``*`` patterns (see ``model.hook_names()``).

    Returns:
        ``{name: NNsightPath(path, kind, transform)}`` in forward order.

    Raises:
        HookNameError: a name the model does not offer.
        InputError: attention patterns or scores, which are not a module's input or output.

    Example:
        >>> lp.interop.nnsight_paths(model, "blocks.1.attn.hook_z")
        {'blocks.1.attn.hook_z': NNsightPath(path='model.language_model.layers.1.self_attn.o_proj',
                                             kind='input', transform='heads')}
    """
    return {p.name: NNsightPath(p.path, p.kind, p.transform) for p in _points(model, names)}


def nnsight_save(tracer: Any, model: Any, names: str | list[str]) -> NNsightValues:
    """Inside an nnsight trace: record these names, to read after the trace.

    Recording goes through ``tracer.cache``, which nnsight requires to be declared before any
    other read or edit in the trace; values are those after the trace's interventions.

    Args:
        tracer: the tracer of ``with nn_model.trace(...) as tracer``, ``nn_model`` from :func:`nnsight`.
        model: the :class:`~lvlm_probe.LVLM` ``nn_model`` was made from (for names and head counts).
        names: names or ``*`` patterns.

    Returns:
        An :class:`NNsightValues` mapping, filled when the trace ends.

    Raises:
        HookNameError: a name the model does not offer.
        InputError: attention patterns or scores (see :func:`nnsight_paths`).
        LVLMProbeError: a module path that the traced model does not have.

    Example:
        >>> with nn_model.trace(**batch.inputs) as tracer:
        ...     values = lp.interop.nnsight_save(tracer, model, "blocks.*.hook_resid_post")
        >>> values["blocks.0.hook_resid_post"]     # [batch, pos, d_model]
    """
    import nnsight as ns

    points = _points(model, names)
    root = tracer.envoy
    wanted = {p.path for p in points}
    # BLIP-2's OPT flattens [batch, pos] inside its layers; the first layer's input gives the shape
    shape_path = f"{model.family.lm_layers}.0"
    paths = {"output": {p.path for p in points if p.kind == "output"},
             "input": {p.path for p in points if p.kind == "input"} | {shape_path}}
    envoys = {}
    for path in wanted | {shape_path}:
        try:
            envoys[path] = root.get(path)
        except AttributeError as err:
            raise LVLMProbeError(
                f"the traced model has no module {path!r}; was nn_model made from this model "
                "with lp.interop.nnsight(model)?"
            ) from err
    caches = {
        kind: tracer.cache(modules=[envoys[p] for p in sorted(selected)], device=None,
                           include_output=kind == "output", include_inputs=kind == "input")
        for kind, selected in paths.items() if selected
    }
    return ns.save(NNsightValues(model, points, caches, envoys, shape_path))


class NNsightValues(Mapping[str, Tensor]):
    """Values recorded by :func:`nnsight_save`, by hook name, in lvlm_probe's layout.

    ``values[name]`` is the whole tensor of one forward pass: LM values ``[batch, pos, ...]``
    (heads as an axis for per-head names), vision and projector values in their tower's layout,
    as ``model.capture(names)`` gives them with ``positions="all"``.
    """

    def __init__(self, model: Any, points: list[HookPoint], caches: dict[str, Any],
                 envoys: dict[str, Any], shape_path: str):
        self._model, self._points = model, {p.name: p for p in points}
        self._caches, self._envoys, self._shape_path = caches, envoys, shape_path
        self._done: dict[str, Tensor] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(self._points)

    def __len__(self) -> int:
        return len(self._points)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._points:
            raise HookNameError(f"{name!r} was not saved; saved: {list(self._points)}")
        if name not in self._done:
            self._done[name] = self._value(self._points[name])
        return self._done[name]

    def _entry(self, kind: str, path: str) -> Any:
        view = self._caches[kind][self._envoys[path].path]
        try:
            visits = len(view)
        except KeyError as err:
            raise LVLMProbeError(
                f"module {path!r} did not run in the trace (or the trace has not ended yet)"
            ) from err
        if visits != 1:
            raise LVLMProbeError(
                f"module {path!r} ran {visits} times in the trace; NNsightValues holds one "
                "forward pass (use tracer.cache directly for generation)"
            )
        return view.output if kind == "output" else view.input

    def _value(self, point: HookPoint) -> Tensor:
        # the layout rules of lvlm_probe.hooks.capture, shared through hooks.values
        value = self._entry(point.kind, point.path)
        if point.kind == "output":
            value = values.module_value(value)
        elif isinstance(value, (tuple, list)):
            value = value[0]
        seq_shape = tuple(self._entry("input", self._shape_path).shape[:2])
        return values.finish(self._model, point, values.as_sequence(point, value, seq_shape))

    def __repr__(self) -> str:
        return f"NNsightValues({len(self)} names)"
