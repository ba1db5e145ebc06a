"""Concept datasets for probes: the same scenes as images and as text-only descriptions.

A probe asks whether a concept (the shape, colour or size of an object, the relation between two
objects) is linearly decodable from activations. The cleanest labels come from scenes that hold
exactly the objects the concept is about: one object for shape, colour and size, two for relation.
Each scene gives one row per modality with the same ``scene`` id and labels:

* ``modality="image"``: the rendered scene with a neutral prompt (no concept named in it), so
  whatever a probe decodes at the image tokens came from the image;
* ``modality="text"``: no image, the scene's description as the prompt (``"a small red heart"``),
  so the same concepts arrive through words: the pair of datasets for cross-modal transfer.
"""
from __future__ import annotations

from typing import Any

from ..errors import InputError
from . import sampling, text

# The prompt of image rows: the reference model's caption instruction, which names no concept.
NEUTRAL_PROMPT = "Describe the image."
MODALITIES = ("image", "text")
CONCEPTS = 6  # purpose id of the concept streams (after sampling's purposes 1-5)


def concept_rows(
    world: Any, n: int, objects: int = 1, split: str = "typical", modality: str = "image",
    prompt: str = NEUTRAL_PROMPT,
) -> list[dict[str, Any]]:
    """``n`` dataset rows, scene k the same for both modalities and whatever ``n`` is.

    Args:
        world: a :class:`~lvlm_probe.worlds.ShapesWorld`.
        n: number of scenes.
        objects: objects per scene: 1 (shape, colour, size labels) or 2 (also ``relation``, of the
            first object to the second, when exactly one relation holds; else None).
        split: ``"train"``, ``"typical"`` or ``"counterfactual"`` colour priors.
        modality: ``"image"`` or ``"text"`` (see the module docstring).
        prompt: the prompt of image rows.

    Returns:
        Rows ``{"id", "scene", "image", "prompt", "shape", "color", "size", "relation",
        "n_objects", "modality"}`` for :func:`lvlm_probe.extract`; ``shape``/``color``/``size``
        describe the first object.

    Raises:
        InputError: for a bad modality, object count or split.
    """
    if modality not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    if objects not in (1, 2) or objects > world.config.max_objects:
        raise InputError(f"objects must be 1 or 2 (and at most the world's max_objects="
                         f"{world.config.max_objects}), got {objects!r}")
    if split not in ("train", "typical", "counterfactual"):
        raise InputError(f"unknown split {split!r}; expected train, typical or counterfactual")
    cfg, rows = world.config, []
    for k in range(int(n)):
        rng = sampling.stream(cfg, CONCEPTS, sampling.split_id(split), objects, k)
        scene = sampling.sample_scene(rng, cfg, split, min_objects=objects, max_objects=objects)
        first = scene.objects[0]
        scene_id = f"s{cfg.seed}-{split}-concept{objects}-{k}"
        rows.append({
            "id": f"{scene_id}-{modality}",
            "scene": scene_id,
            "image": scene.render() if modality == "image" else None,
            "prompt": prompt if modality == "image" else text.describe(scene),
            "shape": first.shape,
            "color": first.color,
            "size": first.size,
            "relation": scene.relation(0, 1) if objects == 2 else None,
            "n_objects": len(scene),
            "modality": modality,
        })
    return rows
