"""Cutting a store back to its first examples, so that resuming the same ``extract`` call
recomputes the rest (a sweep whose image files changed re-extracts from the first changed one).

Shards are removed from the last one down, each manifest before its tensor file: at every moment
the folder is what an interrupted extraction leaves (complete shards ``0 .. k``, perhaps the next
shard's tensor file without its manifest), so a process killed while rewinding leaves a store that
resumes or rewinds again.
"""
from __future__ import annotations

from pathlib import Path

from . import files
from .store import scan


def rewind(root: str | Path, n_keep: int) -> int:
    """Delete the shards of the store at ``root`` that hold any example at or after index ``n_keep``.

    Args:
        root: the store folder.
        n_keep: the number of leading examples whose shards may stay (a shard that straddles
            ``n_keep`` goes: shards are the unit of resuming).

    Returns:
        How many examples the store still holds (at most ``n_keep``).

    Raises:
        StoreError: the store is damaged (see :func:`~lvlm_probe.store.store.scan`), or another
            process is extracting into it.
    """
    root = Path(root)
    if not (root / files.HEADER).exists():
        return 0  # nothing was ever written
    with files.writer_lock(root):
        records = scan(root, verify=False).records
        kept = [r for r in records if r.start + r.n <= n_keep]
        if len(kept) == len(records):
            return sum(r.n for r in kept)
        header = files.read_json(root / files.HEADER)
        header.update(complete=False, n_examples=None)  # the store is an interrupted extraction now
        files.write_json(root / files.HEADER, header, "the store header")
        for record in reversed(records[len(kept):]):
            (root / files.MANIFEST / files.shard_name(record.index, "parquet")).unlink()
            (root / files.SHARDS / record.file).unlink(missing_ok=True)
        return sum(r.n for r in kept)
