"""Saving figures: PNG bytes written atomically, so an interrupted run never leaves half a file."""
from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure

from ..fileio import atomic_write


def save_figure(fig: Figure, path: str | Path, dpi: int = 110, metadata: dict[str, str] | None = None) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders created), atomically; returns the path.

    ``metadata`` goes into the PNG's text chunks (e.g. the digests of the inputs a figure was
    computed from; ``PIL.Image.open(path).text`` reads them back).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata=dict(metadata or {}))
    atomic_write(path, buffer.getvalue(), f"figure {path.name}")
    return path
