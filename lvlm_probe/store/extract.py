""":func:`extract`: stream a dataset's activations into an :class:`ActivationStore`, resumably."""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from tqdm.auto import tqdm

from .. import fileio
from ..devices import resolve_dtype
from ..errors import InputError, StoreError
from . import files as F
from . import manifest as M
from . import rows as R
from .fingerprints import differences, fingerprint
from .store import ActivationStore, open_shard, scan

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
    backend: str = "local",
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
        positions: a position selector (see :mod:`lvlm_probe.hooks.positions`).
        reduce: ``"mean"``, ``"last"`` or ``"none"`` (keep the positions, padded per example).
        batch_size: examples per forward pass.
        shard_size: examples per shard file.
        dtype: stored dtype (cast on the CPU); default the model's dtype.
        max_shard_bytes: write a shard early once its tensors reach this size.
        progress: show a progress bar.
        overwrite: delete an existing store at ``out`` first instead of resuming it.
        backend: ``"local"`` (this process) or ``"ray"``: shards are extracted by Ray actors
            that each load the model once (see :mod:`lvlm_probe.distributed`); the store is
            byte-identical to a local one. ``out`` must be on storage every worker sees.
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
            an unknown backend or Ray option.
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
    from ..distributed.options import check_backend  # no Ray import: options are plain Python

    check_backend(backend, ray_address, ray_resources)
    if ray_load is not None and (backend != "ray" or not isinstance(ray_load, dict)):
        raise InputError(f"ray_load must be a dict of lp.load keywords, with backend='ray'; got "
                         f"ray_load={ray_load!r}, backend={backend!r}")
    plan = R.plan(model, hooks, positions, reduce)
    dtype = resolve_dtype(dtype) if dtype is not None else model.dtype
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
            f"{F.HEADER}); choose an empty or new folder"
        )
    root.mkdir(parents=True, exist_ok=True)
    header = {
        "format": F.FORMAT, "version": F.VERSION, "hooks": plan.names, "padded": plan.padded,
        "positions": plan.label, "reduce": reduce, "dtype": str(dtype).removeprefix("torch."),
        "fingerprint": fingerprint(model), "model": f"{type(model.hf).__name__} (family {model.family.name})",
        "shard_size": shard_size, "batch_size": batch_size, "max_shard_bytes": max_shard_bytes,
        "complete": False, "n_examples": None, "shapes": None,
    }
    with F.writer_lock(root):
        _prepare(root, overwrite)
        state = scan(root, verify=True)
        for path in state.leftovers:
            path.unlink(missing_ok=True)
        stored_ids: list[Any] = []
        if state.records:
            stored = F.read_json(root / F.HEADER)  # written before shard 0: missing means damage
            _check_same(root, stored, header)
            stored_ids = ActivationStore(root, stored, state.records).ids
        writer = _Writer(root, header, state)
        bar = tqdm(total=total, initial=len(stored_ids), disable=not progress, unit="ex",
                   desc=f"extract {root.name}")
        sizes = dict(batch_size=batch_size, shard_size=shard_size, max_shard_bytes=max_shard_bytes)
        try:
            if backend == "ray":
                from ..distributed.extract import extract_ray

                n = extract_ray(model, dataset, plan, positions, dtype, writer, stored_ids, bar,
                                address=ray_address, resources=ray_resources, load=ray_load, **sizes)
            else:
                n = _stream(model, dataset, plan, dtype, writer, stored_ids, bar, **sizes)
        finally:
            bar.close()
        if n == 0:
            raise InputError("the dataset is empty; expected at least one example")
        header.update(complete=True, n_examples=n, shapes={k: list(v) for k, v in writer.shapes.items()})
        F.write_json(root / F.HEADER, header, "the store header")
    return ActivationStore.open(root, verify=False)


def _is_store(root: Path) -> bool:
    """Whether a folder holds a store, or only what an extraction killed before its first shard
    leaves (the sub-folders, the lock, a temporary header)."""
    own = {F.HEADER, F.LOCK, F.SHARDS, F.MANIFEST}
    return (root / F.HEADER).exists() or all(p.name in own or fileio.is_temporary(p.name) for p in root.iterdir())


def _prepare(root: Path, overwrite: bool) -> None:
    """Clear a store to overwrite (under the lock) and create the sub-folders."""
    if overwrite and (root / F.HEADER).exists():
        for name in (F.SHARDS, F.MANIFEST):
            shutil.rmtree(root / name, ignore_errors=True)
        (root / F.HEADER).unlink()
    for name in (F.SHARDS, F.MANIFEST):
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


class Examples:
    """The dataset's examples after the stored ones, read one at a time.

    Iterating checks that the first ids match the store's (a resumed run must see the same
    dataset), that ids are unique, and yields :class:`~lvlm_probe.store.rows.Example` objects for
    the rest; afterwards :attr:`n` is the dataset's length.
    """

    def __init__(self, dataset: Iterable[Any], stored_ids: list[Any], root: Path):
        self.dataset, self.stored_ids, self.root = dataset, stored_ids, root
        self.n = 0

    def __iter__(self):
        seen: dict[Any, int] = {}
        stored = self.stored_ids
        index = -1
        for index, item in enumerate(self.dataset):
            if index < len(stored):
                ident = R.example_id(item, index)
                if ident != stored[index]:
                    raise StoreError(
                        f"the dataset does not match the store {self.root}: example {index} has id "
                        f"{ident!r}, the store holds {stored[index]!r} there; rerun with the same "
                        "dataset in the same order, or pass another out= or overwrite=True"
                    )
                seen[ident] = index
                continue
            example = R.example(item, index)
            if example.id in seen:
                raise InputError(f"dataset examples {seen[example.id]} and {index} share the id {example.id!r}; ids must be unique")
            seen[example.id] = index
            yield example
        if index + 1 < len(stored):
            raise StoreError(
                f"the dataset has {index + 1} examples but the store {self.root} already holds "
                f"{len(stored)}; rerun with the same dataset, or pass another out= or overwrite=True"
            )
        self.n = index + 1


def _stream(model, dataset, plan, dtype, writer, stored_ids, bar, batch_size, shard_size,
            max_shard_bytes) -> int:
    """Skip the stored examples (checking their ids), then run and write the rest; returns the
    number of examples in the dataset."""
    examples = Examples(dataset, stored_ids, writer.root)
    pending: list[R.Example] = []
    buffer = R.ShardBuffer(plan)
    fp = writer.header["fingerprint"]
    for example in examples:
        pending.append(example)
        if len(pending) == min(batch_size, shard_size - len(buffer)):
            add_batch(model, plan, pending, dtype, buffer, fp, writer.done())
            bar.update(len(pending))
            pending = []
            if len(buffer) >= shard_size or buffer.nbytes >= max_shard_bytes:
                writer.write(buffer)
                buffer = R.ShardBuffer(plan)
    if pending:
        add_batch(model, plan, pending, dtype, buffer, fp, writer.done())
        bar.update(len(pending))
    if len(buffer):
        writer.write(buffer)
    return examples.n


def add_batch(model, plan: R.Plan, examples: list[R.Example], dtype: torch.dtype,
              buffer: R.ShardBuffer, fp: dict[str, str], done: str) -> None:
    """Run one batch and add its values and manifest rows to a shard buffer."""
    values, positions, layouts = R.run(model, plan, examples, dtype, done)
    rows = []
    for i, (example, layout) in enumerate(zip(examples, layouts)):
        kept = None if positions is None else int((positions[i] >= 0).sum())
        rows.append({"id": example.id, **example.labels, "n_images": example.n_images,
                     "n_positions": kept, "layout": layout.summary(), "fingerprint": fp["digest"],
                     "processor_fingerprint": fp["processor"]})
    buffer.add(rows, values, positions)


@dataclass(frozen=True)
class Encoded:
    """One shard serialised: its record, tensor-file bytes, manifest bytes and the per-example
    shape of each hook (``-1`` for a padded positions axis)."""

    record: M.ShardRecord
    data: bytes
    manifest: bytes
    shapes: dict[str, tuple[int, ...]]


def example_shape(header: dict[str, Any], hook: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A hook's per-example shape from a shard tensor's shape (the padded axis as ``-1``)."""
    rest = shape[1:]
    return (-1, *rest[1:]) if hook in header["padded"] else rest


def encode_shard(header: dict[str, Any], buffer: R.ShardBuffer, k: int, start: int) -> Encoded:
    """Serialise a filled buffer as shard ``k`` starting at dataset index ``start``.

    Raises:
        InputError: label columns Parquet cannot store (before anything is written).
    """
    tensors = buffer.tensors()
    shapes = {h: example_shape(header, h, tuple(tensors[h].shape)) for h in header["hooks"]}
    # one metadata key: safetensors orders several keys at random, and equal shards should be
    # equal files (a resumed store is then byte-identical to an uninterrupted one)
    data = safetensors.torch.save(tensors, metadata={
        "lvlm_probe": json.dumps({"format": F.FORMAT, "shard": k, "start": start})})
    del tensors  # the serialised bytes are all that is needed now
    record = M.ShardRecord(k, start, len(buffer), F.shard_name(k, "safetensors"), len(data), F.checksum(data))
    rows = [{"id": row["id"], "shard": k, "row": j, **{c: v for c, v in row.items() if c != "id"}}
            for j, row in enumerate(buffer.rows)]
    return Encoded(record, data, M.encode(rows, record), shapes)


class _Writer:
    """Writes shards in order: tensors first, then the manifest that commits them."""

    def __init__(self, root: Path, header: dict[str, Any], state):
        self.root, self.header = root, header
        self.index, self.start = len(state.records), state.n_examples
        self.shapes: dict[str, tuple[int, ...]] = {}
        if state.records:
            first = root / F.SHARDS / state.records[0].file
            with open_shard(first, 0) as f:
                self.shapes = {h: example_shape(header, h, tuple(f.get_slice(h).get_shape()))
                               for h in header["hooks"]}

    def done(self) -> str:
        if not self.index:
            return "no shard was complete yet"
        return f"shards 0..{self.index - 1} ({self.start} examples) are complete and kept"

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise unless the next shard's per-example shapes match the earlier shards'."""
        for hook in self.header["hooks"]:
            if self.shapes.setdefault(hook, shapes[hook]) != shapes[hook]:
                raise StoreError(
                    f"{hook} has per-example shape {shapes[hook]} in shard {self.index} but "
                    f"{self.shapes[hook]} in earlier shards (whole vision values differ with dynamic "
                    f"image sizes); {self.done()}"
                )

    def write(self, buffer: R.ShardBuffer) -> None:
        encoded = encode_shard(self.header, buffer, self.index, self.start)
        self.check(encoded.shapes)
        k = self.index
        if k == 0:  # the header goes first, so every shard on disk has one
            F.write_json(self.root / F.HEADER, self.header, "the store header")
        tensor_path = self.root / F.SHARDS / encoded.record.file
        F.atomic_write(tensor_path, encoded.data, f"shard {k} (tensors; {self.done()})")
        try:
            F.atomic_write(self.root / F.MANIFEST / F.shard_name(k, "parquet"), encoded.manifest,
                           f"shard {k} (manifest; {self.done()})")
        except BaseException:
            tensor_path.unlink(missing_ok=True)  # uncommitted: a rerun writes this shard again
            raise
        self.index, self.start = k + 1, self.start + encoded.record.n

    def commit(self, record: M.ShardRecord, tensors: Path, manifest: Path) -> None:
        """Rename a shard's temporary files, written elsewhere (by a Ray worker), into place in
        the order :meth:`write` uses: header before shard 0, tensor file, then the manifest that
        completes the shard.

        Raises:
            StoreError: a shard out of order (an internal error) or a failed rename.
        """
        k = self.index
        if (record.index, record.start) != (k, self.start):
            raise StoreError(f"internal: shard {record.index} starting at {record.start} arrived "
                             f"for position {k} starting at {self.start}")
        if k == 0:
            F.write_json(self.root / F.HEADER, self.header, "the store header")
        tensor_path = self.root / F.SHARDS / record.file
        try:
            F.commit(tensors, tensor_path, f"shard {k} (tensors; {self.done()})")
            F.commit(manifest, self.root / F.MANIFEST / F.shard_name(k, "parquet"),
                     f"shard {k} (manifest; {self.done()})")
        except BaseException:
            tensor_path.unlink(missing_ok=True)  # uncommitted: a rerun writes this shard again
            manifest.unlink(missing_ok=True)
            raise
        self.index, self.start = k + 1, self.start + record.n
