"""Questions about scenes at the object, attribute and relation levels, with their gold answers.

Each builder takes the item's own random generator and returns one :class:`Question` whose answer
is computed from the scene graph. Splits steer the asked-about objects: ``typical`` gives them their
shape's typical colour, ``counterfactual`` scenes give every object an atypical colour and never
show both shapes of a co-occurring pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from .config import WorldConfig
from .sampling import draw_color, sample_scene
from .scene import Scene
from .vocab import NO, OPPOSITE, RELATION_PHRASES, TEMPLATES, YES


@dataclass(frozen=True)
class Question:
    """One question about one scene.

    Attributes:
        id: unique id within the world, e.g. ``"s0-typical-object-random-12"``.
        prompt: the user prompt.
        answer: gold answer, a single lowercase word.
        level: ``"object"``, ``"attribute"`` or ``"relation"``.
        kind: ``"exist"``, ``"color"``, ``"size"``, ``"color_yesno"``, ``"relation_yesno"`` or ``"where"``.
        scene: the scene graph the image is rendered from.
        about: indices into ``scene.objects`` of the objects asked about (empty for an absent shape).
        split: ``"train"``, ``"typical"`` or ``"counterfactual"``.
        pope: POPE sampling mode of an object-level set, else None.
        shape: the shape named first in the prompt (possibly absent from the scene).
        other: the second shape of a relation question; for an adversarial negative, the present
            shape whose co-occurring partner is asked about.
        color: true colour of the object asked about, if present.
        size: true size of the object asked about, if present.
        asked_color: the colour named in a colour yes/no prompt.
        relation: the relation named in a yes/no prompt, or the true one for ``where``.
        typical_color: the typical colour of ``shape`` under the training prior.
    """

    id: str
    prompt: str
    answer: str
    level: str
    kind: str
    scene: Scene
    about: tuple[int, ...]
    split: str
    pope: str | None = None
    shape: str | None = None
    other: str | None = None
    color: str | None = None
    size: str | None = None
    asked_color: str | None = None
    relation: str | None = None
    typical_color: str | None = None

    @property
    def image(self) -> Image.Image:
        """The scene rendered at its ``image_size`` (deterministic; rendered on access)."""
        return self.scene.render()

    def to_dict(self) -> dict[str, Any]:
        """A dataset row: ``id``, ``image`` (PIL), ``prompt``, ``answer`` and label columns."""
        return {
            "id": self.id,
            "image": self.image,
            "prompt": self.prompt,
            "answer": self.answer,
            **self.labels(),
        }

    def labels(self) -> dict[str, Any]:
        """The label columns, for probes and tidy tables."""
        return {
            "level": self.level,
            "kind": self.kind,
            "split": self.split,
            "pope": self.pope,
            "shape": self.shape,
            "other": self.other,
            "color": self.color,
            "size": self.size,
            "asked_color": self.asked_color,
            "relation": self.relation,
            "typical_color": self.typical_color,
            "n_objects": len(self.scene),
            "about": list(self.about),
        }


def _choice(rng: np.random.Generator, items: list | tuple):
    return items[int(rng.integers(len(items)))]


def steer_colors(
    rng: np.random.Generator, cfg: WorldConfig, scene: Scene, about: tuple[int, ...], split: str
) -> Scene:
    """Give the asked-about objects their typical colour (``typical``) or an atypical one (``counterfactual``)."""
    if split == "train":
        return scene
    objs = list(scene.objects)
    for i in about:
        shape, color = objs[i].shape, objs[i].color
        usual = cfg.typical[shape]
        if split == "typical" and color != usual:
            objs[i] = replace(objs[i], color=usual)
        elif split == "counterfactual" and color == usual:
            objs[i] = replace(objs[i], color=draw_color(rng, cfg, shape, typical=False))
    return Scene(tuple(objs), scene.image_size, scene.background)


def _finish(cfg: WorldConfig, scene: Scene, about: tuple[int, ...], **fields: Any) -> Question:
    """Fill the attribute labels of the first asked-about object."""
    shape = fields.get("shape")
    if about:
        o = scene.objects[about[0]]
        fields.setdefault("color", o.color)
        fields.setdefault("size", o.size)
    return Question(scene=scene, about=about, typical_color=cfg.typical.get(shape), **fields)


def object_question(
    rng: np.random.Generator,
    cfg: WorldConfig,
    split: str,
    pope: str,
    positive: bool,
    qid: str,
    rank: Callable[[], list[str]],
) -> Question:
    """Existence: "Is there a {shape}?" about a present shape (yes) or an absent one (no).

    Absent shapes are sampled by POPE's ``pope`` mode: ``random`` draws the scene, then one of
    the shapes it lacks uniformly (so a present shape's usual partner is asked about only as often
    as the scenes lack it); ``popular`` the most frequent shape it lacks; ``adversarial`` the
    usual partner of a present shape.

    Args:
        rank: returns the shapes from most to least frequent in training scenes (for ``popular``).
    """
    common = {"id": qid, "level": "object", "kind": "exist", "split": split, "pope": pope}
    other = None
    if positive:
        scene = sample_scene(rng, cfg, split)
        i = int(rng.integers(len(scene)))
        scene = steer_colors(rng, cfg, scene, (i,), split)
        shape, about, answer = scene.objects[i].shape, (i,), YES
    else:
        if pope == "random":  # as POPE samples: a scene, then one of the shapes it lacks
            scene = sample_scene(
                rng, cfg, split, max_objects=min(cfg.max_objects, len(cfg.shapes) - 1)
            )
            shape = _choice(rng, [s for s in cfg.shapes if s not in scene.shapes])
        elif pope == "popular":
            scene = sample_scene(
                rng, cfg, split, max_objects=min(cfg.max_objects, len(cfg.shapes) - 1)
            )
            shape = next(s for s in rank() if s not in scene.shapes)
        else:  # adversarial: a present shape's usual partner, absent
            a, b = _choice(rng, cfg.pairs)
            if rng.random() < 0.5:
                a, b = b, a
            scene = sample_scene(rng, cfg, split, require=(a,), forbid=(b,))
            shape, other = b, a
        about, answer = (), NO
    prompt = TEMPLATES["exist"].format(shape=shape)
    return _finish(
        cfg, scene, about, prompt=prompt, answer=answer, shape=shape, other=other, **common
    )


def attribute_question(
    rng: np.random.Generator, cfg: WorldConfig, split: str, kind: str, positive: bool, qid: str
) -> Question:
    """Colour (open or yes/no) or size of one present object.

    A negative colour yes/no question names, in the counterfactual split, the shape's typical colour
    (the answer the prior suggests), else a uniformly drawn wrong colour.
    """
    scene = sample_scene(rng, cfg, split)
    i = int(rng.integers(len(scene)))
    scene = steer_colors(rng, cfg, scene, (i,), split)
    o = scene.objects[i]
    asked = None
    if kind == "color":
        answer = o.color
    elif kind == "size":
        answer = o.size
    else:
        if positive:
            asked = o.color
        elif split == "counterfactual":
            asked = cfg.typical[o.shape]
        else:
            asked = _choice(rng, [c for c in cfg.colors if c != o.color])
        answer = YES if asked == o.color else NO
    prompt = TEMPLATES[kind].format(shape=o.shape, color=asked)
    return _finish(
        cfg,
        scene,
        (i,),
        id=qid,
        prompt=prompt,
        answer=answer,
        level="attribute",
        kind=kind,
        split=split,
        shape=o.shape,
        asked_color=asked,
    )


def relation_question(
    rng: np.random.Generator, cfg: WorldConfig, split: str, kind: str, positive: bool, qid: str
) -> Question:
    """A spatial relation between two present objects, asked only where it is unambiguous.

    ``relation_yesno`` names a relation that clearly holds (yes) or whose opposite clearly holds (no);
    ``where`` is asked only about pairs for which exactly one of the four relations holds.

    Raises:
        RuntimeError: if no suitable scene turns up (needs max_objects >= 2; the world checks).
    """
    for _ in range(500):
        scene = sample_scene(rng, cfg, split, min_objects=2)
        n = len(scene)
        if kind == "relation_yesno":
            options = [
                (i, j, r)
                for i in range(n)
                for j in range(n)
                if i != j
                for r in scene.relations(i, j)
            ]
        else:
            options = [
                (i, j, scene.relation(i, j))
                for i in range(n)
                for j in range(n)
                if i != j and scene.relation(i, j)
            ]
        if options:
            break
    else:
        raise RuntimeError("no scene with an unambiguous pair of objects")
    i, j, rel = _choice(rng, options)
    scene = steer_colors(rng, cfg, scene, (i, j), split)
    a, b = scene.objects[i].shape, scene.objects[j].shape
    if kind == "relation_yesno":
        if not positive:
            rel = OPPOSITE[rel]  # clearly false: its opposite clearly holds
        answer = YES if scene.holds(i, rel, j) else NO
        prompt = TEMPLATES[kind].format(shape=a, phrase=RELATION_PHRASES[rel], other=b)
    else:
        answer = rel
        prompt = TEMPLATES[kind].format(shape=a, other=b)
    return _finish(
        cfg,
        scene,
        (i, j),
        id=qid,
        prompt=prompt,
        answer=answer,
        level="relation",
        kind=kind,
        split=split,
        shape=a,
        other=b,
        relation=rel,
    )


def build_question(
    rng: np.random.Generator,
    cfg: WorldConfig,
    level: str,
    kind: str,
    split: str,
    pope: str | None,
    positive: bool,
    qid: str,
    rank: Callable[[], list[str]],
) -> Question:
    """Dispatch to the builder of ``level``; arguments are validated by the world."""
    if level == "object":
        return object_question(rng, cfg, split, pope or "random", positive, qid, rank)
    if level == "attribute":
        return attribute_question(rng, cfg, split, kind, positive, qid)
    return relation_question(rng, cfg, split, kind, positive, qid)
