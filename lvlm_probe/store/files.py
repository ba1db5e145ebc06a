"""File-level primitives of an activation store: names, atomic writes, checksums and the writer lock.

Every file of a store is written atomically through :mod:`lvlm_probe.fileio` (a reader sees either
the old file or the complete new one, never a prefix); a failed write raises :class:`StoreError`
here, saying how to resume when the disk is full.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import fileio
from ..errors import FileWriteError, StoreError

FORMAT = "lvlm_probe.activation_store"
VERSION = 1
HEADER = "store.json"
SHARDS = "shards"
MANIFEST = "manifest"
LOCK = ".lock"
_CHUNK = 64 << 20  # bytes read at a time when checksumming a file
_SHARD = re.compile(r"^shard-(\d{5,})\.(safetensors|parquet)$")


def shard_name(index: int, ext: str) -> str:
    """``shard-00003.safetensors`` / ``shard-00003.parquet``."""
    return f"shard-{index:05d}.{ext}"


def shard_index(name: str) -> tuple[int, str] | None:
    """``(index, extension)`` of a shard file name, or None for any other name."""
    m = _SHARD.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def checksum(data: bytes | memoryview) -> str:
    """The hex sha256 of some bytes."""
    return hashlib.sha256(data).hexdigest()


def file_checksum(path: Path) -> str:
    """The hex sha256 of a file, read in chunks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _store_write() -> Iterator[None]:
    """Re-raise a failed write as a :class:`StoreError` that says how to resume."""
    try:
        yield
    except FileWriteError as err:
        hint = ("; every shard completed before it is intact: free some space and run extract() "
                "again with the same arguments to resume") if err.errno in fileio.DISK_FULL else ""
        raise StoreError(f"{err}{hint}") from err


def atomic_write(path: Path, data: bytes | memoryview, what: str) -> None:
    """:func:`lvlm_probe.fileio.atomic_write` for a store's files.

    Raises:
        StoreError: when the write fails; ``path`` keeps its previous content (or stays absent). A
            full disk says so and how to resume.
    """
    with _store_write():
        fileio.atomic_write(path, data, what)


def write_temporary(path: Path, data: bytes | memoryview, what: str) -> Path:
    """:func:`lvlm_probe.fileio.write_temporary` for a store's files (a leftover that a store scan
    skips until :func:`commit` renames it).

    Raises:
        StoreError: as :func:`atomic_write`.
    """
    with _store_write():
        return fileio.write_temporary(path, data, what)


def commit(tmp: Path, path: Path, what: str) -> None:
    """:func:`lvlm_probe.fileio.commit` for a store's files.

    Raises:
        StoreError: if the rename fails.
    """
    with _store_write():
        fileio.commit(tmp, path, what)


def write_json(path: Path, value: dict[str, Any], what: str) -> None:
    """Write a JSON document atomically (see :func:`atomic_write`)."""
    with _store_write():
        fileio.write_json(path, value, what)


def read_json(path: Path) -> dict[str, Any]:
    """Read the store's JSON header.

    Raises:
        StoreError: if the file is missing or not valid JSON.
    """
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise StoreError(
            f"{path.parent} is not an activation store: it has no {path.name} (expected a folder "
            "written by lvlm_probe.extract)"
        ) from err
    except (OSError, ValueError) as err:
        raise StoreError(f"cannot read the store header {path}: {err}") from err
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        raise StoreError(f"{path} is not an activation store header (format {FORMAT!r} expected)")
    if value.get("version") != VERSION:
        raise StoreError(
            f"{path} has store format version {value.get('version')!r}; this lvlm_probe reads "
            f"version {VERSION}"
        )
    return value


@contextlib.contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on a store while extracting into it.

    The operating system releases the lock when the process dies (also on ``kill -9``), so a
    crashed extraction never leaves a stale lock behind.

    Raises:
        StoreError: if another process holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; a second writer is the user's to avoid
        yield
        return
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            raise StoreError(
                f"another process is extracting into {root} (it holds {root / LOCK}); wait for it "
                "or choose another output folder"
            ) from err
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
