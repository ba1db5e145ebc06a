"""What the benchmark tables share: the key of a scene and the tables' JSON form.

Used by :mod:`~lvlm_probe.bench.misalignment_benchmark` (which builds the tables) and
:mod:`~lvlm_probe.bench.diagnosis` (which splits probe data by scene and reports its own tables).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pandas as pd


def scene_key(scene) -> str:
    """A short stable id of a scene graph (equal scenes, equal keys), for splits by scene."""
    return hashlib.sha1(json.dumps(scene.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts of plain Python values (NaN as None), for JSON."""
    out = []
    for row in table.to_dict("records"):
        out.append({k: (None if isinstance(v, float) and np.isnan(v) else
                        v.item() if isinstance(v, np.generic) else v) for k, v in row.items()})
    return out
