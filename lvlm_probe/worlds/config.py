"""The knobs of a ShapesWorld, validated once into a frozen :class:`WorldConfig`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from .scene import GRID, check_image_size
from .vocab import (
    BACKGROUNDS,
    DEFAULT_COOCCURRING,
    DEFAULT_TYPICAL_COLORS,
    PALETTE,
    SHAPES,
    SIZES,
)


@dataclass(frozen=True)
class WorldConfig:
    """Validated parameters of a world.

    Attributes:
        seed: root of every random stream.
        image_size: side in pixels of rendered images and of bbox coordinates.
        shapes, colors, sizes: the vocabulary in use.
        max_objects: most objects per scene.
        p_typical_color: probability that an object has its shape's typical colour (train prior).
        p_cooccur: probability that a shape's partner is added when the shape is drawn (train prior).
        typical_colors: shape -> typical colour, for every shape in ``shapes``.
        partners: shape -> co-occurring partner, symmetric; unpaired shapes are absent.
        background: background colour name.
    """

    seed: int
    image_size: int
    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    sizes: tuple[str, ...]
    max_objects: int
    p_typical_color: float
    p_cooccur: float
    typical_colors: tuple[tuple[str, str], ...]
    partners: tuple[tuple[str, str], ...]
    background: str

    @property
    def typical(self) -> dict[str, str]:
        return dict(self.typical_colors)

    @property
    def partner(self) -> dict[str, str]:
        return dict(self.partners)

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """Each co-occurring pair once, in ``shapes`` order."""
        seen, out = set(), []
        for a, b in self.partners:
            if a not in seen and b not in seen:
                seen.update((a, b))
                out.append((a, b))
        return tuple(out)


def _names(value: Any, known: Sequence[str], what: str, minimum: int) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InputError(f"{what} must be a sequence of names from {tuple(known)}, got {value!r}")
    names = tuple(value)
    for name in names:
        if name not in known:
            raise InputError(f"unknown {what[:-1]} {name!r} in {what}; valid: {tuple(known)}")
    if len(set(names)) != len(names):
        raise InputError(f"{what} must not repeat a name, got {names!r}")
    if len(names) < minimum:
        raise InputError(f"{what} needs at least {minimum} names, got {names!r}")
    return names


def _probability(value: Any, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0.0 <= value <= 1.0
    ):
        raise InputError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def make_config(
    seed: Any,
    image_size: Any,
    shapes: Any,
    colors: Any,
    sizes: Any,
    max_objects: Any,
    p_typical_color: Any,
    p_cooccur: Any,
    typical_colors: Mapping[str, str] | None,
    cooccurring: Iterable[tuple[str, str]] | None,
    background: Any,
) -> WorldConfig:
    """Validate the knobs of :class:`ShapesWorld` (same arguments) into a :class:`WorldConfig`.

    Raises:
        InputError: naming the bad value and the valid range.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative int, got {seed!r}")
    image_size = check_image_size(image_size)
    shapes = _names(shapes, SHAPES, "shapes", 2)
    # a colour is "atypical" only if another one exists, so counterfactuals need two
    colors = _names(colors, tuple(c for c in PALETTE if c not in BACKGROUNDS), "colors", 2)
    sizes = _names(sizes, SIZES, "sizes", 1)
    limit = min(GRID * GRID, len(shapes))
    if (
        isinstance(max_objects, bool)
        or not isinstance(max_objects, int)
        or not 1 <= max_objects <= limit
    ):
        raise InputError(
            f"max_objects must be an int in [1, {limit}] (a {GRID}x{GRID} layout with one object per cell "
            f"and no repeated shape among {len(shapes)} shapes), got {max_objects!r}"
        )
    p_typical_color = _probability(p_typical_color, "p_typical_color")
    p_cooccur = _probability(p_cooccur, "p_cooccur")
    if background not in BACKGROUNDS:
        raise InputError(f"unknown background {background!r}; valid: {BACKGROUNDS}")

    typical = {}
    for k, shape in enumerate(shapes):
        default = DEFAULT_TYPICAL_COLORS[shape]
        typical[shape] = default if default in colors else colors[k % len(colors)]
    for shape, color in dict(typical_colors or {}).items():
        if shape not in shapes:
            raise InputError(
                f"typical_colors names shape {shape!r}, which is not in shapes {shapes}"
            )
        if color not in colors:
            raise InputError(f"typical_colors[{shape!r}] = {color!r} is not in colors {colors}")
        typical[shape] = color

    if cooccurring is None:
        pairs = [p for p in DEFAULT_COOCCURRING if p[0] in shapes and p[1] in shapes]
    else:
        pairs = [tuple(p) for p in cooccurring]
    partner: dict[str, str] = {}
    for pair in pairs:
        if len(pair) != 2 or pair[0] == pair[1] or any(s not in shapes for s in pair):
            raise InputError(
                f"cooccurring pairs must be two different shapes from {shapes}, got {pair!r}"
            )
        if pair[0] in partner or pair[1] in partner:
            raise InputError(
                f"each shape may be in at most one cooccurring pair, got {pair!r} after {pairs!r}"
            )
        partner[pair[0]], partner[pair[1]] = pair[1], pair[0]
    ordered = tuple((s, partner[s]) for s in shapes if s in partner)

    return WorldConfig(
        seed,
        image_size,
        shapes,
        colors,
        sizes,
        max_objects,
        p_typical_color,
        p_cooccur,
        tuple(typical.items()),
        ordered,
        background,
    )
