"""Extraction with Ray: shards are extracted by Ray actors and committed in order by the driver.

:class:`RayExecutor` is the store's :class:`~lvlm_probe.store.executor.Executor` named ``"ray"``;
it uses the store's public executor, writer and row functions and none of its private names.

The driver reads the dataset, cuts it into exactly the shards a local extraction writes (the same
batches, the same ``shard_size`` and ``max_shard_bytes`` rule:
:func:`~lvlm_probe.store.executor.cut_shards`), and hands them to a pool of
:class:`ShardWorker` actors (``ray.util.ActorPool``), one per GPU (or per ``ray_resources``
slot). An actor loads the model once, from where :func:`lvlm_probe.load` read it, keeps it for
its lifetime, and for each shard runs its batches and writes the tensor file and manifest under
temporary names next to their final ones (:func:`~lvlm_probe.store.writer.stage_shard`). The
driver renames them into place in shard order (:meth:`~lvlm_probe.store.writer.ShardWriter.commit`),
as a local run writes them, so the store on disk is always a valid prefix and the finished store
is byte-identical to a local one. An actor whose process dies is restarted by Ray (it loads the model
again) and its shard retried (``max_restarts``, ``max_task_retries``); the dead process's
half-written temporaries are deleted at the end, so no example is stored twice.

Actors rather than tasks: Ray does not reuse a GPU task's worker process (its ``max_calls`` is 1),
so tasks would load the model once per shard.
"""
from __future__ import annotations

from typing import Any

from ..devices import resolve_dtype
from ..errors import InputError, LVLMProbeError, StoreError
from ..store import rows
from ..store.executor import Executor, ExtractionPlan, cut_shards
from ..store.fingerprints import fingerprint
from ..store.writer import ShardWriter, StagedShard, stage_shard
from .options import RayOptions
from .runtime import default_resources, n_workers, runtime_env, task_error

MAX_RETRIES = 3  # restarts of a worker that dies (out of memory, preempted node, kill -9)


class RayExecutor(RayOptions, Executor):
    """``lp.extract(..., backend="ray", ray_address=..., ray_resources=..., ray_load=...)``.

    Options:
        ray_address: the Ray cluster; None uses the running session or starts a local one.
        ray_resources: each worker's Ray resources (default :func:`~lvlm_probe.distributed.runtime.default_resources`).
        ray_load: :func:`lvlm_probe.load` keywords for the workers that replace the driver's.
    """

    name = "ray"
    options = ("ray_address", "ray_resources", "ray_load")

    def check(self, options: dict[str, Any]) -> None:
        super().check(options)
        load = options.get("ray_load")
        if load is not None and not isinstance(load, dict):
            raise self.refuse("ray_load", load, self.name)

    def refuse(self, option: str, value: Any, backend: str) -> LVLMProbeError:
        if option == "ray_load":
            return InputError(f"ray_load must be a dict of lp.load keywords, with backend='ray'; got "
                              f"ray_load={value!r}, backend={backend!r}")
        return super().refuse(option, value, backend)

    def run(self, plan: ExtractionPlan, writer: ShardWriter) -> None:
        """Extract the plan's examples with Ray actors; called by :func:`lvlm_probe.extract`
        under the store's lock.

        Raises:
            InputError: a model that was not loaded from a folder or hub id (workers cannot load it).
            StoreError: a worker that loaded a different model, or workers that could not start
                (the model does not load on a worker) or died on every retry.
            The library errors a worker raises (bad rows, selectors) are raised as they are.
        """
        model = plan.model
        spec = getattr(model, "source", None)
        if spec is None:
            raise InputError(
                "backend='ray' loads the model in every worker from where lp.load read it, but this "
                f"{type(model).__name__} was built in memory; save it with model.save_pretrained(dir) "
                "and pass lp.load(dir)"
            )
        load = plan.options.get("ray_load")
        if load:
            spec = spec.replace(**load)
        with self.session(plan.options) as ray:
            from ray.util import ActorPool

            # one GPU per worker when the cluster has GPUs, even if the driver holds the model on CPU
            resources = dict(plan.options.get("ray_resources") or default_resources(ray))

            worker = ray.remote(ShardWorker).options(
                max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES,
                runtime_env=runtime_env(resources.get("num_cpus", 1)), **resources)
            n = n_workers(ray, resources)
            actors: list[Any] = []
            pool = ActorPool([])
            finished: dict[int, StagedShard] = {}
            outstanding = 0
            k, start = writer.index, writer.start
            try:
                for shard in cut_shards(plan):
                    if len(actors) < n:  # workers start as work arrives: a short dataset starts few
                        actors.append(worker.remote(spec))
                        pool.push(actors[-1])
                    pool.submit(lambda actor, job: actor.extract.remote(*job),
                                (writer.header, plan.selector, shard, k, start, plan.batch_size, str(writer.root)))
                    outstanding += 1
                    k, start = k + 1, start + len(shard)
                    # two shards per worker in flight keep the workers busy and bound the driver's memory
                    while outstanding >= 2 * n:
                        _collect(ray, pool, finished, writer, plan)
                        outstanding -= 1
                while outstanding:
                    _collect(ray, pool, finished, writer, plan)
                    outstanding -= 1
            finally:
                for actor in actors:  # frees their GPUs; stops unfinished shards after an error
                    ray.kill(actor)
        writer.remove_leftovers()  # temporaries of workers that died


def _collect(ray: Any, pool: Any, finished: dict[int, StagedShard], writer: ShardWriter,
             plan: ExtractionPlan) -> None:
    """Wait for one shard, then commit every shard that is next in order."""
    try:
        staged = pool.get_next_unordered()
    except ray.exceptions.RayTaskError as err:
        raise task_error(ray, err) from err
    except ray.exceptions.RayError as err:
        raise StoreError(
            f"a Ray worker could not load the model or died {MAX_RETRIES + 1} times extracting a shard "
            f"({type(err).__name__}: {err}); {writer.done()}; rerun the same extract() to resume"
        ) from err
    finished[staged.record.index] = staged
    while writer.index in finished:
        staged = finished.pop(writer.index)
        writer.commit(staged)
        plan.progress(staged.record.n)


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

    def extract(self, header: dict[str, Any], selector: Any, examples: list[rows.Example], k: int,
                start: int, batch_size: int, root: str) -> StagedShard:
        """Extract shard ``k`` and write its files under temporary names.

        Args:
            header: the store header (hooks, reduction, dtype, fingerprint).
            selector: the position selector as the user passed it (``positions=``).
            examples: the shard's examples, in order.
            k, start: the shard's index and the dataset index of its first example.
            batch_size: examples per forward pass.
            root: the store folder (on storage shared with the driver).

        Returns:
            A :class:`~lvlm_probe.store.writer.StagedShard` for the driver to commit.

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
        capture = rows.plan(model, header["hooks"], selector, header["reduce"])
        dtype = resolve_dtype(header["dtype"])
        buffer = rows.ShardBuffer(capture)
        done = f"shard {k} is not written; the shards before it are kept when the driver commits them"
        for i in range(0, len(examples), batch_size):
            rows.add_batch(model, capture, examples[i: i + batch_size], dtype, buffer, header["fingerprint"], done)
        return stage_shard(root, header, buffer, k, start)
