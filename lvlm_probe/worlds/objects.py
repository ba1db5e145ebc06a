"""The objects a scene is made of, and the image sizes scenes are drawn at.

Both sit below :mod:`~lvlm_probe.worlds.scene` and :mod:`~lvlm_probe.worlds.render`: a scene is
objects on a background and can draw itself, and drawing needs only the objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InputError

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024


def check_image_size(size: Any, name: str = "image_size") -> int:
    """Validate an image side length in pixels.

    Raises:
        InputError: unless ``size`` is an int in [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE].
    """
    if (
        isinstance(size, bool)
        or not isinstance(size, int)
        or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE
    ):
        raise InputError(
            f"{name} must be an int in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] (smaller images cannot draw "
            f"a small object recognisably), got {size!r}"
        )
    return size


@dataclass(frozen=True)
class Obj:
    """One object of a scene.

    Attributes:
        shape: a shape name, e.g. ``"heart"``.
        color: a colour name, e.g. ``"red"``.
        size: ``"small"`` or ``"large"``.
        bbox: ``(x0, y0, x1, y1)`` in pixels of the scene's ``image_size``; the shape fills it.
    """

    shape: str
    color: str
    size: str
    bbox: tuple[float, float, float, float]

    @property
    def center(self) -> tuple[float, float]:
        """``(x, y)`` centre of the bounding box, in pixels."""
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    def phrase(self) -> str:
        """``"a small red heart"``."""
        return f"a {self.size} {self.color} {self.shape}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "bbox": list(self.bbox),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Obj:
        return cls(d["shape"], d["color"], d["size"], tuple(float(v) for v in d["bbox"]))
