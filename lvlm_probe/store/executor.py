"""Executors: how an extraction's batches are run and become committed shards.

:func:`lvlm_probe.extract` validates the call, opens (or resumes) the store under its lock and
hands an :class:`ExtractionPlan` and a :class:`~lvlm_probe.store.writer.ShardWriter` to an
:class:`Executor`, which runs the model over the plan's examples and commits every shard through
the writer, in order. The store then writes its complete header. An executor that cuts shards
as :class:`LocalExecutor` does (:func:`cut_shards`) writes a store byte-identical to a local one.

Executors are chosen by name, ``lp.extract(..., backend="ray")``, from :data:`executors`, where
this module registers ``"local"`` and :mod:`lvlm_probe.distributed` registers ``"ray"``; or
passed as an object, ``backend=MyExecutor()``. To add a backend, subclass :class:`Executor`::

    class Threads(Executor):
        name = "threads"
        def run(self, plan, writer):
            for shard in cut_shards(plan, measure=...):        # lists of examples
                buffer = rows.ShardBuffer(plan.capture)
                ...                                           # rows.add_batch per batch
                writer.write(buffer)                          # or stage_shard + writer.commit
                plan.progress(len(shard))

    executors.register(Threads())                             # lp.extract(..., backend="threads")

:class:`Backend` is what extraction executors and probe-sweep executors
(:class:`lvlm_probe.probing.sweeps.SweepExecutor`) share: a name, the keyword options of
``extract``/``sweep`` they take (``ray_address``, ...), their checks, and a :class:`Registry`.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from ..errors import InputError, LVLMProbeError
from ..hooks.selectors import resolve_batch
from . import rows
from .writer import ShardWriter


class Backend:
    """A way to execute work, selected by ``backend=`` (its :attr:`name`) or passed as an object.

    Attributes:
        name: the name it is registered and selected by (``"local"``, ``"ray"``).
        options: the keyword options of the public call that belong to this backend (e.g.
            ``("ray_address", "ray_resources")``); another backend refuses them.
    """

    name: str = ""
    options: tuple[str, ...] = ()

    def check(self, options: dict[str, Any]) -> None:
        """Validate this backend's options before any work starts (default: accept them).

        Args:
            options: the options of :attr:`options` that the call gave (not None).

        Raises:
            InputError: a bad option value.
            MissingDependencyError: the backend needs a package that is not installed.
        """

    def refuse(self, option: str, value: Any, backend: str) -> LVLMProbeError:
        """The error for one of this backend's options given to another backend."""
        return InputError(f"{option}={value!r} needs backend={self.name!r}, got backend={backend!r}")

    def session(self, options: dict[str, Any]) -> AbstractContextManager[Any]:
        """A context held around several calls with this backend (``run_sweep`` holds one for all
        of its extractions and sweeps), e.g. a connection to a cluster; default: nothing."""
        return contextlib.nullcontext()


B = TypeVar("B", bound=Backend)


class Registry(Generic[B]):
    """Backends of one kind by name: ``resolve`` a ``backend=`` argument, ``check`` its options.

    Args:
        kind: the class every registered backend (and every backend passed as an object) is an
            instance of.
    """

    def __init__(self, kind: type[B]):
        self.kind = kind
        self._backends: dict[str, B] = {}

    def register(self, backend: B) -> B:
        """Make ``backend`` selectable by its name (replacing one of the same name); returns it.

        Raises:
            InputError: not an instance of :attr:`kind`, or without a name.
        """
        if not isinstance(backend, self.kind):
            raise InputError(f"a {self.kind.__name__} is expected, got {type(backend).__name__}")
        if not isinstance(backend.name, str) or not backend.name:
            raise InputError(f"{type(backend).__name__} needs a name (a non-empty string) to be registered")
        self._backends[backend.name] = backend
        return backend

    def unregister(self, name: str) -> None:
        """Remove a registered backend (nothing if there is none by that name)."""
        self._backends.pop(name, None)

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._backends)

    def resolve(self, backend: Any) -> B:
        """The backend a ``backend=`` argument names, or the argument itself if it is one.

        Raises:
            InputError: an unknown name (listing the registered ones), or another kind of backend.
        """
        if isinstance(backend, self.kind):
            return backend
        if isinstance(backend, str) and backend in self._backends:
            return self._backends[backend]
        if isinstance(backend, Backend):
            raise InputError(f"backend {type(backend).__name__} is not a {self.kind.__name__}; expected "
                             f"one of {self.names()} or a {self.kind.__name__}")
        raise InputError(f"unknown backend {backend!r}; expected one of {self.names()} or a "
                         f"{self.kind.__name__} object")

    def check(self, backend: B, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check a call's backend options against its backend; returns the options it was given.

        Args:
            backend: from :meth:`resolve`.
            options: every backend option of the call, None where not given.

        Raises:
            InputError: an option of another backend (as that backend words it), or a bad value.
            MissingDependencyError: the backend's dependencies are not installed.
        """
        given = {k: v for k, v in options.items() if v is not None}
        label = backend.name or type(backend).__name__
        for option, value in given.items():
            if option not in backend.options:
                owner = next((b for b in self._backends.values() if option in b.options), None)
                if owner is None:
                    raise InputError(f"{option}={value!r} is not an option of backend {label!r}")
                raise owner.refuse(option, value, label)
        backend.check(given)
        return given


@dataclass(frozen=True)
class ExtractionPlan:
    """What an executor extracts: the examples after the store's complete shards, and how.

    Attributes:
        model: the :class:`~lvlm_probe.LVLM` (``model.source`` is its
            :class:`~lvlm_probe.model.LoadSpec` when it was loaded from a folder or hub id, for
            executors that load it elsewhere).
        examples: the dataset's rows after the stored ones, as :class:`~lvlm_probe.store.rows.Example`
            objects; iterate it once, to the end (it checks the stored ids and counts the dataset).
        capture: the hooks, selector and reduction, validated on ``model``
            (:func:`lvlm_probe.store.rows.plan`).
        selector: the position selector as the caller passed it (``positions=``), to redo
            :func:`~lvlm_probe.store.rows.plan` in another process.
        dtype: the stored dtype (values are cast on the CPU).
        batch_size: examples per forward pass.
        shard_size: examples per shard.
        max_shard_bytes: a shard closes after the batch that brings it to this many bytes.
        options: this executor's options, as given to the call (see :meth:`Registry.check`).
        progress: call with the number of examples done (a progress bar).
    """

    model: Any
    examples: rows.Examples
    capture: rows.Plan
    selector: Any
    dtype: torch.dtype
    batch_size: int
    shard_size: int
    max_shard_bytes: int
    options: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[int], Any] = lambda n: None


class Executor(Backend, ABC):
    """Runs an extraction's batches and commits its shards; subclass it to add a backend."""

    @abstractmethod
    def run(self, plan: ExtractionPlan, writer: ShardWriter) -> None:
        """Extract every example of ``plan.examples`` and commit the shards through ``writer``
        (:meth:`~lvlm_probe.store.writer.ShardWriter.write`, or
        :func:`~lvlm_probe.store.writer.stage_shard` then
        :meth:`~lvlm_probe.store.writer.ShardWriter.commit`), in order, starting at shard
        ``writer.index``. Called by :func:`lvlm_probe.extract` under the store's lock.

        Raises:
            The library's errors for bad rows, selectors or writes (naming the examples).
        """


class LocalExecutor(Executor):
    """This process: batch by batch into a shard buffer, each shard written when it is full."""

    name = "local"

    def run(self, plan: ExtractionPlan, writer: ShardWriter) -> None:
        buffer = rows.ShardBuffer(plan.capture)
        fingerprint = writer.header["fingerprint"]

        def add(batch: list[rows.Example]) -> int:
            """Run a batch into the shard buffer; the bytes it added."""
            before = buffer.nbytes
            rows.add_batch(plan.model, plan.capture, batch, plan.dtype, buffer, fingerprint, writer.done())
            plan.progress(len(batch))
            return buffer.nbytes - before

        for shard in cut_shards(plan, measure=add):
            rest = shard[len(buffer):]  # the dataset's shorter last batch, which is not measured
            if rest:
                add(rest)
            writer.write(buffer)
            buffer = rows.ShardBuffer(plan.capture)


class BatchSizer:
    """The bytes a batch adds to a shard buffer, counted as ``ShardBuffer.nbytes`` counts them,
    without running the batch: per example for reduced and whole hooks, per example and kept
    position for padded ones (a batch is padded to its widest example). The first call runs one
    example through the model to learn every hook's size in the store's dtype."""

    def __init__(self, model: Any, capture: rows.Plan, dtype: torch.dtype):
        self.model, self.capture, self.dtype = model, capture, dtype
        self.fixed: int | None = None
        self.per_position = 0

    def __call__(self, batch: list[rows.Example]) -> int:
        if self.fixed is None:
            self._measure(batch[0])
        total = len(batch) * self.fixed
        if self.per_position:
            layouts = self.model.prepare(images=[e.images for e in batch], prompts=[e.prompt for e in batch]).layouts
            width = resolve_batch(self.capture.selector, layouts).shape[1]
            total += len(batch) * width * self.per_position
        return total

    def _measure(self, example: rows.Example) -> None:
        values, _, _ = rows.run(self.model, self.capture, [example], self.dtype, "no shard was written yet")
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.fixed = itemsize * sum(v[0].numel() for h, v in values.items() if h not in self.capture.padded)
        self.per_position = itemsize * sum(v[0, 0].numel() for h, v in values.items() if h in self.capture.padded)


def cut_shards(plan: ExtractionPlan, measure: Callable[[list[rows.Example]], int] | None = None
               ) -> Iterator[list[rows.Example]]:
    """Yield each shard's examples, cut by the one rule every executor follows (so that stores are
    byte-identical whatever executed them): batches never straddle shards, and a shard closes after
    the batch that brings it to ``plan.shard_size`` examples or ``plan.max_shard_bytes`` bytes.

    Args:
        plan: the extraction (its examples are iterated).
        measure: the bytes a batch adds to a :class:`~lvlm_probe.store.rows.ShardBuffer`
            (``buffer.nbytes``); called on every full batch (``batch_size`` examples, or the rest
            of a shard), not on the dataset's shorter last one. Default: a :class:`BatchSizer`,
            which does not run the batches (for executors that run them elsewhere).
    """
    measure = measure or BatchSizer(plan.model, plan.capture, plan.dtype)
    shard: list[rows.Example] = []
    batch: list[rows.Example] = []
    nbytes = 0
    for example in plan.examples:
        batch.append(example)
        if len(batch) == min(plan.batch_size, plan.shard_size - len(shard)):
            shard += batch
            nbytes += measure(batch)
            batch = []
            if len(shard) >= plan.shard_size or nbytes >= plan.max_shard_bytes:
                yield shard
                shard, nbytes = [], 0
    shard += batch
    if shard:
        yield shard


executors: Registry[Executor] = Registry(Executor)
"""The extraction executors by name; ``"local"`` is registered here, ``"ray"`` by :mod:`lvlm_probe.distributed`."""
executors.register(LocalExecutor())
