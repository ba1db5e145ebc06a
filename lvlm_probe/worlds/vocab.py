"""The fixed vocabulary of ShapesWorld: shapes, colours, sizes, relations, levels and prompt templates.

Everything a prompt, an answer, a caption or a description can contain is built from the names and
templates here, so the text side of the world stays small and closed (a tiny tokenizer covers it).
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "diamond",
    "hexagon",
)

# Colour names and RGB values. The first six are the default object colours; the rest can be chosen
# as object colours or backgrounds. Values are far apart so a colour stays recognisable at 32 px.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
    "pink": (245, 130, 190),
    "brown": (130, 80, 30),
    "cyan": (20, 200, 210),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
DEFAULT_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray")

SIZES: tuple[str, ...] = ("small", "large")

# The colour each shape usually has in the training distribution.
DEFAULT_TYPICAL_COLORS: dict[str, str] = {
    "heart": "red",
    "star": "yellow",
    "circle": "blue",
    "square": "green",
    "triangle": "orange",
    "cross": "purple",
    "diamond": "purple",
    "hexagon": "green",
}
# Shape pairs that usually appear together. Two shapes stay unpaired, so co-occurrence also makes
# the paired shapes more frequent, which gives POPE's "popular" sampling something to find.
DEFAULT_COOCCURRING: tuple[tuple[str, str], ...] = (
    ("heart", "star"),
    ("square", "circle"),
    ("triangle", "diamond"),
)

# Relation answer words, and how each is phrased inside a yes/no prompt.
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
RELATION_PHRASES: dict[str, str] = {
    "left": "left of",
    "right": "right of",
    "above": "above",
    "below": "below",
}
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "above": "below", "below": "above"}

LEVELS: tuple[str, ...] = ("object", "attribute", "relation")
SPLITS: tuple[str, ...] = ("train", "typical", "counterfactual")
POPE_MODES: tuple[str, ...] = ("random", "popular", "adversarial")
KINDS: dict[str, tuple[str, ...]] = {
    "object": ("exist",),
    "attribute": ("color", "size", "color_yesno"),
    "relation": ("relation_yesno", "where"),
}
CHANGES: tuple[str, ...] = ("color", "object", "relation")

TEMPLATES: dict[str, str] = {
    "exist": "Is there a {shape} in the image? Answer yes or no.",
    "color": "What color is the {shape}? Answer with one word.",
    "size": "Is the {shape} small or large?",
    "color_yesno": "Is the {shape} {color}? Answer yes or no.",
    "relation_yesno": "Is the {shape} {phrase} the {other}? Answer yes or no.",
    "where": "Where is the {shape} relative to the {other}? Answer left, right, above or below.",
}
YES, NO = "yes", "no"
