"""Random streams and the scene sampler that holds the world's priors.

Every item (scene k, question k of a set, pair k, training example k) gets its own generator,
seeded by ``(seed, purpose, *ids, k)``: item k never depends on how many other items or sets were
drawn before, and different purposes or splits never share a stream.
"""

from __future__ import annotations

import numpy as np

from .config import WorldConfig
from .scene import GRID, HALF_EXTENT, JITTER, Obj, Scene
from .vocab import LEVELS, POPE_MODES, SPLITS

# Purpose ids of the random streams; fixed forever, so a seed keeps meaning the same data.
SCENES, QUESTIONS, PAIRS, TRAINING, FREQUENCIES = 1, 2, 3, 4, 5


def stream(cfg: WorldConfig, purpose: int, *ids: int) -> np.random.Generator:
    """The generator of one item, e.g. ``stream(cfg, QUESTIONS, level_id, split_id, ..., k)``."""
    return np.random.default_rng([cfg.seed, purpose, *ids])


def split_id(split: str) -> int:
    return SPLITS.index(split)


def level_id(level: str) -> int:
    return LEVELS.index(level)


def pope_id(pope: str | None) -> int:
    return 0 if pope is None else 1 + POPE_MODES.index(pope)


def _choice(rng: np.random.Generator, items: list | tuple):
    return items[int(rng.integers(len(items)))]


def draw_color(rng: np.random.Generator, cfg: WorldConfig, shape: str, typical: bool) -> str:
    """The shape's typical colour, or a uniformly drawn other colour."""
    usual = cfg.typical[shape]
    if typical:
        return usual
    return _choice(rng, [c for c in cfg.colors if c != usual])


def sample_shapes(
    rng: np.random.Generator,
    cfg: WorldConfig,
    *,
    cooccur: bool,
    require: tuple[str, ...] = (),
    forbid: tuple[str, ...] = (),
    min_objects: int = 1,
    max_objects: int | None = None,
) -> list[str]:
    """Draw the shapes of one scene.

    A target count is drawn uniformly in [min_objects, max_objects]; shapes are then drawn uniformly
    among the allowed ones. The first time a shape of a co-occurring pair enters the scene, its partner
    is added with probability ``p_cooccur`` and otherwise excluded for the rest of the scene, so among
    scenes holding either shape of a pair, both are present with probability exactly ``p_cooccur``.
    A fresh paired shape is only drawn when there is room for its partner. With ``cooccur=False``
    (counterfactual scenes) partners are always excluded.

    Args:
        rng: the item's generator.
        cfg: the world.
        cooccur: apply the co-occurrence prior (else break every pair).
        require: shapes that must be present (drawn first).
        forbid: shapes that must be absent.
        min_objects, max_objects: bounds on the number of shapes.

    Returns:
        The shapes, at least ``len(require)`` of them; possibly fewer than ``min_objects`` when the
        constraints leave too few shapes (callers retry).
    """
    top = cfg.max_objects if max_objects is None else max_objects
    target = int(rng.integers(max(min_objects, len(require)), max(top, len(require)) + 1))
    partner = cfg.partner
    chosen: list[str] = []
    excluded = set(forbid)

    def add(shape: str) -> None:
        chosen.append(shape)
        mate = partner.get(shape)
        if mate is None or mate in chosen or mate in excluded:
            return
        if mate in require:
            return  # it is added anyway; the draw would not change the scene
        if cooccur and len(chosen) < top and rng.random() < cfg.p_cooccur:
            chosen.append(mate)
        else:
            excluded.add(mate)

    for shape in require:
        if shape not in chosen:
            add(shape)
    while len(chosen) < target:
        room = top - len(chosen)
        allowed = [
            s
            for s in cfg.shapes
            if s not in chosen
            and s not in excluded
            and not (cooccur and room < 2 and s in partner and partner[s] not in excluded)
        ]
        if not allowed:
            break
        add(_choice(rng, allowed))
    return chosen


def layout(
    rng: np.random.Generator,
    cfg: WorldConfig,
    shapes: list[str],
    colors: list[str],
    sizes: list[str],
) -> Scene:
    """Place objects in distinct cells of the grid with jitter; objects are returned in reading order."""
    cells = rng.permutation(GRID * GRID)[: len(shapes)]
    jitter = rng.uniform(-JITTER, JITTER, size=(len(shapes), 2))
    s = cfg.image_size
    placed = []
    for k, cell in enumerate(cells):
        row, col = divmod(int(cell), GRID)
        cx, cy = (col + 0.5) / GRID + jitter[k, 0], (row + 0.5) / GRID + jitter[k, 1]
        h = HALF_EXTENT[sizes[k]]
        bbox = tuple(round(float(v) * s, 4) for v in (cx - h, cy - h, cx + h, cy + h))
        placed.append((int(cell), Obj(shapes[k], colors[k], sizes[k], bbox)))
    placed.sort(key=lambda t: t[0])
    return Scene(tuple(o for _, o in placed), s, cfg.background)


def sample_scene(
    rng: np.random.Generator,
    cfg: WorldConfig,
    split: str,
    *,
    require: tuple[str, ...] = (),
    forbid: tuple[str, ...] = (),
    min_objects: int = 1,
    max_objects: int | None = None,
) -> Scene:
    """Draw one scene of a split.

    ``train`` and ``typical`` follow the priors (typical colour with probability ``p_typical_color``,
    co-occurrence with ``p_cooccur``); ``counterfactual`` gives every object an atypical colour and
    never shows both shapes of a co-occurring pair.

    Raises:
        RuntimeError: if the constraints cannot be met (a bug in the caller: the world validates).
    """
    cf = split == "counterfactual"
    for _ in range(100):
        shapes = sample_shapes(
            rng,
            cfg,
            cooccur=not cf,
            require=require,
            forbid=forbid,
            min_objects=min_objects,
            max_objects=max_objects,
        )
        if len(shapes) >= min_objects:
            break
    else:
        raise RuntimeError(
            f"no scene with >= {min_objects} objects, require={require}, forbid={forbid}"
        )
    colors = [
        draw_color(rng, cfg, sh, typical=not cf and rng.random() < cfg.p_typical_color)
        for sh in shapes
    ]
    sizes = [_choice(rng, cfg.sizes) for _ in shapes]
    return layout(rng, cfg, shapes, colors, sizes)


def shape_frequencies(cfg: WorldConfig, n: int = 20000) -> dict[str, float]:
    """Fraction of training scenes that contain each shape, estimated on a dedicated stream.

    The stream does not involve the seed: frequencies are a property of the training distribution,
    so every seed of the same configuration ranks shapes the same way.

    Returns:
        ``{shape: frequency}`` for every shape of the world.
    """
    rng = np.random.default_rng([FREQUENCIES, n])
    counts = dict.fromkeys(cfg.shapes, 0)
    for _ in range(n):
        for shape in sample_shapes(rng, cfg, cooccur=True):
            counts[shape] += 1
    return {s: c / n for s, c in counts.items()}
