"""File-level primitives of an activation store: names, atomic writes, checksums and the writer lock.

Every file of a store is written by :func:`atomic_write`: the bytes go to a hidden temporary file
in the same directory, are fsynced, and the temporary file is renamed over the final name with
``os.replace`` (atomic on POSIX and Windows), after which the directory is fsynced so the rename
itself survives a power cut. A reader therefore sees either the old file or the complete new
one, never a prefix. Temporary files start with ``.`` so tools that read the manifest directory as
a Parquet dataset skip them.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import StoreError

FORMAT = "lvlm_probe.activation_store"
VERSION = 1
HEADER = "store.json"
SHARDS = "shards"
MANIFEST = "manifest"
LOCK = ".lock"
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_CHUNK = 64 << 20  # bytes per os.write call (a single call may write less than asked)
_TMP = re.compile(r"^\..+\.tmp-\d+$")
_SHARD = re.compile(r"^shard-(\d{5,})\.(safetensors|parquet)$")


def shard_name(index: int, ext: str) -> str:
    """``shard-00003.safetensors`` / ``shard-00003.parquet``."""
    return f"shard-{index:05d}.{ext}"


def shard_index(name: str) -> tuple[int, str] | None:
    """``(index, extension)`` of a shard file name, or None for any other name."""
    m = _SHARD.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def is_temporary(name: str) -> bool:
    """Whether a file name is a temporary file left by an interrupted :func:`atomic_write`."""
    return bool(_TMP.match(name))


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


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte to a file descriptor; the one place bytes reach the disk."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view[:_CHUNK])
        view = view[written:]


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | memoryview, what: str) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, ``os.replace``).

    Args:
        path: the final file name.
        data: its complete content.
        what: what the file is, for error messages (e.g. ``"shard 3"``).

    Raises:
        StoreError: when the write fails; the temporary file is removed and ``path`` keeps its
            previous content (or stays absent). A full disk (``ENOSPC``, ``EDQUOT``) says so.
    """
    commit(write_temporary(path, data, what), path, what)


def write_temporary(path: Path, data: bytes | memoryview, what: str) -> Path:
    """The first half of :func:`atomic_write`: write and fsync ``data`` under the temporary name
    of ``path`` (which a store scan treats as a leftover until :func:`commit` renames it).

    Returns:
        The temporary file's path.

    Raises:
        StoreError: as :func:`atomic_write`; the temporary file is removed.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _write_error(err, path, len(data), what) from err
    return tmp


def commit(tmp: Path, path: Path, what: str) -> None:
    """The second half of :func:`atomic_write`: rename a written temporary file into place and
    make the rename durable.

    Raises:
        StoreError: if the rename fails (the temporary file is removed).
    """
    try:
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _write_error(err, path, None, what) from err
    fsync_dir(path.parent)


def _write_error(err: OSError, path: Path, size: int | None, what: str) -> StoreError:
    if err.errno in DISK_FULL:
        return StoreError(
            f"the disk is full: writing {what} ({size} bytes to {path}) failed with "
            f"{os.strerror(err.errno)}; every shard completed before it is intact: free some "
            "space and run extract() again with the same arguments to resume"
        )
    return StoreError(f"writing {what} to {path} failed: {err}")


def write_parquet(path: Path, table: pd.DataFrame, what: str) -> None:
    """Write a DataFrame as Parquet atomically (see :func:`atomic_write`)."""
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    atomic_write(path, buffer.getvalue(), what)


def write_json(path: Path, value: dict[str, Any], what: str) -> None:
    """Write a JSON document atomically (see :func:`atomic_write`)."""
    atomic_write(path, json.dumps(value, indent=1, sort_keys=True).encode(), what)


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
