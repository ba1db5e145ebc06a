""":func:`extract`: stream a dataset's activations into an :class:`ActivationStore`, resumably.

It checks the call, opens (or resumes) the store under its lock, and hands the examples after
the complete shards to an executor (:mod:`lvlm_probe.store.executor`), which commits shards
through a :class:`~lvlm_probe.store.writer.ShardWriter`.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import fileio
from ..devices import resolve_dtype
from ..errors import InputError, StoreError
from . import files, rows
from .executor import Executor, ExtractionPlan, executors
from .fingerprints import differences, fingerprint
from .store import ActivationStore, scan
from .writer import ShardWriter

# settings a resumed extraction must share with the store it appends to
_SAME = ("hooks", "padded", "positions", "reduce", "dtype")


def extract(
    model: Any,
    dataset: Iterable[Any],
    hooks: str | list[str],
    *,
    out: str | Path,
    positions: Any = "image",
    reduce: str = "mean",
    batch_size: int = 8,
    shard_size: int = 256,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = 1 << 30,
    progress: bool = True,
    overwrite: bool = False,
    backend: str | Executor = "local",
    ray_address: str | None = None,
    ray_resources: dict[str, float] | None = None,
    ray_load: dict[str, Any] | None = None,
) -> ActivationStore:
    """Run a model over a dataset and stream the hooks' activations to a store on disk.

    Memory stays bounded by one shard: each batch's values move to the CPU, a shard is written as
    soon as it holds ``shard_size`` examples or ``max_shard_bytes`` bytes, and nothing is kept
    across shards. Rerunning the same call after an interruption (an exception, a full disk,
    ``kill -9``) resumes after the last complete shard: no example is written twice or skipped.

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        dataset: a sequence or iterable of mappings ``{"id", "image", "prompt", <label columns>}``
            (``image``: a PIL image, a list of images, or None / absent for a text-only example),
            or of objects with ``to_dict()`` giving one (ShapesWorld questions). Ids are unique
            strings or integers.
        hooks: hook names or ``*`` patterns (see ``model.hook_names()``).
        out: the store folder (created; an existing store is resumed).
        positions: a position selector (see :mod:`lvlm_probe.hooks.selectors`).
        reduce: ``"mean"``, ``"last"`` or ``"none"`` (keep the positions, padded per example).
        batch_size: examples per forward pass.
        shard_size: examples per shard file.
        dtype: stored dtype (cast on the CPU); default the model's dtype.
        max_shard_bytes: write a shard early once its tensors reach this size.
        progress: show a progress bar.
        overwrite: delete an existing store at ``out`` first instead of resuming it.
        backend: ``"local"`` (this process) or ``"ray"``: shards are extracted by Ray actors
            that each load the model once (see :mod:`lvlm_probe.distributed`); the store is
            byte-identical to a local one. ``out`` must be on storage every worker sees. Any
            name registered in :data:`lvlm_probe.store.executor.executors`, or an
            :class:`~lvlm_probe.store.executor.Executor` object (see that module).
        ray_address: the Ray cluster to use (``"auto"``, ``"ray://host:10001"``); None uses the
            running Ray session, or starts a local one for this call.
        ray_resources: Ray resources of each worker, default ``{"num_gpus": 1}`` on a cluster
            with GPUs, else one worker per node with all of its CPUs.
        ray_load: :func:`lvlm_probe.load` keywords for the workers that replace the driver's,
            e.g. ``{"device_map": "auto", "max_memory": None}`` when the driver holds the model
            on CPU and disk but each worker has GPUs (the fingerprints must still match).

    Returns:
        The :class:`ActivationStore`.

    Raises:
        HookNameError: an unknown hook, before anything is written.
        InputError: a bad selector, reduction, size or dataset row (with its index and id), or
            an unknown backend (the message lists the registered ones) or Ray option.
        LayoutError: a selector that selects nothing in some example (with its index and id).
        StoreError: ``out`` is not a store, the store was written with other settings, another
            model, or for other examples, or a write failed (a full disk says so). Complete
            shards stay intact and the same call resumes.
        MissingDependencyError: ``backend="ray"`` without Ray installed.

    Example:
        >>> qs = lp.worlds.ShapesWorld(seed=0).questions(200, level="attribute", split="typical")
        >>> store = lp.extract(model, qs, hooks=["blocks.*.hook_resid_post"], positions="image",
        ...                    reduce="mean", out="acts/", dtype=torch.float16)
        >>> store["blocks.1.hook_resid_post"].shape       # [200, d_model]
    """
    executor = executors.resolve(backend)
    options = executors.check(executor, {"ray_address": ray_address, "ray_resources": ray_resources,
                                         "ray_load": ray_load})
    plan = rows.plan(model, hooks, positions, reduce)
    dtype = resolve_dtype(dtype, default=model.dtype)
    if not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating-point type, got {dtype}")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size), ("max_shard_bytes", max_shard_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    total = len(dataset) if hasattr(dataset, "__len__") else None
    if total == 0:
        raise InputError("the dataset is empty; expected at least one example")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise StoreError(f"out={str(root)!r} is a file; expected a folder for the store")
    if root.is_dir() and not _is_store(root):
        raise StoreError(
            f"out={str(root)!r} is a non-empty folder that is not an activation store (no "
            f"{files.HEADER}); choose an empty or new folder"
        )
    root.mkdir(parents=True, exist_ok=True)
    header = {
        "format": files.FORMAT, "version": files.VERSION, "hooks": plan.names, "padded": plan.padded,
        "positions": plan.label, "reduce": reduce, "dtype": str(dtype).removeprefix("torch."),
        "fingerprint": fingerprint(model), "model": f"{type(model.hf).__name__} (family {model.family.name})",
        "shard_size": shard_size, "batch_size": batch_size, "max_shard_bytes": max_shard_bytes,
        "complete": False, "n_examples": None, "shapes": None,
    }
    with files.writer_lock(root):
        _prepare(root, overwrite)
        state = scan(root, verify=True)
        for path in state.leftovers:
            path.unlink(missing_ok=True)
        stored_ids: list[Any] = []
        if state.records:
            stored = files.read_json(root / files.HEADER)  # written before shard 0: missing means damage
            _check_same(root, stored, header)
            stored_ids = ActivationStore(root, stored, state.records).ids
        writer = ShardWriter(root, header, state)
        examples = rows.Examples(dataset, stored_ids, root)
        bar = tqdm(total=total, initial=len(stored_ids), disable=not progress, unit="ex",
                   desc=f"extract {root.name}")
        try:
            executor.run(ExtractionPlan(model=model, examples=examples, capture=plan, selector=positions,
                                        dtype=dtype, batch_size=batch_size, shard_size=shard_size,
                                        max_shard_bytes=max_shard_bytes, options=options,
                                        progress=bar.update), writer)
        finally:
            bar.close()
        n = examples.n
        backend_name = executor.name or type(executor).__name__
        if n is None:
            raise StoreError(f"backend {backend_name!r} returned before reading the dataset to its end; "
                             f"{writer.done()}; rerun to resume")
        if n == 0:
            raise InputError("the dataset is empty; expected at least one example")
        if writer.start != n:
            raise StoreError(f"backend {backend_name!r} committed {writer.start} of the dataset's {n} "
                             f"examples to {root}; {writer.done()}; rerun to resume")
        header.update(complete=True, n_examples=n, shapes={k: list(v) for k, v in writer.shapes.items()})
        files.write_json(root / files.HEADER, header, "the store header")
    return ActivationStore.open(root, verify=False)


def _is_store(root: Path) -> bool:
    """Whether a folder holds a store, or only what an extraction killed before its first shard
    leaves (the sub-folders, the lock, a temporary header)."""
    own = {files.HEADER, files.LOCK, files.SHARDS, files.MANIFEST}
    return (root / files.HEADER).exists() or all(p.name in own or fileio.is_temporary(p.name) for p in root.iterdir())


def _prepare(root: Path, overwrite: bool) -> None:
    """Clear a store to overwrite (under the lock) and create the sub-folders."""
    if overwrite and (root / files.HEADER).exists():
        for name in (files.SHARDS, files.MANIFEST):
            shutil.rmtree(root / name, ignore_errors=True)
        (root / files.HEADER).unlink()
    for name in (files.SHARDS, files.MANIFEST):
        (root / name).mkdir(parents=True, exist_ok=True)


def _check_same(root: Path, stored: dict[str, Any], header: dict[str, Any]) -> None:
    """Raise unless a rerun's settings and model match the store it would append to."""
    diffs = [f"{k}: the store has {stored.get(k)!r}, this call {header[k]!r}"
             for k in _SAME if stored.get(k) != header[k]]
    old, new = stored.get("fingerprint", {}), header["fingerprint"]
    if old.get("digest") != new["digest"]:
        diffs.append(f"model fingerprint: the store has {old.get('digest')} ({stored.get('model')}), "
                     f"this model {new['digest']} ({header['model']}); differing parts "
                     f"{differences(old, new)}")
    if diffs:
        raise StoreError(
            f"cannot resume the extraction into {root}: " + "; ".join(diffs)
            + ". Rerun with the store's settings and model, or pass another out= or overwrite=True"
        )
