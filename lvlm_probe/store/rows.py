"""From dataset rows to shard tensors: reading examples, running a batch, buffering one shard.

Nothing here touches the disk: an executor (:mod:`lvlm_probe.store.executor`) decides when a
buffer becomes a shard, and :mod:`lvlm_probe.store.writer` writes it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from ..errors import ImageTypeError, InputError, LayoutError, LVLMProbeError, StoreError
from ..hooks import expand, hook_points
from ..layout import TokenLayout
from .manifest import check_columns
from .store import POSITIONS


@dataclass(frozen=True)
class Example:
    """One dataset example: ``id``, its images (None, one or a list), prompt and label columns."""

    index: int
    id: str | int
    images: Any
    prompt: str
    labels: dict[str, Any]

    @property
    def n_images(self) -> int:
        if self.images is None:
            return 0
        return len(self.images) if isinstance(self.images, (list, tuple)) else 1


def _id(value: Any, index: int) -> str | int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, int, np.integer)):
        raise InputError(f"dataset example {index} has id {value!r}; expected a string or an integer")
    return value if isinstance(value, str) else int(value)


def example_id(item: Any, index: int) -> str | int:
    """The id of a dataset item without rendering its image (for skipping stored examples)."""
    if isinstance(item, Mapping):
        if "id" not in item:
            raise InputError(f"dataset example {index} has no 'id'; got columns {sorted(item)}")
        return _id(item["id"], index)
    if hasattr(item, "to_dict") and hasattr(item, "id"):
        return _id(item.id, index)
    return example(item, index).id


def example(item: Any, index: int) -> Example:
    """Read one dataset item: a mapping with ``id``, ``prompt``, optional ``image`` and labels,
    or an object with ``to_dict()`` giving one (a ShapesWorld ``Question``).

    Raises:
        InputError: a missing ``id`` or ``prompt``, a non-string prompt, or a reserved column.
    """
    row = item.to_dict() if not isinstance(item, Mapping) and hasattr(item, "to_dict") else item
    if not isinstance(row, Mapping):
        raise InputError(
            f"dataset example {index} is a {type(item).__name__}; expected a mapping with 'id', "
            "'image' and 'prompt' (and label columns), or an object with to_dict() giving one"
        )
    missing = [k for k in ("id", "prompt") if k not in row]
    if missing:
        raise InputError(f"dataset example {index} has no {missing}; got columns {sorted(row)}")
    if not isinstance(row["prompt"], str):
        raise InputError(f"dataset example {index} has prompt {row['prompt']!r}; expected a string")
    check_columns(dict(row), index)
    labels = {k: v for k, v in row.items() if k not in ("id", "image")}
    return Example(index, _id(row["id"], index), row.get("image"), row["prompt"], labels)


class Examples:
    """The dataset's examples after the stored ones, read one at a time.

    Iterating checks that the first ids match the store's (a resumed run must see the same
    dataset), that ids are unique, and yields :class:`Example` objects for the rest; once read to
    the end, :attr:`n` is the dataset's length (None until then).
    """

    def __init__(self, dataset: Iterable[Any], stored_ids: list[Any], root: Path):
        self.dataset, self.stored_ids, self.root = dataset, stored_ids, root
        self.n: int | None = None

    def __iter__(self) -> Iterator[Example]:
        seen: dict[Any, int] = {}
        stored = self.stored_ids
        index = -1
        for index, item in enumerate(self.dataset):
            if index < len(stored):
                ident = example_id(item, index)
                if ident != stored[index]:
                    raise StoreError(
                        f"the dataset does not match the store {self.root}: example {index} has id "
                        f"{ident!r}, the store holds {stored[index]!r} there; rerun with the same "
                        "dataset in the same order, or pass another out= or overwrite=True"
                    )
                seen[ident] = index
                continue
            current = example(item, index)
            if current.id in seen:
                raise InputError(f"dataset examples {seen[current.id]} and {index} share the id {current.id!r}; ids must be unique")
            seen[current.id] = index
            yield current
        if index + 1 < len(stored):
            raise StoreError(
                f"the dataset has {index + 1} examples but the store {self.root} already holds "
                f"{len(stored)}; rerun with the same dataset, or pass another out= or overwrite=True"
            )
        self.n = index + 1


def _non_pad(layout: TokenLayout) -> Int[Tensor, " n"]:
    """Every non-pad position: ``positions="all"`` for padded hooks, so values align per example
    whatever the batch's padding."""
    return layout.positions("all")


@dataclass(frozen=True)
class Plan:
    """What to capture: language-model hooks through a selector, other hooks whole.

    Attributes:
        names: every hook, in forward order.
        lm: language-model hooks.
        whole: vision, projector and other hooks outside the token sequence (captured whole).
        selector: the selector passed to the language-model capture.
        label: the ``positions`` argument as recorded in ``store.json``.
        reduce: the reduction.
        padded: hooks that keep a positions axis (``lm`` when ``reduce="none"``).
    """

    names: list[str]
    lm: list[str]
    whole: list[str]
    selector: Any
    label: str
    reduce: str
    padded: list[str] = field(default_factory=list)


def plan(model: Any, hooks: str | list[str], selector: Any, reduce: str) -> Plan:
    """Expand and validate the hooks, selector and reduction before anything is written.

    Raises:
        HookNameError: for a hook the model does not offer (with close matches).
        InputError: for a bad selector or reduction, hooks outside the token sequence with a
            selector or reduction, or attention patterns (not storable per example).
    """
    points = hook_points(model)
    names = expand(hooks, list(points))
    patterns = [n for n in names if points[n].kind == "attention"]
    if patterns:
        raise InputError(
            f"{patterns[:3]} are attention patterns or scores, whose key axis follows each batch's "
            "padding; a store cannot keep them per example. Capture them with model.capture(...)"
        )
    lm = [n for n in names if points[n].space == "lm"]
    whole = [n for n in names if points[n].space != "lm"]
    if callable(selector):
        label = f"callable:{getattr(selector, '__module__', '?')}.{getattr(selector, '__qualname__', '?')}"
    else:
        label = selector
    if whole and (selector != "all" or reduce != "none"):
        raise InputError(
            f"{whole[:3]} are not in the token sequence, so a store keeps them whole; got "
            f"positions={label!r}, reduce={reduce!r}; extract them with positions='all', "
            "reduce='none' (into a separate store)"
        )
    lm_selector = _non_pad if (selector == "all" and reduce == "none") else selector
    for group, sel, red in ((lm, lm_selector, reduce), (whole, "all", "none")):
        if group:
            model.capture(group, positions=sel, reduce=red)  # validates; registers nothing
    return Plan(names, lm, whole, lm_selector, label, reduce, lm if reduce == "none" else [])


def _again(err: LVLMProbeError, message: str) -> LVLMProbeError:
    """The same error type with the dataset context in front of its message."""
    return type(err)(f"{message}: {err}")


def run(model: Any, plan: Plan, examples: list[Example], dtype: torch.dtype, done: str):
    """Run one batch and return its values on the CPU, in the store's dtype.

    Args:
        model: the LVLM.
        plan: from :func:`plan`.
        examples: the batch's examples.
        dtype: the store's dtype (the cast happens on the CPU).
        done: what is already safely written, for error messages.

    Returns:
        ``(values, positions, layouts)``: ``{hook: [b, ...]}``, the kept positions ``[b, n]`` in
        each example's own sequence (or None), and the layouts.

    Raises:
        LayoutError, InputError, ImageTypeError: with the dataset indices and ids of the batch.
        StoreError: a whole-captured hook whose value is not one row per example.
    """
    where = (f"dataset examples {examples[0].index}..{examples[-1].index} "
             f"(ids {[e.id for e in examples]}); {done}")
    try:
        batch = model.prepare(images=[e.images for e in examples], prompts=[e.prompt for e in examples])
        with contextlib.ExitStack() as stack:
            lm = stack.enter_context(model.capture(plan.lm, positions=plan.selector, reduce=plan.reduce)) \
                if plan.lm else None
            whole = stack.enter_context(model.capture(plan.whole)) if plan.whole else None
            model.forward(batch, last_position=True)  # values come from the hooks
    except (LayoutError, InputError, ImageTypeError) as err:
        raise _again(err, where) from err
    values: dict[str, Tensor] = {}
    positions = None
    if lm is not None:
        for name in plan.lm:
            values[name] = lm[name].cpu().to(dtype)
        kept = lm.positions()
        if kept is not None:
            kept = kept.cpu()
            # left padding shifts every position of a batch; store them in the example's own sequence
            first = torch.tensor([int(lay.positions("all")[0]) for lay in batch.layouts])
            positions = torch.where(kept >= 0, kept - first[:, None], -1)
    for name in plan.whole:
        try:
            value = whole[name]
        except KeyError as err:
            raise StoreError(f"{name} did not run for {where} (text-only examples run no vision tower)") from err
        if value.shape[0] != len(examples):
            raise StoreError(
                f"{name} gave shape {tuple(value.shape)} for a batch of {len(examples)} examples with "
                f"{[e.n_images for e in examples]} images ({where}); a store keeps whole values only "
                "when they hold one row per example (one image of a fixed size each)"
            )
        values[name] = value.cpu().to(dtype)
    return values, positions, batch.layouts


def add_batch(model: Any, plan: Plan, examples: list[Example], dtype: torch.dtype,
              buffer: ShardBuffer, fingerprint: dict[str, str], done: str) -> None:
    """Run one batch and add its values and manifest rows to a shard buffer.

    Args:
        model, plan, examples, dtype, done: as for :func:`run`.
        buffer: the shard being filled.
        fingerprint: the store's model fingerprint (``header["fingerprint"]``), recorded per row.
    """
    values, positions, layouts = run(model, plan, examples, dtype, done)
    rows = []
    for i, (item, layout) in enumerate(zip(examples, layouts)):
        kept = None if positions is None else int((positions[i] >= 0).sum())
        rows.append({"id": item.id, **item.labels, "n_images": item.n_images,
                     "n_positions": kept, "layout": layout.summary(), "fingerprint": fingerprint["digest"],
                     "processor_fingerprint": fingerprint["processor"]})
    buffer.add(rows, values, positions)


class ShardBuffer:
    """The values and manifest rows of one shard being filled, batch by batch, on the CPU."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.rows: list[dict[str, Any]] = []
        self.values: dict[str, list[Tensor]] = {n: [] for n in plan.names}
        self.positions: list[Tensor] = []
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list[dict[str, Any]], values: dict[str, Tensor], positions: Tensor | None) -> None:
        self.rows += rows
        for name, value in values.items():
            self.values[name].append(value)
            self.nbytes += value.numel() * value.element_size()
        if self.plan.padded:
            self.positions.append(positions)

    def tensors(self) -> dict[str, Tensor]:
        """Every hook's ``[n, ...]`` tensor; padded hooks and the positions are zero- / ``-1``-padded
        to the shard's widest batch. Consumes the buffered batches (each hook's parts are released
        once joined, so the shard is held about once, not twice)."""
        out = {}
        width = max((p.shape[1] for p in self.positions), default=0)
        for name in list(self.values):
            parts = self.values.pop(name)
            if name not in self.plan.padded:
                out[name] = torch.cat(parts)
                continue
            full = parts[0].new_zeros((len(self), width, *parts[0].shape[2:]))
            start = 0
            for part in parts:
                full[start: start + part.shape[0], : part.shape[1]] = part
                start += part.shape[0]
            out[name] = full
        if self.plan.padded:
            kept = torch.full((len(self), width), -1, dtype=torch.long)
            start = 0
            for part in self.positions:
                kept[start: start + part.shape[0], : part.shape[1]] = part
                start += part.shape[0]
            out[POSITIONS] = kept
        return out
