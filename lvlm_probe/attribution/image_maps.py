"""Patch- and word-level maps of a target's score, with captum's algorithms.

Features are the cells of each image's heatmap grid (``ImageLayout.grid``) and the words of the
prompt (all their sub-tokens together); the template and any other image tokens (tiles beside the
base grid, row separators) always stay. The score is the one of :func:`source_split` (log-odds of
target against foil, else log-probability, at the last position). Methods:

* ``"ablation"``: captum's ``FeatureAblation``: each feature removed alone, hidden from every query
  at every layer as in :func:`source_split`;
* ``"shapley"``: captum's ``ShapleyValueSampling`` over the same removals; the values of one example
  add up to ``score(all) - score(none)`` exactly (every sampled permutation telescopes);
* ``"ig"``: captum's ``IntegratedGradients`` along a path that moves each feature's tokens in the
  language model's input embeddings (after image features are merged) from a baseline, the mean
  over the example's image cells (for a cell) or prompt words (for a word), to their value;
  ``.delta`` is captum's completeness error. This is not pixel-space IG from a black image: the
  vision tower and projector are not on the path.
* ``"kernelshap"``: captum's ``KernelShap`` over the same removals (a weighted linear fit to
  sampled coalitions; ``n_samples`` coalitions);
* ``"attention"``: the attention from the last position to each feature's tokens, averaged over
  heads and layers (no gradient, one forward pass);
* ``"rollout"``: attention rollout (Abnar & Zuidema 2020): per layer the head-averaged pattern
  mixed half and half with the identity (the residual connection), rows renormalised, multiplied
  through the layers; the last position's row, summed over each feature's tokens.

Scores map back onto each image's grid (``.scores`` for the first image, ``.grids`` for all).

Which grid: an image can form several grids (LLaVA-NeXT's base image and its tiles, a tiled
family's ``tile_r_c`` grids and thumbnail). ``grid=None`` maps the finest grid covering the whole
image (``ImageLayout.grid``: LLaVA-NeXT's tiles, InternVL's thumbnail), which falls back to the base
grid where the tiles grid has no cells (a very thin image); ``grid="base"``, ``grid="tile_0_1"``, ...
map another one. The other grids' tokens and the separators (row-end newlines) stay visible, as the
template does: each grid is a complete view of its part of the image, so a cell's score is what that
cell adds given every other view the model has. Where two grids show the same region (the base
grid and the tiles), that redundancy makes the mapped grid's scores smaller than hiding the whole
region would; map the other grid to see its share. The result and its figure name the mapped grid
and what stayed visible.

What was explained: the result records the model (``model_name``), the score of the full input
(``values``: the log-odds of target against foil, else the target's log-probability), the target's
log-probability and the model's own answer at that position (its top next token, with its
probability), read from a forward pass the method already makes on the full input (one extra pass
only for KernelSHAP when its samples miss it). The figure states them, and says so when the model's
answer is not the target.
"""
from __future__ import annotations

import contextlib
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from captum.attr import FeatureAblation, IntegratedGradients, KernelShap, ShapleyValueSampling
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor

from ..errors import InputError, LayoutError
from ..hooks import attention
from .generation import continuation_ids, teacher_forced
from .groups import repeat_inputs
from .results import AttributionResult, legacy_calls, moved_to_keywords, number, seeded
from .targets import Answer, target_ids

METHODS = ("ablation", "shapley", "kernelshap", "ig", "attention", "rollout")
# What each method's scores are, for figure titles.
DESCRIPTIONS = {
    "ablation": "feature ablation (each cell or word hidden from attention alone)",
    "shapley": "Shapley value sampling (cells and words hidden from attention)",
    "kernelshap": "KernelSHAP (cells and words hidden from attention)",
    "ig": "integrated gradients on the LM's input embeddings from a group-mean baseline (each cell or "
          "word moves from the mean of the example's cells or words; not pixel IG)",
    "attention": "attention from the last position, mean over heads and layers (no target)",
    "rollout": "attention rollout from the last position (no target)",
}
# What a cell's colour measures, for the colour bar (``{score}``: the explained score).
UNITS = {
    "ablation": "drop in {score} when hidden (nats)",
    "shapley": "Shapley value of {score} (nats)",
    "kernelshap": "KernelSHAP value of {score} (nats)",
    "ig": "IG attribution to {score} (nats)",
    "attention": "attention weight from the last position",
    "rollout": "attention rollout share from the last position",
}


@dataclass(frozen=True)
class Features:
    """The features of one example: which sequence positions each one covers."""

    positions: list[Tensor]
    names: list[str]
    cells: list[tuple[int, int, int]]  # (image, row, col) of each image feature, in order
    grids: list[tuple[int, int]]
    n_image: int
    mapped: list[str | None] = field(default_factory=list)  # the mapped grid's name, per image


@dataclass(frozen=True)
class ImageMap(AttributionResult):
    """Maps of a batch, and what they explain.

    Attributes:
        scores: ``[batch, rows, cols]`` of each example's first image (NaN where an example's grid
            is smaller than the batch's largest).
        grids: per example, one ``[rows, cols]`` array per image.
        words: per example, ``(word, score)`` of each prompt word.
        delta: IG's completeness error per example (else None).
        images: the examples' first images, for :meth:`plot`.
        model_name: the model's name or path (its checkpoint folder's name, a hub id, or its class).
        grid: the ``grid=`` asked for (None: each image's default grid).
        grid_names: per example, the name of the grid mapped on each image (e.g. ``["tiles"]``).
        values: ``[batch]`` the explained score of the full input: the target's log-odds against
            the foil, else its log-probability (:attr:`value_kind`).
        target_logprobs: ``[batch]`` the target's log-probability on the full input.
        model_answers: the model's own answer at the scored position (its top next token), decoded.
        model_answer_ids, model_answer_probs: ``[batch]`` that token's id and probability.
        method: the method used (one of ``METHODS``); targets, foils, their ids and the layouts:
            see :class:`~lvlm_probe.attribution.results.AttributionResult`.
    """

    scores: Tensor
    grids: list[list[np.ndarray]]
    words: list[list[tuple[str, float]]]
    delta: Tensor | None = None
    images: list = field(default_factory=list, repr=False)
    model_name: str | None = None
    grid: str | None = None
    grid_names: list[list[str]] = field(default_factory=list)
    values: Tensor | None = None
    target_logprobs: Tensor | None = None
    model_answers: list[str] | None = None
    model_answer_ids: Tensor | None = None
    model_answer_probs: Tensor | None = None

    # -- what was explained -----------------------------------------------------------------------
    @property
    def value_kind(self) -> str:
        """What :attr:`values` (and every score-based map) measures: ``"log-odds(target vs foil)"``
        with a foil, else ``"log p(target)"`` (natural logarithms)."""
        return "log-odds(target vs foil)" if self.foils is not None else "log p(target)"

    @property
    def unit(self) -> str:
        """What a cell's value measures, with its unit (the figure's colour-bar label)."""
        return UNITS.get(self.method, self.method).format(score=self.value_kind)

    def answer_differs(self, example: int) -> bool:
        """Whether the model's own top next token is not the scored target."""
        if self.model_answer_ids is None or self.target_ids is None:
            return False
        return int(self.model_answer_ids[example]) != int(self.target_ids[example])

    def visible(self, example: int, image: int = 0) -> str:
        """The image tokens that stayed visible while the mapped grid's cells were scored: the
        image's other grids and its separators (e.g. ``"base 4x4, 6 newline"``), or ``""``."""
        if example >= len(self.layouts) or image >= len(self.layouts[example].images):
            return ""
        img = self.layouts[example].images[image]
        mapped = self.grid_names[example][image] if self.grid_names else None
        parts = [f"{g.name} {g.shape[0]}x{g.shape[1]}" for g in img.grids if g.name != mapped]
        parts += [f"{len(p)} {name}" for name, p in img.separators.items() if len(p)]
        return ", ".join(parts)

    def explained(self, example: int) -> str:
        """One line: the model, the explained value and the model's own answer with its
        probability, e.g. ``model: shapes-llava | log-odds(target vs foil) = 2.31 | model's answer:
        'red' (p = 0.91)``."""
        parts = [f"model: {self.model_name}"] if self.model_name else []
        if self.values is not None:
            parts.append(f"{self.value_kind} = {float(self.values[example]):.3g}")
        if self.model_answers is not None and self.model_answer_probs is not None:
            parts.append(f"model's answer: {self._answer(example)} "
                         f"(p = {float(self.model_answer_probs[example]):.3g})")
        return " | ".join(parts)

    def mismatch(self, example: int) -> str:
        """A warning when the model's answer is not the target, else ``""``."""
        if not self.answer_differs(example) or self.targets is None:
            return ""
        logp = f" (log p = {float(self.target_logprobs[example]):.3g})" if self.target_logprobs is not None else ""
        return (f"The model answers {self._answer(example)}, not the target "
                f"{self.targets[example].strip()!r}{logp}: this map explains the score of an answer the "
                "model does not give.")

    def metadata(self, example: int = 0) -> dict[str, str]:
        """What the map of one example explains, as strings for a saved figure's PNG text chunks
        (``viz.save_figure(fig, path, metadata=maps.metadata(0))``)."""
        about = {"model": self.model_name or "", "method": self.method,
                 "question": self.prompts[example] if example < len(self.layouts) else "",
                 "target": self.targets[example].strip() if self.targets is not None else "",
                 "foil": self.foils[example].strip() if self.foils is not None else "",
                 "grid": self.grid_names[example][0] if self.grid_names and self.grid_names[example] else ""}
        if self.values is not None:
            about[self.value_kind] = f"{float(self.values[example]):.6g}"
        if self.model_answers is not None:
            about["model answer"] = self.model_answers[example].strip()
            about["model answer probability"] = f"{float(self.model_answer_probs[example]):.6g}"
        return about

    def _answer(self, example: int) -> str:
        """The model's answer quoted, with its token id where the token alone decodes to no
        readable text (a byte of a longer character, whitespace)."""
        text = self.model_answers[example].strip()
        if not text or "\ufffd" in text:
            return f"{text!r} (token {int(self.model_answer_ids[example])})"
        return repr(text)

    # -- views ------------------------------------------------------------------------------------
    # the library's one print format (``AttributionResult.__repr__``), defined in the class body so
    # the dataclass decorator keeps it instead of generating one that dumps tensors
    __repr__ = AttributionResult.__repr__
    __str__ = AttributionResult.__str__

    def _summary(self) -> list[str]:
        """The mapped grids, the model, the explained values and the model's answers (the first
        three examples), and how many answers differ from the target."""
        n = len(self.grids)
        shapes = list(dict.fromkeys(tuple(g.shape) for per in self.grids for g in per[:1]))
        names = list(dict.fromkeys(per[0] for per in self.grid_names if per))
        parts = [f"grids {shapes[:3]}{' ...' if len(shapes) > 3 else ''}"
                 + (f" ({', '.join(names)})" if names else "")]
        if self.model_name:
            parts.append(f"model {self.model_name!r}")
        if self.values is None or self.model_answers is None:
            return parts
        shown = min(n, 3)
        more = ", ..." if n > shown else ""
        parts.append(f"{self.value_kind} " + ", ".join(number(v) for v in self.values[:shown]) + more)
        answers = ", ".join(f"{self._answer(i)} (p={float(self.model_answer_probs[i]):.2g})" for i in range(shown))
        differ = sum(self.answer_differs(i) for i in range(n))
        parts.append(f"model's answers {answers}{more}"
                     + (f" ({differ} of {n} not the target)" if differ else ""))
        return parts

    def to_frame(self) -> pd.DataFrame:
        """One row per (example, feature): ``example``, ``target``, ``foil``, ``method``, ``kind``
        (``"cell"`` or ``"word"``), ``image``, ``grid`` (the mapped grid's name, cells), ``row``,
        ``col`` (cells), ``word`` (words) and ``value``; then what was explained, the same on every
        row of an example: ``model``, ``question``, ``full`` (the score of the full input, as
        :func:`source_split` names it), ``model_answer`` and ``model_answer_prob``."""
        answers = self.answers()
        rows = []
        for i, per_image in enumerate(self.grids):
            for k, grid in enumerate(per_image):
                name = self.grid_names[i][k] if self.grid_names else None
                for (r, c), value in np.ndenumerate(grid):
                    rows.append(dict(example=i, kind="cell", image=k, grid=name, row=r, col=c, word=None,
                                     value=float(value)))
            for word, value in self.words[i]:
                rows.append(dict(example=i, kind="word", image=None, grid=None, row=None, col=None, word=word,
                                 value=float(value)))
        columns = ["example", "kind", "image", "grid", "row", "col", "word", "value"]
        table = pd.DataFrame(rows, columns=columns)
        table = table.merge(answers[["example", "target", "foil"]], on="example", how="left")
        table.insert(3, "method", self.method)
        n = len(self.grids)
        about = pd.DataFrame({
            "example": range(n), "model": [self.model_name] * n,
            "question": self.prompts if len(self.layouts) == n else [None] * n,
            "full": self.values.tolist() if self.values is not None else [None] * n,
            "model_answer": self.model_answers if self.model_answers is not None else [None] * n,
            "model_answer_prob": (self.model_answer_probs.tolist() if self.model_answer_probs is not None
                                  else [None] * n)})
        table = table.merge(about, on="example", how="left")
        return table[["example", "target", "foil", "method", "kind", "image", "grid", "row", "col", "word",
                      "value", "model", "question", "full", "model_answer", "model_answer_prob"]]

    def plot(self, example: int = 0) -> Figure:
        """The first image with the map overlaid, and the prompt words coloured by their scores.

        The title names the method, the question, the target (and foil), the model, the explained
        value and the model's own answer with its probability; the left panel names the mapped grid
        and what stayed visible; the colour bar says what the colour measures (:attr:`unit`). When
        the model's answer is not the target, a red line under the panels says so.
        """
        grid = self.grids[example][0]
        warning = self.mismatch(example)
        fig = Figure(figsize=(7.0, 4.2 if warning else 3.9))
        left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
        limit = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 0.0
        limit = limit or 1.0
        if self.images and self.images[example] is not None:
            image = self.images[example]
            left.imshow(image)
            extent = self._extent(example, image.size)
            shown = left.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.55, extent=extent,
                                interpolation="nearest")
            left.set_xlim(0, image.size[0])
            left.set_ylim(image.size[1], 0)
        else:
            shown = left.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit)
        left.set_xticks([])
        left.set_yticks([])
        left.set_title(self._grid_title(example), fontsize=7)
        bar = fig.colorbar(shown, ax=left, fraction=0.046)
        bar.set_label(textwrap.fill(self.unit, 34), fontsize=7)
        bar.ax.tick_params(labelsize=6)
        words = self.words[example]
        wlimit = max([abs(s) for _, s in words] + [1e-12])
        right.set_axis_off()
        x, y = 0.0, 0.9
        for word, score in words:
            color = colormaps["RdBu_r"](0.5 + 0.4 * score / wlimit)  # the map's colours, kept readable
            right.text(x, y, word, fontsize=9, bbox=dict(facecolor=color, edgecolor="none", pad=1.5),
                       transform=right.transAxes)
            x += 0.03 + 0.022 * len(word)
            if x > 0.85:
                x, y = 0.0, y - 0.12
        right.set_title("prompt words (same colour scale, own range)", fontsize=7)
        self._title(fig, example)
        if warning:
            fig.text(0.5, 0.015, textwrap.fill(warning, 120), ha="center", va="bottom", fontsize=7,
                     color="tab:red", fontweight="bold")
        fig.tight_layout(rect=(0, 0.07 if warning else 0, 1, 1))
        return fig

    def _title(self, fig: Figure, example: int) -> None:
        """The suptitle: the method, question and target (:meth:`title`), then :meth:`explained`."""
        fontsize = 7
        width = max(30, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
        head = self.title(example, f"image map: {DESCRIPTIONS.get(self.method, self.method)}", width=width)
        line = self.explained(example)
        fig.suptitle(head + ("\n" + textwrap.fill(line, width) if line else ""), fontsize=fontsize)

    def _grid_title(self, example: int) -> str:
        """The left panel's title: the mapped grid and what stayed visible."""
        if not self.grid_names or not self.grid_names[example]:
            return f"{self.method}: image cells"
        rows, cols = self.grids[example][0].shape
        title = f"{self.method}: grid {self.grid_names[example][0]!r} {rows}x{cols}"
        kept = self.visible(example)
        return title + (f"\n(visible throughout: {kept})" if kept else "")

    def _extent(self, example: int, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """Where the mapped grid lies on the image, in pixels ``(left, right, bottom, top)``: the
        grid's box (a tile covers part of the image)."""
        width, height = size
        box = (0.0, 0.0, 1.0, 1.0)
        if self.grid_names and example < len(self.layouts) and self.layouts[example].images:
            img = self.layouts[example].images[0]
            box = img.grid_named(self.grid_names[example][0]).box
        x0, y0, x1, y1 = box
        return (x0 * width, x1 * width, y1 * height, y0 * height)


def features(layout, grid: str | None = None) -> Features:
    """One feature per cell of every image's mapped grid, then one per prompt word.

    Args:
        layout: an example's :class:`~lvlm_probe.layout.TokenLayout`.
        grid: the name of the grid mapped on every image, or None for each image's default
            (``ImageLayout.grid``: the finest grid covering the whole image).

    Raises:
        LayoutError: if an image has no grid named ``grid``.
    """
    positions, names, cells, grids, mapped = [], [], [], [], []
    for img in layout.images:
        grid_of = img.grid if grid is None else img.grid_named(grid)
        if grid_of is None or not grid_of.spatial:
            grids.append((0, 0))
            mapped.append(None)
            continue
        mapped.append(grid_of.name)
        rows, cols = grid_of.shape
        grids.append((rows, cols))
        for r in range(rows):
            for c in range(cols):
                positions.append(grid_of.positions[r, c].reshape(1))
                names.append(f"image{img.index}[{r},{c}]")
                cells.append((img.index, r, c))
    n_image = len(positions)
    _words(layout, positions, names)
    return Features(positions, names, cells, grids, n_image, mapped)


def _words(layout, positions: list[Tensor], names: list[str]) -> None:
    """Append one feature per prompt word (all its sub-tokens together)."""
    prompt = layout.groups["prompt"]
    for match in re.finditer(r"\w+", layout.prompt):
        start, end = match.span()
        keep = (layout.prompt_spans[:, 0] < end) & (layout.prompt_spans[:, 1] > start)
        if bool(keep.any()):
            positions.append(prompt[keep])
            names.append(match.group())


@legacy_calls(moved_to_keywords(3, ["foil"]), "image_map(model, batch, target, foil=..., method=...)")
def image_map(
    model, batch, target: Answer | list[Answer] | None = None, *, foil: Answer | list[Answer] | None = None,
    method: str = "ig", n_steps: int = 256, n_samples: int = 25, seed: int = 0, grid: str | None = None,
    batch_size: int = 16, continuation: Any = None, token: int | None = None,
) -> ImageMap:
    """Score every image cell and prompt word of each example for the target (see module docstring).

    The features are the cells of each image's mapped grid and the prompt's words. The score is
    the target's log-odds against the foil (else its log-probability) at the last position.

    The mapped grid (``grid=None``): the finest grid covering the whole image (LLaVA-NeXT's tiles,
    Idefics3's crops, a tiled family's thumbnail), falling back to the base grid where the finest
    one has no cells (LLaVA-NeXT's tiles of a very thin image). The other grids' tokens and the
    separators (LLaVA-NeXT's base grid and row-end newlines) stay visible throughout, like the
    template: each grid is a whole view of its region, so a cell's score is what it adds given
    every other view (see the module docstring). ``result.grid_names`` and the figure say which
    grid was mapped.

    ``method="ig"`` (the default) is integrated gradients in the language model's input-embedding
    space, not in pixel space: along the path, the embeddings of each feature's tokens move from a
    group-mean baseline (the mean over the example's image cells, for a cell; over its prompt
    words, for a word) to their actual value, and the gradient is taken with respect to those
    gates. It is not pixel IG from a black image (the vision tower and projector are not on the
    path), and its zero is "this cell looks like the average cell", not "no image".

    Args:
        model: an :class:`~lvlm_probe.LVLM` whose images enter the token sequence.
        batch: from ``model.prepare``.
        target: the answer scored, one or one per example (as in :func:`source_split`).
        foil: an alternative answer for log-odds, or None for the target's log-probability.
        method: one of ``METHODS``: ``"ig"`` (above), ``"ablation"``, ``"shapley"``,
            ``"kernelshap"`` (features hidden from attention), ``"attention"``, ``"rollout"``
            (attention weights: the target is validated but does not change the map).
        n_steps: IG's integration steps (trapezoid rule). The score can change steeply along the
            path (attention saturating); 256 keep the completeness error under 1% on shapes-llava.
        n_samples: Shapley sampling's permutations; KernelShap's coalitions (at least twice the
            feature count).
        seed: for the sampled methods (their draws never touch torch's global random state).
        grid: the name of the grid to map on every image (``layout.images[k].grid_names``, e.g.
            ``"base"``, ``"tiles"``, ``"tile_0_1"``, ``"thumbnail"``), or None for the default above.
        batch_size: copies of the example per forward pass: the perturbed coalitions of
            ``"ablation"``, ``"shapley"`` and ``"kernelshap"`` (one per row) and IG's integration
            steps. Peak memory grows with it (IG also keeps each row's autograd graph); at 7B widths
            one row costs about a forward pass's memory (``docs/scaling.md``, section 5).
        continuation, token: map token ``token`` (0-based) of a continuation of each example (a
            string or list of token ids per example, e.g. ``model.generation(batch).token_ids``)
            instead of the next token after the prompt: the continuation's tokens before it are
            appended to the input (teacher-forced, part of the template: always visible) and the
            target defaults to the token itself.

    Returns:
        An :class:`ImageMap`, with what it explains: the model's name, the full input's score
        (``values``), the target's log-probability and the model's own answer with its probability.

    Raises:
        InputError: for an unknown method, a family whose images are not in the sequence, an
            example without grid cells, a ``grid`` some image does not have (the message lists the
            grids it has) or that is not spatial, bad targets, no target without a continuation,
            or a ``token`` that is not an index into every example's continuation.

    Example:
        >>> maps = lp.attribution.image_map(model, batch, target="red", method="ablation")
        >>> maps.scores[0]   # [rows, cols]
        >>> maps.plot(0)
        >>> image_map(model, batch, target="red", grid="base")   # LLaVA-NeXT: the base grid
        >>> image_map(model, batch, continuation="a small red heart", token=2, method="ablation")
    """
    if continuation is not None:
        batch, target = _continued(model, batch, target, continuation, token)
    elif target is None or token is not None:
        raise InputError("image_map needs a target, or a continuation and the index of its token "
                         f"to map (got target={target!r}, token={token!r}, no continuation)")
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; available: {METHODS}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer (rows per forward pass), got {batch_size!r}")
    if grid is not None and not isinstance(grid, str):
        raise InputError(f"grid must be a grid's name (e.g. 'base', 'tiles') or None, got {grid!r}")
    if model.family.image_mode != "tokens":
        raise InputError(f"image_map needs image tokens in the sequence; {model.family.name}'s images "
                         f"enter by {model.family.image_mode}")
    _check_separable(batch)
    targets, foils, ids = target_ids(model, batch, target, foil)
    grids, words, deltas, mapped, full = [], [], [], [], []
    for i, layout in enumerate(batch.layouts):
        feats = _mapped_features(layout, grid, i)
        if feats.n_image == 0:
            reason = ("its images have no spatial grid (their tokens are not laid out as image "
                      "regions, e.g. a generic adapter's non-square run)" if layout.images
                      else "it has no image")
            raise InputError(f"image maps need a spatial grid of image tokens; example {i}: {reason} "
                             f"(layout: {layout.summary()})")
        score = _Score(model, batch, i, ids[i], bool(foils), feats)
        values, delta = _attribute(score, method, len(feats.positions), n_steps, n_samples, seed, batch_size)
        per_image = [np.full(g, np.nan) for g in feats.grids]
        for (img, r, c), v in zip(feats.cells, values[: feats.n_image]):
            per_image[img][r, c] = v
        grids.append(per_image)
        words.append(list(zip(feats.names[feats.n_image:], values[feats.n_image:].tolist())))
        deltas.append(delta)
        mapped.append([name or "" for name in feats.mapped])
        full.append(score.full_logprobs())
    rows = max(g[0].shape[0] for g in grids)
    cols = max(g[0].shape[1] for g in grids)
    scores = torch.full((len(batch), rows, cols), float("nan"))
    for i, g in enumerate(grids):
        scores[i, : g[0].shape[0], : g[0].shape[1]] = torch.as_tensor(g[0])
    firsts = [imgs[0] if imgs else None for imgs in batch.images]
    logprobs = torch.stack(full)  # [batch, vocab] of the full inputs
    examples = torch.arange(len(batch))
    target_logprobs = logprobs[examples, ids[:, 0].cpu()]
    values = target_logprobs - logprobs[examples, ids[:, 1].cpu()] if foils else target_logprobs
    best, answer_ids = logprobs.max(dim=-1)
    return ImageMap(scores, grids, words, torch.tensor(deltas) if method == "ig" else None, firsts,
                    model_name=model_name(model), grid=grid, grid_names=mapped, values=values,
                    target_logprobs=target_logprobs,
                    model_answers=[model.tokenizer.decode([int(t)]) for t in answer_ids],
                    model_answer_ids=answer_ids, model_answer_probs=best.exp(),
                    method=method, targets=targets, foils=foils, target_ids=ids[:, 0],
                    foil_ids=ids[:, 1] if foils else None, layouts=list(batch.layouts))


def _continued(model, batch, target, continuation, token):
    """The batch extended by each continuation's tokens before ``token``, and the target (by
    default that token of each continuation)."""
    ids = continuation_ids(model, batch, continuation)
    if isinstance(token, bool) or not isinstance(token, int) or token < 0:
        raise InputError(f"token must be the index (an int >= 0) of the continuation's token to map, got {token!r}")
    short = [(i, len(row)) for i, row in enumerate(ids) if token >= len(row)]
    if short:
        i, n = short[0]
        raise InputError(f"token {token} is past the continuation of example {i}, which has {n} tokens "
                         f"({model.tokenizer.convert_ids_to_tokens(ids[i])})")
    extended = teacher_forced(model, batch, [row[:token] for row in ids])
    return extended, [row[token] for row in ids] if target is None else target


def model_name(model) -> str:
    """The model's name for titles: its folder's name for a local checkpoint (``shapes-llava``),
    the hub id, else the model's class."""
    spec = getattr(getattr(model, "source", None), "name_or_path", None)
    if spec:
        path = Path(str(spec))
        return path.name if path.is_dir() else str(spec)
    return type(model.hf).__name__


def _mapped_features(layout, grid: str | None, example: int) -> Features:
    """:func:`features` with a ``grid`` the images lack, or one that is not spatial, named as the
    user's input error."""
    try:
        feats = features(layout, grid)
    except LayoutError as err:
        raise InputError(f"grid={grid!r}: example {example}: {err}; pass one of those names, or "
                         "grid=None for each image's default (the finest grid covering the whole "
                         "image)") from None
    if grid is not None:
        flat = [img.index for img, name in zip(layout.images, feats.mapped) if name is None]
        if flat:
            raise InputError(f"grid={grid!r}: example {example}: image {flat[0]}'s grid {grid!r} is not "
                             "spatial (its tokens are not image regions, e.g. Q-Former queries), so it "
                             f"cannot be mapped; the image's grids: {layout.images[flat[0]].grid_names}")
    return feats


def _check_separable(batch) -> None:
    """Examples are scored one at a time; inputs packed across examples cannot be split."""
    n = len(batch)
    packed = [k for k, v in batch.inputs.items() if torch.is_tensor(v) and v.shape[0] != n]
    if n > 1 and packed:
        raise InputError(f"this family packs {packed} across the examples of a batch; call image_map "
                         "with one example per batch")


class _Score:
    """The target's score for feature gates ``[m, F]`` (1 = present), in one batched pass."""

    def __init__(self, model, batch, index: int, ids: Tensor, with_foil: bool, feats: Features):
        self.model, self.ids, self.with_foil, self.feats = model, ids, with_foil, feats
        self.batch, self.index = batch, index
        # the example alone (a one-example batch as it is: its inputs may be packed, see _check_separable)
        self.example = batch.inputs if len(batch) == 1 else {
            k: v[index:index + 1] if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
        length = self.batch.input_ids.shape[1]
        self.member = torch.zeros(len(feats.positions), length)  # feature x position
        for f, pos in enumerate(feats.positions):
            self.member[f, pos] = 1.0
        self.full: Tensor | None = None  # [vocab] last-position log-probabilities, full input

    def remember(self, gates: Tensor | None, logits: Tensor) -> None:
        """Keep the full input's last-position log-probabilities (every gate 1; ``gates=None``: a
        pass without gates) from a pass the method makes anyway, so reporting what was explained
        and the model's own answer costs no extra forward pass."""
        if self.full is not None:
            return
        row = 0
        if gates is not None:
            whole = (gates == 1).all(dim=1).nonzero()
            if not len(whole):
                return
            row = int(whole[0])
        self.full = torch.log_softmax(logits[row, -1].detach().float(), dim=-1).cpu()

    def full_logprobs(self) -> Tensor:
        """``[vocab]`` the full input's last-position log-probabilities (one pass if no pass of the
        method evaluated the full input, as KernelSHAP's sampled coalitions may not)."""
        if self.full is None:
            with torch.no_grad():
                self.remember(None, self.model.run(self.inputs(1), last_position=True).logits)
        return self.full

    def inputs(self, m: int) -> dict:
        """The example's inputs, ``m`` times."""
        return repeat_inputs(self.example, m, self.model.family.packed_inputs)

    def score(self, logits: Tensor) -> Tensor:
        logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1)
        value = logprobs[:, self.ids[0]]
        return value - logprobs[:, self.ids[1]] if self.with_foil else value

    def removed(self, gates: Tensor) -> Tensor:
        """Remove (hide) the tokens of features whose gate is 0."""
        hidden = ((1.0 - gates.float().cpu()) @ self.member) > 0.5
        with torch.no_grad(), attention.hiding_positions(self.model, hidden.to(self.model.device)):
            logits = self.model.run(self.inputs(len(gates)), last_position=True).logits
        self.remember(gates, logits)
        return self.score(logits).cpu()

    def scaled(self, gates: Tensor) -> Tensor:
        """Move each feature's tokens in the language model's input from a baseline (the mean of its
        group: image cells or prompt words) to their value by its gate (differentiable)."""
        member = self.member.to(gates.device)
        gate = 1.0 - member.sum(0) + gates @ member  # [m, L]: 1 outside the features
        image = member[: self.feats.n_image].sum(0) > 0
        words = member[self.feats.n_image:].sum(0) > 0
        layer0 = self.model.module(f"{self.model.family.lm_layers}.0")

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            base = hidden.clone()
            for group in (image, words):
                if bool(group.any()):
                    base[:, group] = hidden[:, group].mean(1, keepdim=True)
            moved = base + gate[..., None].to(hidden.dtype) * (hidden - base)
            if args:
                return (moved, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": moved}

        handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            logits = self.model.run(self.inputs(len(gates)), last_position=True).logits
        finally:
            handle.remove()
        self.remember(gates, logits)
        return self.score(logits)

    def patterns(self) -> Tensor:
        """``[layer, query, key]`` head-averaged attention of the example, self-attention layers."""
        names = [f"blocks.{layer}.attn.hook_pattern"
                 for layer in self.model.family.self_attention_layers(self.model.config)]
        with self.model.capture(names) as cache, torch.no_grad():
            self.remember(None, self.model.run(self.inputs(1), last_position=True).logits)
        return torch.stack([cache[n][0].float().mean(0) for n in names]).cpu()

    def attention_to(self) -> np.ndarray:
        pattern = self.patterns()[:, -1].mean(0)  # the last position's row, mean over layers
        return (self.member @ pattern).numpy()

    def rollout(self) -> np.ndarray:
        patterns = self.patterns()
        eye = torch.eye(patterns.shape[-1])
        flow = eye
        for layer in patterns:
            mixed = 0.5 * layer + 0.5 * eye
            flow = (mixed / mixed.sum(-1, keepdim=True)) @ flow
        return (self.member @ flow[-1]).numpy()


@contextlib.contextmanager
def _weights_frozen(module: torch.nn.Module):
    """The weights out of autograd for the block (restored after): IG needs the gradient of the
    score with respect to the gates only, and with trainable weights autograd would also keep
    every layer's inputs for their gradients, and the vision tower's whole graph, which at 7B
    widths is most of a step's memory."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _attribute(score: _Score, method: str, n_features: int, n_steps: int, n_samples: int, seed: int,
               batch_size: int):
    ones = torch.ones(1, n_features)
    if method == "attention":
        return score.attention_to(), None
    if method == "rollout":
        return score.rollout(), None
    if method == "ig":
        ig = IntegratedGradients(score.scaled)
        with torch.enable_grad(), _weights_frozen(score.model.hf):
            values, delta = ig.attribute(ones.to(score.model.device), baselines=0.0 * ones.to(score.model.device),
                                         n_steps=n_steps, method="riemann_trapezoid",
                                         return_convergence_delta=True, internal_batch_size=batch_size)
        return values[0].detach().cpu().numpy(), float(delta[0])
    mask = torch.arange(n_features)[None]
    if method == "ablation":
        values = FeatureAblation(score.removed).attribute(ones, baselines=0.0, feature_mask=mask,
                                                          perturbations_per_eval=min(n_features, batch_size))
    elif method == "shapley":
        with seeded(seed, score.model):  # captum samples from torch's global generator
            values = ShapleyValueSampling(score.removed).attribute(ones, baselines=0.0, feature_mask=mask,
                                                                   n_samples=n_samples,
                                                                   perturbations_per_eval=min(n_features, batch_size))
    else:
        with seeded(seed, score.model):
            values = KernelShap(score.removed).attribute(ones, baselines=0.0, feature_mask=mask,
                                                         n_samples=max(n_samples, 2 * n_features),
                                                         perturbations_per_eval=min(n_features, batch_size))
    return values[0].numpy(), None
