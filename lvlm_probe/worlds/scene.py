"""Scene graphs: objects with shape, colour, size and bounding box, and their spatial relations.

Objects sit in distinct cells of a 3x3 grid with a small jitter. Two objects in the same column
have centres at most ``2 * JITTER`` apart horizontally, objects in different columns at least
``1/3 - 2 * JITTER``; ``RELATION_MARGIN`` sits between the two, so every horizontal (and likewise
vertical) relation is either clearly true, clearly false, or "aligned" (ambiguous, never asked).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..errors import InputError
from .objects import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, Obj, check_image_size
from .render import render_objects
from .vocab import RELATIONS

GRID = 3
# Geometry as fractions of the image side, so a scene means the same thing at every resolution.
JITTER = 0.035
HALF_EXTENT = {"small": 0.07, "large": 0.12}
RELATION_MARGIN = 0.15
@dataclass(frozen=True)
class Scene:
    """A scene graph: objects on a plain background (sampled scenes list them in reading order).

    Attributes:
        objects: the objects; no two share a shape, so "the heart" is unambiguous.
        image_size: the side in pixels that ``bbox`` coordinates refer to.
        background: background colour name.
    """

    objects: tuple[Obj, ...]
    image_size: int
    background: str = "white"

    @property
    def shapes(self) -> tuple[str, ...]:
        return tuple(o.shape for o in self.objects)

    def __len__(self) -> int:
        return len(self.objects)

    def index(self, shape: str) -> int | None:
        """Index of the object with this shape, or None if the shape is absent."""
        for i, o in enumerate(self.objects):
            if o.shape == shape:
                return i
        return None

    def offset(self, i: int, j: int) -> tuple[float, float]:
        """``(dx, dy)`` from object i's centre to object j's centre, as fractions of the image side.

        Positive ``dx`` means j is to the right of i; positive ``dy`` means j is below i.
        """
        (xi, yi), (xj, yj) = self.objects[i].center, self.objects[j].center
        return (xj - xi) / self.image_size, (yj - yi) / self.image_size

    def holds(self, i: int, relation: str, j: int) -> bool | None:
        """Whether object i is ``relation`` of object j.

        Args:
            i, j: object indices.
            relation: one of ``"left"``, ``"right"``, ``"above"``, ``"below"``.

        Returns:
            True if it clearly holds, False if the opposite clearly holds, None if the two centres
            are within ``RELATION_MARGIN`` on that axis (ambiguous: never asked).

        Raises:
            InputError: for an unknown relation.
        """
        if relation not in RELATIONS:
            raise InputError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
        dx, dy = self.offset(i, j)
        sep = {"left": dx, "right": -dx, "above": dy, "below": -dy}[relation]
        if sep > RELATION_MARGIN:
            return True
        if sep < -RELATION_MARGIN:
            return False
        return None

    def relations(self, i: int, j: int) -> tuple[str, ...]:
        """Every relation that clearly holds for object i relative to object j, in RELATIONS order."""
        return tuple(r for r in RELATIONS if self.holds(i, r, j))

    def relation(self, i: int, j: int) -> str | None:
        """The relation of object i to object j when exactly one of the four holds, else None."""
        rels = self.relations(i, j)
        return rels[0] if len(rels) == 1 else None

    def scaled(self, size: int) -> Scene:
        """The same scene with bounding boxes in pixels of another image side."""
        f = size / self.image_size
        objs = tuple(replace(o, bbox=tuple(round(v * f, 4) for v in o.bbox)) for o in self.objects)
        return Scene(objs, size, self.background)

    def render(self, size: int | None = None):
        """Render the scene, anti-aliased.

        Args:
            size: output side in pixels (32..1024); defaults to ``image_size``. Bounding boxes scale.

        Returns:
            An RGB ``PIL.Image.Image`` of ``size x size`` pixels.

        Raises:
            InputError: for a size out of range.
        """
        return render_objects(self.objects, self.image_size, self.background, size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "background": self.background,
            "objects": [o.to_dict() for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(
            tuple(Obj.from_dict(o) for o in d["objects"]), int(d["image_size"]), d["background"]
        )


def swap_positions(scene: Scene, i: int, j: int) -> Scene:
    """The scene with objects i and j exchanging centres (each keeps its own size).

    Every relation between i and j is reversed (left <-> right, above <-> below), and both stay inside
    their former grid cells' geometry, so unambiguity is preserved.
    """
    objs = list(scene.objects)
    ci, cj = objs[i].center, objs[j].center

    def moved(o: Obj, c: tuple[float, float]) -> Obj:
        hw, hh = (o.bbox[2] - o.bbox[0]) / 2, (o.bbox[3] - o.bbox[1]) / 2
        return replace(
            o,
            bbox=(
                round(c[0] - hw, 4),
                round(c[1] - hh, 4),
                round(c[0] + hw, 4),
                round(c[1] + hh, 4),
            ),
        )

    objs[i], objs[j] = moved(objs[i], cj), moved(objs[j], ci)
    return Scene(tuple(objs), scene.image_size, scene.background)


__all__ = [
    "GRID",
    "HALF_EXTENT",
    "JITTER",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "RELATION_MARGIN",
    "Obj",
    "Scene",
    "check_image_size",
    "swap_positions",
]
