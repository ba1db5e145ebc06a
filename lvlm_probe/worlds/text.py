"""Captions (for CHAIR), text-only scene descriptions (for cross-modal probes) and the text corpus."""

from __future__ import annotations

from .config import WorldConfig
from .scene import Scene
from .vocab import NO, RELATION_PHRASES, RELATIONS, TEMPLATES, YES

# Description relations are stated for consecutive objects in reading order, so the earlier object
# is above the later one, or level with it and to its left.
_VERTICAL_FIRST = ("above", "below", "left", "right")
_ALL_RELATION_PHRASES = (
    *RELATION_PHRASES.values(),
    "next to",
    *(f"{v} and {RELATION_PHRASES[h]}" for v in ("above", "below") for h in ("left", "right")),
)


def caption(scene: Scene) -> str:
    """A caption that mentions every object, e.g. ``"A small red heart and a large blue square."``.

    Objects appear in the scene's order (reading order for sampled scenes).
    """
    phrases = [o.phrase() for o in scene.objects]
    if len(phrases) == 1:
        body = phrases[0]
    else:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return body[0].upper() + body[1:] + "."


def relation_phrase(scene: Scene, i: int, j: int) -> str:
    """How object i relates to object j in words, e.g. ``"above and left of"``; ``"next to"`` if none holds."""
    rels = sorted(scene.relations(i, j), key=_VERTICAL_FIRST.index)
    if not rels:
        return "next to"  # unreachable for sampled scenes: distinct grid cells differ on an axis
    if len(rels) == 2:
        return f"{rels[0]} and {RELATION_PHRASES[rels[1]]}"
    return RELATION_PHRASES[rels[0]]


def describe(scene: Scene) -> str:
    """A text-only description with the same concepts as the image.

    Returns:
        e.g. ``"a small red heart left of a large blue square, a large blue square above a small
        green star"``: each consecutive pair of objects with the relation that holds between them.
    """
    objs = scene.objects
    if len(objs) == 1:
        return objs[0].phrase()
    parts = [
        f"{objs[k].phrase()} {relation_phrase(scene, k, k + 1)} {objs[k + 1].phrase()}"
        for k in range(len(objs) - 1)
    ]
    return ", ".join(parts)


def corpus(cfg: WorldConfig) -> list[str]:
    """Every sentence form the world's prompts, answers, captions and descriptions can produce.

    Prompts are enumerated exhaustively; captions and descriptions through every object phrase and
    every relation phrase (their other combinations reuse the same words and punctuation).
    """
    lines: list[str] = []
    shapes, colors = cfg.shapes, cfg.colors
    for s in shapes:
        lines += [TEMPLATES[k].format(shape=s) for k in ("exist", "color", "size")]
        lines += [TEMPLATES["color_yesno"].format(shape=s, color=c) for c in colors]
        for o in shapes:
            if o != s:
                lines += [
                    TEMPLATES["relation_yesno"].format(shape=s, phrase=RELATION_PHRASES[r], other=o)
                    for r in RELATIONS
                ]
                lines.append(TEMPLATES["where"].format(shape=s, other=o))
    lines += [YES, NO, *colors, *cfg.sizes, *RELATIONS]
    phrases = [f"a {z} {c} {s}" for s in shapes for c in colors for z in cfg.sizes]
    lines += [p[0].upper() + p[1:] + "." for p in phrases]
    lines += phrases
    n = len(phrases)
    for k in range(n):
        a, b, c = phrases[k], phrases[(k + 7) % n], phrases[(k + 13) % n]
        lines.append(f"{a[0].upper() + a[1:]}, {b} and {c}.")
        for rel in _ALL_RELATION_PHRASES:
            lines.append(f"{a} {rel} {b}, {b} {rel} {c}")
    return list(dict.fromkeys(lines))
