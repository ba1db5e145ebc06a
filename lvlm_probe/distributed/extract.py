"""Extraction with Ray: shards are extracted by Ray actors and committed in order by the driver.

The driver reads the dataset, cuts it into exactly the shards a local extraction writes (the same
batches, the same ``shard_size`` and ``max_shard_bytes`` rule), and hands them to a pool of
:class:`ShardWorker` actors (``ray.util.ActorPool``), one per GPU (or per ``ray_resources``
slot). An actor loads the model once, from where :func:`lvlm_probe.load` read it, keeps it for
its lifetime, and for each shard runs its batches and writes the tensor file and manifest under
temporary names next to their final ones. The driver renames them into place in shard order, as a
local run writes them, so the store on disk is always a valid prefix and the finished store is
byte-identical to a local one. An actor whose process dies is restarted by Ray (it loads the model
again) and its shard retried (``max_restarts``, ``max_task_retries``); the dead process's
half-written temporaries are deleted at the end, so no example is stored twice.

Actors rather than tasks: Ray does not reuse a GPU task's worker process (its ``max_calls`` is 1),
so tasks would load the model once per shard.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..devices import resolve_dtype
from ..errors import InputError, StoreError
from ..hooks import positions as P
from ..store import files as F
from ..store import manifest as M
from ..store import rows as R
from ..store.extract import Examples, add_batch, encode_shard
from ..store.fingerprints import fingerprint
from ..store.store import scan
from .runtime import default_resources, n_workers, runtime_env, session, task_error

MAX_RETRIES = 3  # restarts of a worker that dies (out of memory, preempted node, kill -9)


@dataclass(frozen=True)
class Written:
    """What a worker wrote: the shard's record, per-example shapes and its two temporary files."""

    record: M.ShardRecord
    shapes: dict[str, tuple[int, ...]]
    tensors: Path
    manifest: Path


def extract_ray(model: Any, dataset: Any, plan: R.Plan, positions: Any, dtype: torch.dtype, writer: Any,
                stored_ids: list[Any], bar: Any, *, address: str | None,
                resources: dict[str, Any] | None, load: dict[str, Any] | None = None,
                batch_size: int, shard_size: int, max_shard_bytes: int) -> int:
    """Extract the examples after ``stored_ids`` with Ray actors; called by
    :func:`lvlm_probe.extract` under the store's lock.

    Returns:
        The number of examples in the dataset.

    Raises:
        InputError: a model that was not loaded from a folder or hub id (workers cannot load it).
        StoreError: a worker that loaded a different model, or workers that could not start
            (the model does not load on a worker) or died on every retry.
        The library errors a worker raises (bad rows, selectors) are raised as they are.
    """
    spec = getattr(model, "source", None)
    if spec is None:
        raise InputError(
            "backend='ray' loads the model in every worker from where lp.load read it, but this "
            f"{type(model).__name__} was built in memory; save it with model.save_pretrained(dir) "
            "and pass lp.load(dir)"
        )
    if load:
        spec = spec.replace(**load)
    examples = Examples(dataset, stored_ids, writer.root)
    sizer = _Sizer(model, plan, dtype)
    with session(address) as ray:
        from ray.util import ActorPool

        # one GPU per worker when the cluster has GPUs, even if the driver holds the model on CPU
        resources = dict(resources or default_resources(ray))

        worker = ray.remote(ShardWorker).options(
            max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES,
            runtime_env=runtime_env(resources.get("num_cpus", 1)), **resources)
        n = n_workers(ray, resources)
        actors: list[Any] = []
        pool = ActorPool([])
        finished: dict[int, Written] = {}
        outstanding = 0
        k, start = writer.index, writer.start
        try:
            for shard in _shards(examples, sizer, batch_size, shard_size, max_shard_bytes):
                if len(actors) < n:  # workers start as work arrives: a short dataset starts few
                    actors.append(worker.remote(spec))
                    pool.push(actors[-1])
                pool.submit(lambda actor, job: actor.extract.remote(*job),
                            (writer.header, positions, shard, k, start, batch_size, str(writer.root)))
                outstanding += 1
                k, start = k + 1, start + len(shard)
                # two shards per worker in flight keep the workers busy and bound the driver's memory
                while outstanding >= 2 * n:
                    _collect(ray, pool, finished, writer, bar)
                    outstanding -= 1
            while outstanding:
                _collect(ray, pool, finished, writer, bar)
                outstanding -= 1
        finally:
            for actor in actors:  # frees their GPUs; stops unfinished shards after an error
                ray.kill(actor)
    for path in scan(writer.root, verify=False).leftovers:  # temporaries of workers that died
        path.unlink(missing_ok=True)
    return examples.n


def _collect(ray: Any, pool: Any, finished: dict[int, Written], writer: Any, bar: Any) -> None:
    """Wait for one shard, then commit every shard that is next in order."""
    try:
        written = pool.get_next_unordered()
    except ray.exceptions.RayTaskError as err:
        raise task_error(ray, err) from err
    except ray.exceptions.RayError as err:
        raise StoreError(
            f"a Ray worker could not load the model or died {MAX_RETRIES + 1} times extracting a shard "
            f"({type(err).__name__}: {err}); {writer.done()}; rerun the same extract() to resume"
        ) from err
    finished[written.record.index] = written
    while writer.index in finished:
        written = finished.pop(writer.index)
        writer.check(written.shapes)
        writer.commit(written.record, written.tensors, written.manifest)
        bar.update(written.record.n)


def _shards(examples: Examples, sizer: _Sizer, batch_size: int, shard_size: int, max_shard_bytes: int):
    """Yield each shard's examples, cut where a local extraction cuts them (see ``_stream`` in
    :mod:`lvlm_probe.store.extract`: batches never straddle shards, and a shard closes after the
    batch that brings it to ``shard_size`` examples or ``max_shard_bytes`` bytes)."""
    shard: list[R.Example] = []
    batch: list[R.Example] = []
    nbytes = 0
    for example in examples:
        batch.append(example)
        if len(batch) == min(batch_size, shard_size - len(shard)):
            shard += batch
            nbytes += sizer(batch)
            batch = []
            if len(shard) >= shard_size or nbytes >= max_shard_bytes:
                yield shard
                shard, nbytes = [], 0
    shard += batch
    if shard:
        yield shard


class _Sizer:
    """The bytes a batch adds to a shard buffer, counted as ``ShardBuffer.nbytes`` counts them,
    without running the batch: per example for reduced and whole hooks, per example and kept
    position for padded ones (a batch is padded to its widest example)."""

    def __init__(self, model: Any, plan: R.Plan, dtype: torch.dtype):
        self.model, self.plan, self.dtype = model, plan, dtype
        self.fixed: int | None = None
        self.per_position = 0

    def __call__(self, batch: list[R.Example]) -> int:
        if self.fixed is None:
            self._measure(batch[0])
        total = len(batch) * self.fixed
        if self.per_position:
            layouts = self.model.prepare(images=[e.images for e in batch], prompts=[e.prompt for e in batch]).layouts
            width = P.resolve_batch(self.plan.selector, layouts).shape[1]
            total += len(batch) * width * self.per_position
        return total

    def _measure(self, example: R.Example) -> None:
        # one example through the driver's model gives every hook's size in the store's dtype
        values, _, _ = R.run(self.model, self.plan, [example], self.dtype, "no shard was written yet")
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.fixed = itemsize * sum(v[0].numel() for h, v in values.items() if h not in self.plan.padded)
        self.per_position = itemsize * sum(v[0, 0].numel() for h, v in values.items() if h in self.plan.padded)


# --- the worker ------------------------------------------------------------------------------------
class ShardWorker:
    """Ray actor: holds one model for its lifetime and extracts shards into the store's folder.

    Args:
        spec: the :class:`~lvlm_probe.model.LoadSpec` of the driver's model (with ``ray_load``
            applied); the model goes to the actor's GPU when it has one.
    """

    def __init__(self, spec: Any):
        import ray

        self.spec = spec
        self.model = spec.load(device="cuda" if ray.get_gpu_ids() else "cpu")
        self.digest = fingerprint(self.model)["digest"]

    def extract(self, header: dict[str, Any], positions: Any, examples: list[R.Example], k: int,
                start: int, batch_size: int, root: str) -> Written:
        """Extract shard ``k`` and write its files under temporary names.

        Args:
            header: the store header (hooks, reduction, dtype, fingerprint).
            positions: the position selector as the user passed it.
            examples: the shard's examples, in order.
            k, start: the shard's index and the dataset index of its first example.
            batch_size: examples per forward pass.
            root: the store folder (on storage shared with the driver).

        Returns:
            A :class:`Written` for the driver to commit.

        Raises:
            StoreError: the actor's model is not the driver's (by fingerprint).
        """
        if self.digest != header["fingerprint"]["digest"]:
            raise StoreError(
                f"a Ray worker loaded {self.spec.name_or_path!r} with fingerprint {self.digest}, but "
                f"the store is written for a model with fingerprint {header['fingerprint']['digest']}; "
                "the driver's model must be what lp.load reads from that path (unchanged after "
                "loading), and ray_load must not change the weights or dtype"
            )
        model = self.model
        plan = R.plan(model, header["hooks"], positions, header["reduce"])
        dtype = resolve_dtype(header["dtype"])
        buffer = R.ShardBuffer(plan)
        done = f"shard {k} is not written; the shards before it are kept when the driver commits them"
        for i in range(0, len(examples), batch_size):
            add_batch(model, plan, examples[i: i + batch_size], dtype, buffer, header["fingerprint"], done)
        encoded = encode_shard(header, buffer, k, start)
        folder = Path(root)
        tensors = F.write_temporary(folder / F.SHARDS / encoded.record.file, encoded.data, f"shard {k} (tensors)")
        manifest = F.write_temporary(folder / F.MANIFEST / F.shard_name(k, "parquet"), encoded.manifest,
                                     f"shard {k} (manifest)")
        return Written(encoded.record, encoded.shapes, tensors, manifest)
