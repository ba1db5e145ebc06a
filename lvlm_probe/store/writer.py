"""The store's writer: how a filled shard buffer becomes a committed shard.

A shard is committed by writing its tensor file and then its manifest (the commit record), each
atomically, in shard order (see :mod:`lvlm_probe.store` for the format). Executors
(:mod:`lvlm_probe.store.executor`) hand shards to a :class:`ShardWriter` in one of two ways:

* :meth:`ShardWriter.write` a :class:`~lvlm_probe.store.rows.ShardBuffer` filled in this process;
* :func:`stage_shard` a buffer in another process (a worker), writing the shard's two files under
  temporary names in the store's folder, and :meth:`ShardWriter.commit` the returned
  :class:`StagedShard` in the extracting process, which renames them into place.

Both give the same files, byte for byte: a shard's bytes depend only on its examples' values and
rows, its index and the dataset index of its first example.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch

from ..errors import StoreError
from . import files, manifest
from .rows import ShardBuffer
from .store import Scan, open_shard, scan


@dataclass(frozen=True)
class EncodedShard:
    """One shard serialised: its record, tensor-file bytes, manifest bytes and the per-example
    shape of each hook (``-1`` for a padded positions axis)."""

    record: manifest.ShardRecord
    data: bytes
    manifest: bytes
    shapes: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class StagedShard:
    """A shard written under temporary names by :func:`stage_shard`, for :meth:`ShardWriter.commit`.

    Attributes:
        record: the shard's record (index, start, size, checksum).
        shapes: the per-example shape of each hook.
        tensors: the temporary tensor file.
        manifest: the temporary manifest file.
    """

    record: manifest.ShardRecord
    shapes: dict[str, tuple[int, ...]]
    tensors: Path
    manifest: Path


def example_shape(header: dict[str, Any], hook: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A hook's per-example shape from a shard tensor's shape (the padded axis as ``-1``)."""
    rest = shape[1:]
    return (-1, *rest[1:]) if hook in header["padded"] else rest


def encode_shard(header: dict[str, Any], buffer: ShardBuffer, index: int, start: int) -> EncodedShard:
    """Serialise a filled buffer as shard ``index`` starting at dataset index ``start``.

    Consumes the buffer's values (see :meth:`~lvlm_probe.store.rows.ShardBuffer.tensors`).

    Raises:
        InputError: label columns Parquet cannot store (before anything is written).
    """
    tensors = buffer.tensors()
    shapes = {h: example_shape(header, h, tuple(tensors[h].shape)) for h in header["hooks"]}
    # one metadata key: safetensors orders several keys at random, and equal shards should be
    # equal files (a resumed store is then byte-identical to an uninterrupted one)
    data = safetensors.torch.save(tensors, metadata={
        "lvlm_probe": json.dumps({"format": files.FORMAT, "shard": index, "start": start})})
    del tensors  # the serialised bytes are all that is needed now
    record = manifest.ShardRecord(index, start, len(buffer), files.shard_name(index, "safetensors"), len(data),
                                  files.checksum(data))
    rows = [{"id": row["id"], "shard": index, "row": j, **{c: v for c, v in row.items() if c != "id"}}
            for j, row in enumerate(buffer.rows)]
    return EncodedShard(record, data, manifest.encode(rows, record), shapes)


def stage_shard(root: str | Path, header: dict[str, Any], buffer: ShardBuffer, index: int,
                start: int) -> StagedShard:
    """Encode a filled buffer as shard ``index`` and write its two files under temporary names
    next to their final ones in the store ``root`` (a store scan skips them, a rerun deletes them),
    for the extracting process to :meth:`ShardWriter.commit`.

    Args:
        root: the store folder (on storage shared with the extracting process).
        header: the store header (:attr:`ShardWriter.header`).
        buffer: the shard's values and rows.
        index, start: the shard's index and the dataset index of its first example.

    Raises:
        InputError: label columns Parquet cannot store.
        StoreError: a failed write (a full disk says so).
    """
    encoded = encode_shard(header, buffer, index, start)
    folder = Path(root)
    tensors = files.write_temporary(folder / files.SHARDS / encoded.record.file, encoded.data,
                                    f"shard {index} (tensors)")
    staged_manifest = files.write_temporary(folder / files.MANIFEST / files.shard_name(index, "parquet"),
                                            encoded.manifest, f"shard {index} (manifest)")
    return StagedShard(encoded.record, encoded.shapes, tensors, staged_manifest)


class ShardWriter:
    """Commits shards to a store in order: tensors first, then the manifest that commits them.

    Made by :func:`lvlm_probe.extract` (under the store's lock) and handed to the executor.

    Attributes:
        root: the store folder.
        header: the store header (hooks, padded hooks, reduction, dtype, model fingerprint).
        index: the index of the next shard to commit.
        start: the dataset index of the next shard's first example.
        shapes: the per-example shape of each hook in the shards so far.
    """

    def __init__(self, root: Path, header: dict[str, Any], state: Scan):
        self.root, self.header = root, header
        self.index, self.start = len(state.records), state.n_examples
        self.shapes: dict[str, tuple[int, ...]] = {}
        if state.records:
            first = root / files.SHARDS / state.records[0].file
            with open_shard(first, 0) as f:
                self.shapes = {h: example_shape(header, h, tuple(f.get_slice(h).get_shape()))
                               for h in header["hooks"]}

    def done(self) -> str:
        """What is safely written so far, for error messages."""
        if not self.index:
            return "no shard was complete yet"
        return f"shards 0..{self.index - 1} ({self.start} examples) are complete and kept"

    def _check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise unless the next shard's per-example shapes match the earlier shards'."""
        for hook in self.header["hooks"]:
            if self.shapes.setdefault(hook, shapes[hook]) != shapes[hook]:
                raise StoreError(
                    f"{hook} has per-example shape {shapes[hook]} in shard {self.index} but "
                    f"{self.shapes[hook]} in earlier shards (whole vision values differ with dynamic "
                    f"image sizes); {self.done()}"
                )

    def write(self, buffer: ShardBuffer) -> None:
        """Encode a filled buffer as the next shard and commit it.

        Raises:
            InputError: label columns Parquet cannot store.
            StoreError: per-example shapes that differ from earlier shards', or a failed write;
                the earlier shards stay complete.
        """
        encoded = encode_shard(self.header, buffer, self.index, self.start)
        self._check(encoded.shapes)
        k = self.index
        if k == 0:  # the header goes first, so every shard on disk has one
            files.write_json(self.root / files.HEADER, self.header, "the store header")
        tensor_path = self.root / files.SHARDS / encoded.record.file
        files.atomic_write(tensor_path, encoded.data, f"shard {k} (tensors; {self.done()})")
        try:
            files.atomic_write(self.root / files.MANIFEST / files.shard_name(k, "parquet"), encoded.manifest,
                               f"shard {k} (manifest; {self.done()})")
        except BaseException:
            tensor_path.unlink(missing_ok=True)  # uncommitted: a rerun writes this shard again
            raise
        self.index, self.start = k + 1, self.start + encoded.record.n

    def commit(self, staged: StagedShard) -> None:
        """Rename a shard's temporary files, written by :func:`stage_shard` (in a worker), into
        place in the order :meth:`write` uses: header before shard 0, tensor file, then the
        manifest that completes the shard.

        Raises:
            StoreError: a shard out of order (it must be shard :attr:`index` starting at
                :attr:`start`), per-example shapes that differ from earlier shards', or a failed
                rename.
        """
        self._check(staged.shapes)
        record = staged.record
        k = self.index
        if (record.index, record.start) != (k, self.start):
            raise StoreError(f"internal: shard {record.index} starting at {record.start} arrived "
                             f"for position {k} starting at {self.start}")
        if k == 0:
            files.write_json(self.root / files.HEADER, self.header, "the store header")
        tensor_path = self.root / files.SHARDS / record.file
        try:
            files.commit(staged.tensors, tensor_path, f"shard {k} (tensors; {self.done()})")
            files.commit(staged.manifest, self.root / files.MANIFEST / files.shard_name(k, "parquet"),
                         f"shard {k} (manifest; {self.done()})")
        except BaseException:
            tensor_path.unlink(missing_ok=True)  # uncommitted: a rerun writes this shard again
            staged.manifest.unlink(missing_ok=True)
            raise
        self.index, self.start = k + 1, self.start + record.n

    def remove_leftovers(self) -> None:
        """Delete temporary files in the store that no commit will rename (those of workers that
        died, or of shards staged but never committed)."""
        for path in scan(self.root, verify=False).leftovers:
            path.unlink(missing_ok=True)
