"""ShapesWorld: the public entry point tying configuration, sampling, questions and text together."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InputError
from . import sampling, text
from .concepts import NEUTRAL_PROMPT, concept_rows
from .config import make_config
from .exports import export as export_questions
from .exports import load_export as load_questions
from .pairs import BUILDERS
from .questions import Question, build_question
from .scene import Scene
from .vocab import CHANGES, DEFAULT_COLORS, KINDS, LEVELS, POPE_MODES, SHAPES, SIZES, SPLITS

# The training stream's task mix: every level, kind and POPE sampling mode, equally often.
TRAINING_MIX: tuple[tuple[str, str, str | None], ...] = (
    *(("object", "exist", mode) for mode in POPE_MODES),
    *(("attribute", kind, None) for kind in KINDS["attribute"]),
    *(("relation", kind, None) for kind in KINDS["relation"]),
)


def _count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InputError(f"n must be a non-negative int, got {n!r}")
    return int(n)


def _member(value: Any, valid: Sequence[str], what: str) -> str:
    if value not in valid:
        raise InputError(f"unknown {what} {value!r}; valid: {tuple(valid)}")
    return value


class ShapesWorld:
    """A procedural world of coloured shapes with known scene graphs and deliberate priors.

    Each shape has a typical colour (drawn with probability ``p_typical_color`` in training scenes),
    and some shapes come in co-occurring pairs (a drawn shape's partner joins with probability
    ``p_cooccur``). Everything is deterministic in ``seed`` and the arguments.

    Args:
        seed: root of every random stream (non-negative int).
        image_size: side in pixels of rendered images and bbox coordinates, in [32, 1024].
        shapes: shape names, at least 2, from ``SHAPES``.
        colors: object colour names, at least 2, from the palette (not a background colour).
        sizes: size names from ``("small", "large")``.
        max_objects: most objects per scene, in [1, min(9, len(shapes))].
        p_typical_color: probability of an object's typical colour in training scenes.
        p_cooccur: probability that a drawn shape's co-occurring partner is added.
        typical_colors: overrides of the shape -> typical colour defaults.
        cooccurring: pairs of shapes that co-occur (each shape in at most one pair); default
            heart-star, square-circle, triangle-diamond.
        background: ``"white"``, ``"black"`` or ``"gray"``.

    Raises:
        InputError: for a bad knob, naming the value and the valid range.

    Example:
        >>> world = ShapesWorld(seed=0, image_size=64)
        >>> q = world.questions(10, level="attribute", split="counterfactual")[0]
        >>> q.prompt, q.answer, q.image.size
    """

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 64,
        *,
        shapes: Sequence[str] = SHAPES,
        colors: Sequence[str] = DEFAULT_COLORS,
        sizes: Sequence[str] = SIZES,
        max_objects: int = 4,
        p_typical_color: float = 0.85,
        p_cooccur: float = 0.8,
        typical_colors: Mapping[str, str] | None = None,
        cooccurring: Iterable[tuple[str, str]] | None = None,
        background: str = "white",
    ) -> None:
        self.config = make_config(
            seed,
            image_size,
            shapes,
            colors,
            sizes,
            max_objects,
            p_typical_color,
            p_cooccur,
            typical_colors,
            cooccurring,
            background,
        )
        self._rank: list[str] | None = None

    def __repr__(self) -> str:
        c = self.config
        return (
            f"ShapesWorld(seed={c.seed}, image_size={c.image_size}, shapes={len(c.shapes)}, "
            f"colors={len(c.colors)}, max_objects={c.max_objects}, p_typical_color={c.p_typical_color}, "
            f"p_cooccur={c.p_cooccur})"
        )

    # -- priors ---------------------------------------------------------------------------------
    @property
    def typical_colors(self) -> dict[str, str]:
        """Shape -> its typical colour."""
        return self.config.typical

    @property
    def cooccurring(self) -> tuple[tuple[str, str], ...]:
        """The co-occurring shape pairs."""
        return self.config.pairs

    def shape_frequencies(self) -> dict[str, float]:
        """Fraction of training scenes containing each shape (estimated once on 20,000 scenes)."""
        return sampling.shape_frequencies(self.config)

    def popularity(self) -> list[str]:
        """Shapes from most to least frequent in training scenes (POPE's "popular" order)."""
        if self._rank is None:
            freq = self.shape_frequencies()
            self._rank = sorted(
                self.config.shapes, key=lambda s: (-freq[s], self.config.shapes.index(s))
            )
        return list(self._rank)

    # -- scenes and text ------------------------------------------------------------------------
    def scenes(self, n: int, split: str = "train") -> list[Scene]:
        """``n`` scenes of a split; scene k is the same whatever ``n`` is.

        Raises:
            InputError: for a negative n or an unknown split.
        """
        n, split = _count(n), _member(split, SPLITS, "split")
        return [
            sampling.sample_scene(
                sampling.stream(self.config, sampling.SCENES, sampling.split_id(split), k), self.config, split
            )
            for k in range(n)
        ]

    def caption(self, scene: Scene) -> str:
        """A caption mentioning every object, e.g. ``"A small red heart and a large blue square."``."""
        return text.caption(scene)

    def describe(self, scene: Scene) -> str:
        """A text-only description, e.g. ``"a small red heart left of a large blue square"``."""
        return text.describe(scene)

    def concepts(
        self, n: int, objects: int = 1, split: str = "typical", modality: str = "image",
        prompt: str = NEUTRAL_PROMPT,
    ) -> list[dict[str, Any]]:
        """Probe datasets: ``n`` scenes of ``objects`` objects as image rows or as text-only rows
        (same scenes, same labels, same ``scene`` ids); see :func:`concepts.concept_rows`.

        Example:
            >>> images = world.concepts(300, modality="image")   # rows for lp.extract
            >>> texts = world.concepts(300, modality="text")     # the same scenes, described
        """
        return concept_rows(self, n, objects=objects, split=split, modality=modality, prompt=prompt)

    def corpus(self) -> list[str]:
        """Every sentence form of prompts, answers, captions and descriptions (to train a tokenizer)."""
        return text.corpus(self.config)

    # -- questions ------------------------------------------------------------------------------
    def _check_question_args(
        self, level: str, split: str, pope: str | None, kind: str | None
    ) -> None:
        _member(level, LEVELS, "level")
        _member(split, SPLITS, "split")
        if pope is not None:
            _member(pope, POPE_MODES, "pope mode")
            if level != "object":
                raise InputError(
                    f"pope={pope!r} applies to level='object' only, got level={level!r}"
                )
            if pope == "adversarial" and not self.config.pairs:
                raise InputError(
                    "pope='adversarial' needs co-occurring pairs; this world has cooccurring=()"
                )
        if kind is not None:
            _member(kind, KINDS[level], f"kind for level {level!r}")
        if level == "relation" and self.config.max_objects < 2:
            raise InputError(
                f"relation questions need max_objects >= 2, got {self.config.max_objects}"
            )

    def questions(
        self,
        n: int,
        level: str = "object",
        split: str = "typical",
        pope: str | None = None,
        kind: str | None = None,
    ) -> list[Question]:
        """``n`` questions at one level; question k is the same whatever ``n`` is.

        Kinds cycle in a fixed order (``KINDS[level]``, or just ``kind``); yes/no kinds alternate
        yes, no, so sets are balanced. Object-level negatives are sampled by POPE's ``pope`` mode
        (default ``"random"``): a random absent shape, the most frequent absent shape, or the absent
        co-occurring partner of a present shape.

        Args:
            n: number of questions (>= 0).
            level: ``"object"``, ``"attribute"`` or ``"relation"``.
            split: ``"train"``, ``"typical"`` or ``"counterfactual"``.
            pope: ``"random"``, ``"popular"`` or ``"adversarial"`` (object level only).
            kind: one kind of the level (see ``KINDS``), or None for the fixed mix.

        Returns:
            A list of :class:`Question`.

        Raises:
            InputError: for a bad n, level, split, pope mode or kind.
        """
        n = _count(n)
        self._check_question_args(level, split, pope, kind)
        if level == "object" and pope is None:
            pope = "random"
        kinds = KINDS[level] if kind is None else (kind,)
        kind_id = 0 if kind is None else 1 + KINDS[level].index(kind)
        tag = f"s{self.config.seed}-{split}-{level}-{pope or kind or 'mix'}"
        ids = (sampling.level_id(level), sampling.split_id(split), sampling.pope_id(pope), kind_id)
        out = []
        for k in range(n):
            rng = sampling.stream(self.config, sampling.QUESTIONS, *ids, k)
            positive = (k // len(kinds)) % 2 == 0
            out.append(
                build_question(
                    rng,
                    self.config,
                    level,
                    kinds[k % len(kinds)],
                    split,
                    pope,
                    positive,
                    f"{tag}-{k}",
                    self.popularity,
                )
            )
        return out

    def training_examples(self, n: int, start: int = 0) -> list[tuple[Image.Image, str, str]]:
        """The training stream: ``n`` (image, prompt, answer) triples from the train split,
        examples ``start`` to ``start + n - 1`` of an endless stream.

        Example k draws its task uniformly from ``TRAINING_MIX`` (every level, kind and POPE mode)
        and yes or no with equal probability; it is the same whatever ``n`` and ``start`` are, so a
        trainer can read the stream in batches without holding it.

        Raises:
            InputError: for a negative n or start.
        """
        out = []
        for q in self.training_questions(n, start):
            out.append((q.image, q.prompt, q.answer))
        return out

    def training_questions(
        self, n: int, start: int = 0, mix: Sequence[Sequence[str | None]] = TRAINING_MIX
    ) -> list[Question]:
        """The questions behind :meth:`training_examples`, with their scene graphs and labels.

        Args:
            n, start: as for :meth:`training_examples`.
            mix: the (level, kind, pope mode) tasks that example k draws from uniformly; repeat a
                task to weight it. The default is every level, kind and POPE mode once.

        Raises:
            InputError: for a negative n or start, or a task of ``mix`` the world cannot ask.
        """
        n = _count(n)
        start = _count(start)
        mix = [self._training_task(m) for m in mix]
        mix = [
            m
            for m in mix
            if not (m[0] == "relation" and self.config.max_objects < 2)
            and not (m[2] == "adversarial" and not self.config.pairs)
        ]
        if not mix:
            raise InputError("mix must hold at least one task this world can ask, got none")
        out = []
        for k in range(start, start + n):
            rng = sampling.stream(self.config, sampling.TRAINING, k)
            level, kind, pope = mix[int(rng.integers(len(mix)))]
            positive = bool(rng.random() < 0.5)
            out.append(
                build_question(
                    rng,
                    self.config,
                    level,
                    kind,
                    "train",
                    pope,
                    positive,
                    f"s{self.config.seed}-train-{k}",
                    self.popularity,
                )
            )
        return out

    @staticmethod
    def _training_task(task: Sequence[str | None]) -> tuple[str, str, str | None]:
        if isinstance(task, str) or len(task) != 3:
            raise InputError(f"a training task is (level, kind, pope mode or None), got {task!r}")
        level, kind, pope = task
        _member(level, LEVELS, "level")
        _member(kind, KINDS[level], f"kind of level {level!r}")
        if level == "object":
            _member(pope, POPE_MODES, "POPE mode")
        elif pope is not None:
            raise InputError(f"only object tasks take a POPE mode, got {task!r}")
        return level, kind, pope

    def pairs(
        self, n: int, change: str = "color", split: str = "typical"
    ) -> list[tuple[Question, Question]]:
        """``n`` (clean, corrupted) pairs with the same prompt, scenes differing in one thing.

        ``color``: the asked object's colour changes (open colour question, answers are the colours).
        ``object``: the asked shape is replaced by an absent one at the same place (yes -> no).
        ``relation``: the two asked objects swap positions (yes -> no).

        Raises:
            InputError: for a bad n, change or split.
        """
        n = _count(n)
        _member(change, CHANGES, "change")
        _member(split, SPLITS, "split")
        if change == "relation" and self.config.max_objects < 2:
            raise InputError(f"relation pairs need max_objects >= 2, got {self.config.max_objects}")
        build = BUILDERS[change]
        return [
            build(
                sampling.stream(self.config, sampling.PAIRS, CHANGES.index(change), sampling.split_id(split), k),
                self.config,
                split,
                f"s{self.config.seed}-{split}-pair-{change}-{k}",
            )
            for k in range(n)
        ]

    # -- export ---------------------------------------------------------------------------------
    def export(self, folder: str | os.PathLike, questions: Iterable[Question]) -> Path:
        """Write PNGs, POPE-format ``questions.jsonl`` and ``scenes.jsonl``; see :func:`export.export`."""
        return export_questions(folder, questions)

    @staticmethod
    def load_export(folder: str | os.PathLike) -> list[Question]:
        """Read an export folder back into questions; see :func:`export.load_export`."""
        return load_questions(folder)
