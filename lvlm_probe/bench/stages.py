"""Resumable stages of a long benchmark run: each stage's tables written atomically, then reused.

A stage is finished when its ``done.json`` exists; it is written after every table of the stage,
so a run killed mid-stage leaves the stage unfinished and a rerun computes it again, while finished
stages are read back instead of recomputed. ``done.json`` records the run's settings (model
fingerprint, world, counts): a stage finished under other settings is computed again, never reused.
Every table, fresh or reused, is the one read from disk, so a resumed run returns exactly what an
uninterrupted one does.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..attribution.results import count, summary_repr
from ..fileio import write_json, write_parquet

DONE = "done.json"


class Stages:
    """Stage results under ``folder`` (None: compute everything, keep nothing).

    Args:
        folder: where stages are kept, one subfolder per stage.
        settings: what the results depend on (JSON-serialisable; other values are compared as
            strings); a stage finished under other settings is not reused.

    Example:
        >>> stages = Stages("runs/report/stages", settings={"n": 60, "model": digest})
        >>> (answers,) = stages.run("answers", ("answers",), lambda: (ask(model, questions),))
    """

    def __init__(self, folder: str | Path | None, settings: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        # normalised through JSON, so values compare as they are stored
        self.settings = json.loads(json.dumps(settings or {}, sort_keys=True, default=str))

    def __repr__(self) -> str:
        if self.folder is None:
            return summary_repr("Stages", ["no folder: every stage computed, none kept"])
        table = self.to_frame()
        return summary_repr("Stages", [repr(str(self.folder)), count(len(table), "stage") + " on disk",
                                       f"{int(table['done'].sum())} finished with these settings"],
                            [f"settings {', '.join(self.settings) or 'none'}"])

    def __str__(self) -> str:
        return repr(self)

    def to_frame(self) -> pd.DataFrame:
        """One row per stage folder on disk, by name: ``stage``, ``done`` (finished under these
        settings: :meth:`done`), ``tables`` (the parquet tables it holds)."""
        folders = sorted(p for p in self.folder.iterdir() if p.is_dir()) \
            if self.folder is not None and self.folder.is_dir() else []
        return pd.DataFrame([dict(stage=f.name, done=self.done(f.name),
                                  tables=sorted(t.stem for t in f.glob("*.parquet"))) for f in folders],
                            columns=["stage", "done", "tables"])

    def done(self, name: str) -> bool:
        """Whether stage ``name`` finished in an earlier run with the same settings."""
        if self.folder is None or not (self.folder / name / DONE).is_file():
            return False
        try:
            record = json.loads((self.folder / name / DONE).read_text())
        except (OSError, ValueError):
            return False  # unreadable: compute the stage again
        return record.get("settings") == self.settings

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
            write_json(where / DONE, {"stage": name, "tables": list(tables), "settings": self.settings},
                       f"stage {name}")
        return tuple(pd.read_parquet(where / f"{table}.parquet") for table in tables)
