"""Atomic file writes: a reader sees either the old file or the complete new one, never a prefix.

The bytes go to a hidden temporary file in the same directory, are fsynced, and the temporary file
is renamed over the final name with ``os.replace`` (atomic on POSIX and Windows), after which the
directory is fsynced so the rename itself survives a power cut. Temporary files start with ``.`` so
tools that read a directory as a Parquet dataset skip them. Stores, run folders, figures and
reports are all written through here; a failure raises :class:`~lvlm_probe.errors.FileWriteError`.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import FileWriteError

DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_CHUNK = 64 << 20  # bytes per os.write call (a single call may write less than asked)
_TMP = re.compile(r"^\..+\.tmp-\d+$")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`write_temporary`'s (a leftover of an interrupted write)."""
    return bool(_TMP.match(name))


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
        FileWriteError: when the write fails; the temporary file is removed and ``path`` keeps its
            previous content (or stays absent). A full disk (``ENOSPC``, ``EDQUOT``) says so.
    """
    commit(write_temporary(path, data, what), path, what)


def write_temporary(path: Path, data: bytes | memoryview, what: str) -> Path:
    """The first half of :func:`atomic_write`: write and fsync ``data`` under the temporary name
    of ``path`` (a leftover for :func:`is_temporary` until :func:`commit` renames it).

    Returns:
        The temporary file's path.

    Raises:
        FileWriteError: as :func:`atomic_write`; the temporary file is removed.
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
        FileWriteError: if the rename fails (the temporary file is removed).
    """
    try:
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _write_error(err, path, None, what) from err
    fsync_dir(path.parent)


def _write_error(err: OSError, path: Path, size: int | None, what: str) -> FileWriteError:
    if err.errno in DISK_FULL:
        error = FileWriteError(f"the disk is full: writing {what} ({size} bytes to {path}) failed with "
                               f"{os.strerror(err.errno)}")
    else:
        error = FileWriteError(f"writing {what} to {path} failed: {err}")
    error.errno = err.errno  # so callers can tell a full disk from other failures
    return error


def write_parquet(path: Path, table: pd.DataFrame, what: str) -> None:
    """Write a DataFrame as Parquet atomically (see :func:`atomic_write`)."""
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    atomic_write(path, buffer.getvalue(), what)


def write_json(path: Path, value: dict[str, Any], what: str) -> None:
    """Write a JSON document atomically (see :func:`atomic_write`)."""
    atomic_write(path, json.dumps(value, indent=1, sort_keys=True).encode(), what)
