"""ShapesWorld: controlled scenes of coloured shapes, questions at three levels, counterfactual pairs.

Example:
    >>> from lvlm_probe.worlds import ShapesWorld
    >>> world = ShapesWorld(seed=0, image_size=64)
    >>> qs = world.questions(200, level="attribute", split="counterfactual")
    >>> qs[0].image, qs[0].prompt, qs[0].answer, qs[0].scene.objects[qs[0].about[0]]
"""

from .exports import export, load_export
from .questions import Question
from .scene import Obj, Scene
from .vocab import (
    CHANGES,
    DEFAULT_COLORS,
    DEFAULT_COOCCURRING,
    DEFAULT_TYPICAL_COLORS,
    KINDS,
    LEVELS,
    PALETTE,
    POPE_MODES,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
)
from .world import TRAINING_MIX, ShapesWorld

__all__ = [
    "CHANGES",
    "DEFAULT_COLORS",
    "DEFAULT_COOCCURRING",
    "DEFAULT_TYPICAL_COLORS",
    "KINDS",
    "LEVELS",
    "PALETTE",
    "POPE_MODES",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TRAINING_MIX",
    "Obj",
    "Question",
    "Scene",
    "ShapesWorld",
    "export",
    "load_export",
]
