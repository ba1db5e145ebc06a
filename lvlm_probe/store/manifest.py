"""The Parquet manifest of a store: one file per shard, one row per example.

A shard's manifest file is its commit record: it is written after the shard's tensors and
carries, in the Parquet key-value metadata under ``lvlm_probe``, the shard's :class:`ShardRecord`
(the tensor file's name, byte size and sha256, the number of examples and the index of the first
one). Pages are written with Parquet page checksums, and read with their verification on.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError, StoreError

KEY = b"lvlm_probe"
# Columns the store fills itself; a dataset must not use these names for its labels.
RESERVED = ("shard", "row", "n_images", "n_positions", "layout", "fingerprint", "processor_fingerprint")


@dataclass(frozen=True)
class ShardRecord:
    """What a shard's manifest says about its tensor file.

    Attributes:
        index: the shard's number (``shard-{index:05d}.*``).
        start: dataset index of its first example.
        n: number of examples.
        file: tensor file name inside ``shards/``.
        bytes: the tensor file's size.
        sha256: the tensor file's checksum.
    """

    index: int
    start: int
    n: int
    file: str
    bytes: int
    sha256: str


def encode(rows: Sequence[dict[str, Any]], record: ShardRecord) -> bytes:
    """A shard's manifest as Parquet bytes.

    Args:
        rows: one dict per example, in shard order (columns as described in :mod:`lvlm_probe.store`).
        record: the shard's record, stored in the file metadata.

    Raises:
        InputError: if a label column holds values Parquet cannot store, naming the column.
    """
    try:
        table = pa.Table.from_pylist(list(rows))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        for column in columns:
            values = [r.get(column) for r in rows]
            try:
                pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as col_err:
                kinds = sorted({type(v).__name__ for v in values})
                raise InputError(
                    f"label column {column!r} holds values of types {kinds} that cannot be stored "
                    f"in the Parquet manifest ({col_err}); expected numbers, strings, booleans, None "
                    "or lists of them"
                ) from err
        raise InputError(f"the label columns cannot be stored in the Parquet manifest: {err}") from err
    table = table.replace_schema_metadata({KEY: json.dumps(asdict(record)).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, write_page_checksum=True)
    return sink.getvalue().to_pybytes()


def read_record(path: Path) -> ShardRecord:
    """The :class:`ShardRecord` in a manifest file's metadata (reads the footer only).

    Raises:
        StoreError: if the file cannot be read or carries no valid record.
    """
    try:
        meta = pq.read_schema(path).metadata or {}
        return ShardRecord(**json.loads(meta[KEY]))
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException) as err:
        raise StoreError(f"manifest {path} is corrupted or not a shard manifest: {err}") from err


def read_rows(path: Path) -> pd.DataFrame:
    """A manifest file's rows, with page checksums verified.

    Raises:
        StoreError: if the file is corrupted.
    """
    try:
        return pq.read_table(path, page_checksum_verification=True).to_pandas()
    except (OSError, ValueError, pa.ArrowException) as err:
        raise StoreError(f"manifest {path} is corrupted: {err}") from err


def check_columns(row: dict[str, Any], index: int) -> None:
    """Reject label columns whose names the store uses itself.

    Raises:
        InputError: naming the clashing columns.
    """
    clash = [c for c in RESERVED if c in row]
    if clash:
        raise InputError(
            f"dataset example {index} has columns {clash}, which the store fills itself; "
            f"rename them (reserved: {list(RESERVED)})"
        )
