"""Resumable stages of a long benchmark run: each stage's tables written atomically, then reused.

A stage is finished when its ``done.json`` exists; it is written after every table of the stage,
so a run killed mid-stage leaves the stage unfinished and a rerun computes it again, while finished
stages are read back instead of recomputed. Every table, fresh or reused, is the one read from
disk, so a resumed run returns exactly what an uninterrupted one does.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from ..store.files import write_json, write_parquet

DONE = "done.json"


class Stages:
    """Stage results under ``folder`` (None: compute everything, keep nothing).

    Args:
        folder: where stages are kept, one subfolder per stage.

    Example:
        >>> stages = Stages("runs/report/stages")
        >>> (answers,) = stages.run("answers", ("answers",), lambda: (ask(model, questions),))
    """

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder is not None else None

    def done(self, name: str) -> bool:
        """Whether stage ``name`` finished in an earlier run."""
        return self.folder is not None and (self.folder / name / DONE).is_file()

    def run(self, name: str, tables: Sequence[str],
            compute: Callable[[], Sequence[pd.DataFrame]]) -> tuple[pd.DataFrame, ...]:
        """The tables of stage ``name``: read back if it finished before, else computed and written.

        Args:
            name: the stage's name (its subfolder).
            tables: the names of the tables ``compute`` returns, in order.
            compute: the stage's work; returns one DataFrame per name.

        Returns:
            The tables, as read from disk (as computed when there is no folder).
        """
        if self.folder is None:
            return tuple(compute())
        where = self.folder / name
        if not self.done(name):
            values = compute()
            where.mkdir(parents=True, exist_ok=True)
            for table, value in zip(tables, values, strict=True):
                write_parquet(where / f"{table}.parquet", value, f"stage {name}: {table}")
            write_json(where / DONE, {"stage": name, "tables": list(tables)}, f"stage {name}")
        return tuple(pd.read_parquet(where / f"{table}.parquet") for table in tables)
