"""Saving figures: PNG bytes written atomically, so an interrupted run never leaves half a file."""
from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure

from ..fileio import atomic_write


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders created), atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write(path, buffer.getvalue(), f"figure {path.name}")
    return path
