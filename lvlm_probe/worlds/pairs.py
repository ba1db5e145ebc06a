"""Counterfactual (clean, corrupted) question pairs for activation and path patching.

Both questions of a pair have the same prompt; their scenes differ in exactly one thing and the gold
answers differ accordingly.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .config import WorldConfig
from .questions import Question, _finish, attribute_question, relation_question, steer_colors
from .sampling import sample_scene
from .scene import Scene, swap_positions
from .vocab import NO, TEMPLATES, YES


def _choice(rng: np.random.Generator, items: list | tuple):
    return items[int(rng.integers(len(items)))]


def _with_object(scene: Scene, i: int, **changes) -> Scene:
    objs = list(scene.objects)
    objs[i] = replace(objs[i], **changes)
    return Scene(tuple(objs), scene.image_size, scene.background)


def color_pair(
    rng: np.random.Generator, cfg: WorldConfig, split: str, qid: str
) -> tuple[Question, Question]:
    """Colour pair: the corrupted scene recolours the object of "What color is the {shape}?"."""
    clean = attribute_question(rng, cfg, split, "color", True, f"{qid}-clean")
    i = clean.about[0]
    new = _choice(rng, [c for c in cfg.colors if c != clean.color])
    corrupted = replace(
        clean,
        id=f"{qid}-corrupted",
        scene=_with_object(clean.scene, i, color=new),
        answer=new,
        color=new,
    )
    return clean, corrupted


def object_pair(
    rng: np.random.Generator, cfg: WorldConfig, split: str, qid: str
) -> tuple[Question, Question]:
    """Object pair: "Is there a {shape}?" (yes); the corrupted scene swaps in an absent shape (no).

    The replacement keeps the object's colour, size and position, so only the shape changes.
    """
    scene = sample_scene(rng, cfg, split, max_objects=min(cfg.max_objects, len(cfg.shapes) - 1))
    i = int(rng.integers(len(scene)))
    scene = steer_colors(rng, cfg, scene, (i,), split)
    shape = scene.objects[i].shape
    prompt = TEMPLATES["exist"].format(shape=shape)
    clean = _finish(
        cfg,
        scene,
        (i,),
        id=f"{qid}-clean",
        prompt=prompt,
        answer=YES,
        level="object",
        kind="exist",
        split=split,
        shape=shape,
    )
    substitute = _choice(rng, [s for s in cfg.shapes if s not in scene.shapes])
    corrupted = replace(
        clean,
        id=f"{qid}-corrupted",
        scene=_with_object(scene, i, shape=substitute),
        answer=NO,
        about=(),
        color=None,
        size=None,
    )
    return clean, corrupted


def relation_pair(
    rng: np.random.Generator, cfg: WorldConfig, split: str, qid: str
) -> tuple[Question, Question]:
    """Relation pair: "Is the {a} {relation} the {b}?" (yes); the objects swap positions (no)."""
    clean = relation_question(rng, cfg, split, "relation_yesno", True, f"{qid}-clean")
    i, j = clean.about
    swapped = swap_positions(clean.scene, i, j)
    answer = YES if swapped.holds(i, clean.relation, j) else NO
    return clean, replace(clean, id=f"{qid}-corrupted", scene=swapped, answer=answer)


BUILDERS = {"color": color_pair, "object": object_pair, "relation": relation_pair}
