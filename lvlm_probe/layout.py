"""Where image, prompt and template tokens sit in a processed example.

A :class:`TokenLayout` is computed from the processor's own output (the ``input_ids`` it produced and
the image metadata it returned), never from guessed offsets. Every position of the sequence belongs
to exactly one group:

* ``image``: the image placeholder tokens whose embeddings the model replaces with image features;
* ``prompt``: the tokens of the user's prompt text;
* ``template``: everything the chat template or processor added (BOS, role markers, separators,
  tokens around images such as Idefics3's ``<row_1_col_1>``);
* ``pad``: padding added to batch examples of different lengths.

Each image is described by an :class:`ImageLayout`: the grids its tokens form (rows x columns after
any merging, possibly several per image, e.g. LLaVA-NeXT's base image plus its high-resolution
tiles) and named separators (e.g. LLaVA-NeXT's row-end tokens), so every image position is either a
cell of a grid or a separator.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor

from .errors import LayoutError

GROUPS = ("image", "prompt", "template", "pad")

# How an image reaches the language model.
#   tokens:          image features replace placeholder tokens in the sequence (LLaVA, Qwen2-VL, ...)
#   queries:         a fixed number of learned query outputs replace placeholders (BLIP-2's Q-Former);
#                    they are not patches, so their grid is not spatial
#   cross_attention: one marker token per image; text tokens attend to the image states through
#                    cross-attention layers (Mllama)
IMAGE_MODES = ("tokens", "queries", "cross_attention")


@dataclass(frozen=True)
class ImageGrid:
    """A rectangular arrangement of image tokens.

    Attributes:
        name: what the grid is, e.g. ``"patches"``, ``"base"``, ``"tiles"``, ``"crops"``,
            ``"global"``, ``"queries"``.
        positions: ``[rows, cols]`` sequence positions of the grid's cells, row-major over the image.
        box: the region of the image the grid covers, ``(x0, y0, x1, y1)`` as fractions of width
            and height.
        spatial: False for tokens that are arranged in a row but are not image regions (queries).
    """

    name: str
    positions: Int[Tensor, "rows cols"]
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    spatial: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.positions.shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class ImageLayout:
    """The tokens that belong to one image of an example.

    Attributes:
        index: the image's index within its example.
        grids: the grids its tokens form; the finest spatial grid covering the whole image is the
            one heatmaps use by default (``grid``). A grid always has at least one row and one
            column: a family that computes a grid with a zero side (LLaVA-NeXT's tiles of a very
            thin image) leaves it out, since it holds no token, and ``main`` then falls back.
        separators: named positions that are image tokens but not grid cells (row ends).
        size: the original image's ``(height, width)`` in pixels.
        attended: for images that do not enter the sequence as patches (``queries``,
            ``cross_attention``), the grid of the image states the language model attends to, as
            ``{"name": (rows, cols), ...}``; empty otherwise.
    """

    index: int
    grids: tuple[ImageGrid, ...]
    separators: dict[str, Int[Tensor, " n"]] = field(default_factory=dict)
    size: tuple[int, int] | None = None
    main: str | None = None
    attended: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a zero-sided grid has no cells, so nothing is lost by leaving it out; keeping it would make
        # every consumer handle an empty grid (a map of no cells, a panel of no pixels)
        kept = tuple(g for g in self.grids if min(g.shape) > 0)
        if len(kept) != len(self.grids):
            object.__setattr__(self, "grids", kept)
            if self.main is not None and all(g.name != self.main for g in kept):
                object.__setattr__(self, "main", None)

    @property
    def grid_names(self) -> list[str]:
        """The names of the image's grids, in order (e.g. ``["base", "tiles"]``)."""
        return [g.name for g in self.grids]

    def grid_named(self, name: str) -> ImageGrid:
        """The grid called ``name``.

        Raises:
            LayoutError: if the image has no grid of that name (the message lists the ones it has).
        """
        for g in self.grids:
            if g.name == name:
                return g
        have = ", ".join(f"{g.name} {g.shape[0]}x{g.shape[1]}" for g in self.grids) or "none"
        raise LayoutError(f"image {self.index} has no grid {name!r}; its grids: {have}")

    @property
    def positions(self) -> Int[Tensor, " n"]:
        """All sequence positions of this image, sorted."""
        parts = [g.positions.reshape(-1) for g in self.grids] + list(self.separators.values())
        if not parts:
            return torch.empty(0, dtype=torch.long)
        return torch.cat(parts).sort().values

    @property
    def grid(self) -> ImageGrid | None:
        """The grid heatmaps are drawn on by default: the family's ``main`` grid (the finest spatial
        grid covering the whole image, e.g. LLaVA-NeXT's tiles), else the spatial grid with the
        most cells (LLaVA-NeXT's base grid where its tiles grid has a zero side); None when the
        image has no spatial grid in the sequence."""
        if self.main is not None:
            return next(g for g in self.grids if g.name == self.main)
        spatial = [g for g in self.grids if g.spatial]
        return max(spatial, key=lambda g: g.positions.numel()) if spatial else None


@dataclass(frozen=True)
class TokenLayout:
    """Position groups of one processed example.

    Attributes:
        length: sequence length (including padding).
        groups: ``{"image" | "prompt" | "template" | "pad": LongTensor of positions}``, a partition
            of ``range(length)``.
        images: one :class:`ImageLayout` per image of the example, in prompt order.
        image_mode: how images reach the language model (see ``IMAGE_MODES``).
        tokens: the token strings, for display.
        prompt: the user's prompt text.
        prompt_spans: ``[n_prompt, 2]`` character span in ``prompt`` of each prompt token (clipped
            to the prompt), aligned with ``groups["prompt"]``.
    """

    length: int
    groups: dict[str, Int[Tensor, " n"]]
    images: tuple[ImageLayout, ...]
    image_mode: str
    tokens: tuple[str, ...]
    prompt: str
    prompt_spans: Int[Tensor, "n 2"]

    def positions(self, group: str) -> Int[Tensor, " n"]:
        """Sequence positions of a group: ``"image"``, ``"prompt"``, ``"template"``, ``"pad"`` or
        ``"all"`` (every non-pad position).

        Raises:
            LayoutError: for an unknown group name.
        """
        if group == "all":
            return torch.cat([self.groups[g] for g in GROUPS if g != "pad"]).sort().values
        if group not in self.groups:
            raise LayoutError(f"unknown position group {group!r}; expected one of {GROUPS + ('all',)}")
        return self.groups[group]

    def mask(self, group: str) -> torch.Tensor:
        """Boolean ``[length]`` mask of a group's positions."""
        mask = torch.zeros(self.length, dtype=torch.bool)
        mask[self.positions(group)] = True
        return mask

    @property
    def image_grids(self) -> list[tuple[int, int]]:
        """``(rows, cols)`` of each image's heatmap grid, in image order (``(0, 0)`` if it has none)."""
        return [img.grid.shape if img.grid is not None else (0, 0) for img in self.images]

    def word_positions(self, word: str) -> Int[Tensor, " n"]:
        """Positions of every prompt token that overlaps an occurrence of ``word`` in the prompt
        (all its sub-tokens; whole-word, case-insensitive matches).

        Raises:
            LayoutError: if the word does not occur in the prompt.
        """
        import re

        spans = [m.span() for m in re.finditer(rf"\b{re.escape(word)}\b", self.prompt, re.IGNORECASE)]
        if not spans:
            raise LayoutError(f"word {word!r} does not occur in the prompt {self.prompt!r}")
        keep = torch.zeros(len(self.prompt_spans), dtype=torch.bool)
        for start, end in spans:
            keep |= (self.prompt_spans[:, 0] < end) & (self.prompt_spans[:, 1] > start)
        return self.groups["prompt"][keep]

    def describe_images(self) -> str:
        """One line per image: its grids and separators, e.g. ``base 4x4 + tiles 8x6 + 8 newline``."""
        lines = []
        for img in self.images:
            parts = [f"{g.name} {g.shape[0]}x{g.shape[1]}" for g in img.grids]
            parts += [f"{len(p)} {name}" for name, p in img.separators.items() if len(p)]
            parts += [f"attends {name} {r}x{c}" for name, (r, c) in img.attended.items()]
            lines.append(" + ".join(parts))
        return "\n".join(lines)

    def summary(self) -> str:
        counts = ", ".join(f"{g}={len(self.groups[g])}" for g in GROUPS)
        grids = "; ".join(self.describe_images().splitlines())
        return f"TokenLayout(length={self.length}, {counts}, images=({grids}), mode={self.image_mode})"

    __repr__ = summary


def grid_from_run(
    positions: Int[Tensor, " n"], rows: int, cols: int, name: str = "patches", **kwargs
) -> ImageGrid:
    """An :class:`ImageGrid` from ``rows * cols`` row-major positions."""
    if positions.numel() != rows * cols:
        raise LayoutError(
            f"grid {name!r} of {rows}x{cols} needs {rows * cols} positions, got {positions.numel()}"
        )
    return ImageGrid(name=name, positions=positions.reshape(rows, cols), **kwargs)


def locate_prompt(
    tokenizer, ids: list[int], start: int, prompt: str
) -> tuple[list[int], list[tuple[int, int]]]:
    """Find the tokens that spell ``prompt`` in ``ids[start:]``.

    The tail is decoded once per token to get each token's character span; tokens that overlap the
    first occurrence of the prompt text belong to the prompt. Decoding (rather than re-tokenizing
    the prompt) keeps the result exact whatever merges happened at the template boundaries.

    Returns:
        (positions, spans): sequence positions of the prompt tokens and each one's character span
        within ``prompt``.

    Raises:
        LayoutError: if the prompt text cannot be found in the decoded tail.
    """
    tail = ids[start:]
    if not prompt or not tail:
        return [], []
    pieces = [tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
              for t in tail]
    text = tokenizer.decode(tail, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if "".join(pieces) == text:
        ends = torch.tensor([len(p) for p in pieces]).cumsum(0).tolist()
    else:
        # Context-dependent pieces (sentencepiece's leading space) or characters split across
        # byte-level tokens: decode growing prefixes. A prefix that ends inside a character decodes
        # to a trailing U+FFFD; that token gets zero width and joins the token that completes it.
        ends = []
        for k in range(len(tail)):
            prefix = tokenizer.decode(tail[: k + 1], skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False)
            ends.append(max(len(prefix.rstrip("\ufffd")), ends[-1] if ends else 0))
    target = prompt
    at = text.find(target)
    if at < 0:
        target = prompt.strip()
        at = text.find(target)
    if at < 0:
        raise LayoutError(
            f"could not find the prompt {prompt!r} in the processed text {text!r}; the processor "
            "changed the prompt text (normalisation?), so prompt positions cannot be derived"
        )
    offset = prompt.find(target)
    stop = at + len(target)
    begins = [0] + ends[:-1]
    inside = [b < stop and e > at and e > b for b, e in zip(begins, ends)]
    for k in range(len(tail) - 2, -1, -1):  # zero-width tokens belong with the token after them
        if begins[k] == ends[k]:
            inside[k] = inside[k + 1]
    positions, spans = [], []
    for k, (b, e) in enumerate(zip(begins, ends)):
        if inside[k]:
            lo, hi = (max(b, at), min(e, stop)) if e > b else (max(b, at),) * 2
            positions.append(start + k)
            spans.append((lo - at + offset, hi - at + offset))
    return positions, spans
