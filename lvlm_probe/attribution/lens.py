"""The logit lens (nostalgebraist 2020; for image tokens, Neo et al. 2024, "Towards Interpreting
Visual Information Processing in Vision-Language Models"): every layer's residual stream decoded
through the final norm and the unembedding, as if the model stopped there.

At the last layer this is the model's own output (the final norm, the unembedding and any final
soft cap are applied as the model applies them), so the lens's last layer equals the logits.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from matplotlib.figure import Figure
from torch import Tensor

from ..errors import InputError
from .results import AttributionResult, count, legacy_calls, moved_to_keywords, number


def unembed(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """Logits from residual-stream states: final norm, unembedding, and the final logit scale and
    soft cap that the model's forward applies (the family's ``final_logit_scale``, e.g. Cohere's,
    and ``final_logit_softcap``, e.g. PaliGemma's), in float32."""
    norm = model.module(model.family.lm_norm)
    head = model.module(model.family.lm_head)
    with torch.no_grad():
        logits = head(norm(resid.to(model.dtype))).float()
    scale = model.family.final_logit_scale(model.config)
    if scale is not None:
        logits = logits * scale
    cap = model.family.final_logit_softcap(model.config)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


# The plot's size limits: a figure at most this wide (inches), whatever the number of grids and
# tokens; cells at most this large; text positions wrapped into rows of at most this many cells.
MAX_WIDTH = 16.0
MAX_HEIGHT = 12.0
MAX_CELL = 0.55
STRIP_COLUMNS = 24
# Below this cell size (inches) a cell's token is too small to read and is left out.
MIN_TEXT_CELL = 0.3


@dataclass(frozen=True)
class _Panel:
    """One panel of :meth:`LogitLens.plot`: values and labels laid out as the panel shows them."""

    title: str
    probs: np.ndarray  # [rows, cols] top-1 probability, NaN where no kept position is
    words: list[list[str]]  # [rows][cols] the label of each cell ("" where none)
    strip: bool = False  # positions outside the image grids, wrapped into rows


@dataclass(frozen=True, repr=False)  # AttributionResult.__repr__ prints a summary
class LogitLens(AttributionResult):
    """Top-k decoded tokens per layer and kept position (no target: ``targets`` is None).

    Attributes:
        top_ids: ``[layer, batch, pos, k]`` token ids, most probable first.
        top_probs: ``[layer, batch, pos, k]`` their probabilities.
        positions: ``[batch, pos]`` sequence positions kept, ``-1`` at padding.
        layers: the layer index of each entry of the first axis.
        tokenizer: to turn ids into strings (:meth:`tokens`).
        grids: ``(rows, cols)`` of each example's first image's heatmap grid (None without an
            image); :meth:`plot` draws every grid of every image from the layouts.
        layouts, method: see :class:`~lvlm_probe.attribution.results.AttributionResult`.
    """

    top_ids: Int[Tensor, "layer batch pos k"]
    top_probs: Float[Tensor, "layer batch pos k"]
    positions: Int[Tensor, "batch pos"]
    layers: list[int]
    tokenizer: Any
    grids: list[tuple[int, int] | None]

    def tokens(self, layer: int, example: int) -> list[str]:
        """The top-1 token of every kept position of one example at one layer (index into ``layers``)."""
        keep = self.positions[example] >= 0
        ids = self.top_ids[layer, example, keep, 0].tolist()
        return [self.tokenizer.decode([i]) for i in ids]

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, example, kept position, rank): ``layer``, ``example``, ``position``
        (in the sequence), ``rank`` (0 = most probable), ``token_id``, ``token`` and ``prob``."""
        n_layers, n, n_pos, k = self.top_ids.shape
        index = pd.MultiIndex.from_product([range(n_layers), range(n), range(n_pos), range(k)],
                                           names=["layer", "example", "slot", "rank"])
        table = pd.DataFrame({"token_id": self.top_ids.reshape(-1).numpy(),
                              "prob": self.top_probs.reshape(-1).float().numpy()}, index=index).reset_index()
        table["position"] = self.positions[table["example"], table["slot"]].numpy()
        table = table[table["position"] >= 0].drop(columns="slot").reset_index(drop=True)
        table["layer"] = np.asarray(self.layers)[table["layer"]]
        vocabulary = {i: self.tokenizer.decode([i]) for i in table["token_id"].unique().tolist()}
        table["token"] = table["token_id"].map(vocabulary)
        return table[["layer", "example", "position", "rank", "token_id", "token", "prob"]]

    def _summary(self) -> list[str]:
        """The lens's size, and at the last layer the mean top-1 probability and the most
        frequent top-1 token over every kept position of every example."""
        n_layers, _, n_pos, k = self.top_ids.shape
        parts = [f"{count(n_layers, 'layer')} x {count(n_pos, 'position')}, top-{k}"]
        keep = self.positions >= 0
        ids = self.top_ids[-1, :, :, 0][keep].tolist()
        if ids:
            token, times = Counter(ids).most_common(1)[0]
            mean = float(self.top_probs[-1, :, :, 0][keep].float().mean())
            parts.append(f"layer {self.layers[-1]}: mean top-1 probability {number(mean)}, most frequent top-1 "
                         f"{self.tokenizer.decode([token])!r} ({times} of {count(len(ids), 'position')})")
        return parts

    def plot(self, example: int = 0, layer: int = -1) -> Figure:
        """The top-1 token at one layer and its probability, at every kept position of one example.

        Each grid of each image is drawn as that grid (one panel per grid: LLaVA-NeXT's base image
        and its tiles are two panels), cells where the grid's position was not kept left blank;
        every other kept position (text, template, an image's separators) is drawn in a strip
        below, in sequence order, each cell naming its input token and the lens's top token. The
        figure is at most ``MAX_WIDTH`` inches wide: cells shrink, and the strip wraps into rows.

        Args:
            example: which example (an index into the batch).
            layer: which layer (an index into :attr:`layers`, ``-1`` the last).

        Raises:
            InputError: for an example or layer out of range, or an example with no kept position.
        """
        n_layers, n = len(self.layers), self.top_ids.shape[1]
        if not isinstance(example, int) or not -n <= example < n:
            raise InputError(f"example must be an index in [0, {n}), got {example!r}")
        if not isinstance(layer, int) or not -n_layers <= layer < n_layers:
            raise InputError(f"layer must be an index into the lens's {n_layers} layers {self.layers} "
                             f"(-1: the last), got {layer!r}")
        example, layer = range(n)[example], range(n_layers)[layer]
        panels = self._panels(example, layer)
        if not panels:
            raise InputError(f"example {example} has no position in this lens (its selector kept none); "
                             "plot another example or run logit_lens with other positions=")
        fig, axes, cell = _panel_figure(panels)
        for ax, panel in zip(axes, panels):
            image = _draw_panel(ax, panel, cell)
        fig.colorbar(image, ax=axes, label=f"top-1 probability at layer {self.layers[layer]}", shrink=0.8)
        self.suptitle(fig, example, f"logit lens at layer {self.layers[layer]}: each position's most probable "
                                    "next token, shaded by its probability (no target)", fontsize=7)
        return fig

    def _panels(self, example: int, layer: int) -> list[_Panel]:
        """The panels of one example at one layer: one per image grid holding a kept position,
        then one strip of the other kept positions."""
        slots = {p: slot for slot, p in enumerate(self.positions[example].tolist()) if p >= 0}
        probs = self.top_probs[layer, example, :, 0].float().numpy()
        words = [_label(self.tokenizer.decode([i])) for i in self.top_ids[layer, example, :, 0].tolist()]
        layout = self.layouts[example] if example < len(self.layouts) else None
        panels, in_grids = [], set()
        for image in layout.images if layout is not None else ():
            for grid in image.grids:
                cells = grid.positions.tolist()
                in_grids.update(p for row in cells for p in row)
                if not any(p in slots for row in cells for p in row):
                    continue
                rows, cols = grid.shape
                kind = "" if grid.spatial else ", not image regions"
                panels.append(_Panel(
                    title=f"image {image.index}: {grid.name} {rows}x{cols}{kind}",
                    probs=np.array([[probs[slots[p]] if p in slots else np.nan for p in row] for row in cells]),
                    words=[[words[slots[p]] if p in slots else "" for p in row] for row in cells]))
        # padding is no input: a lens over every position decodes it, the plot leaves it out
        pad = set(layout.groups.get("pad", torch.empty(0)).tolist()) if layout is not None else set()
        rest = sorted(p for p in slots if p not in in_grids and p not in pad)
        if rest:
            tokens = layout.tokens if layout is not None else ()
            labels = [f"{_label(tokens[p])[:6] if p < len(tokens) else p}\n{words[slots[p]][:6]}" for p in rest]
            cols = min(len(rest), STRIP_COLUMNS)
            rows = -(-len(rest) // cols)
            values = np.full(rows * cols, np.nan)
            values[:len(rest)] = [probs[slots[p]] for p in rest]
            labels += [""] * (rows * cols - len(rest))
            panels.append(_Panel(
                title=f"other positions ({len(rest)}, in sequence order): input token / top-1 token",
                probs=values.reshape(rows, cols), words=[labels[r * cols:(r + 1) * cols] for r in range(rows)],
                strip=True))
        return panels


def _panel_figure(panels: list[_Panel]) -> tuple[Figure, list, float]:
    """A figure with the image grids side by side in a top row and the strip (the last panel when
    it is one) below, sized so cells are square and the figure stays within the size limits;
    with its axes (one per panel) and the side of a cell in inches."""
    strip = panels[-1] if panels[-1].strip else None
    grids = panels[:-1] if strip is not None else panels
    grid_cols = sum(p.probs.shape[1] for p in grids) + 1.2 * max(len(grids) - 1, 0)
    grid_rows = max((p.probs.shape[0] for p in grids), default=0)
    strip_cols, strip_rows = strip.probs.shape[::-1] if strip is not None else (0, 0)
    width_cells = max(grid_cols, strip_cols)
    height_cells = grid_rows + strip_rows
    # room for the titles, the colour bar and the suptitle around the cells
    cell = min(MAX_CELL, (MAX_WIDTH - 2.0) / width_cells, (MAX_HEIGHT - 2.0) / max(height_cells, 1))
    fig = Figure(figsize=(max(4.0, min(MAX_WIDTH, cell * width_cells + 2.0)), cell * height_cells + 2.0),
                 layout="constrained")
    rows = [r for r in (grid_rows, strip_rows) if r]
    # the grids take their share of the width and an empty column the rest, so their cells are
    # as large as the strip's
    widths = [p.probs.shape[1] for p in grids]
    widths += [width_cells - grid_cols] if width_cells > grid_cols or not widths else []
    spec = fig.add_gridspec(len(rows), len(widths), height_ratios=rows, width_ratios=widths)
    axes = [fig.add_subplot(spec[0, k]) for k in range(len(grids))]
    if strip is not None:
        axes.append(fig.add_subplot(spec[len(rows) - 1, :]))
    return fig, axes, cell


def _label(token: str) -> str:
    """A token as a cell shows it: stripped, control characters escaped (fonts have no glyph)."""
    token = token.strip()
    return token if token.isprintable() else repr(token)[1:-1]


def _draw_panel(ax, panel: _Panel, cell: float):
    """Draw one panel's probabilities as cells, with each cell's label where it is readable."""
    image = ax.imshow(panel.probs, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    if cell >= MIN_TEXT_CELL:
        size = min(6.0, 12.0 * cell)
        lines = max(1 + word.count("\n") for row in panel.words for word in row)
        for (r, c), word in np.ndenumerate(np.array(panel.words, dtype=object)):
            if word:
                # white on the dark end of the colour map, where black would not be read
                ax.text(c, r, word, ha="center", va="center", fontsize=size / (1 if lines == 1 else 1.3),
                        color="white" if panel.probs[r, c] > 0.6 else "black")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(panel.title, fontsize=7)
    return image


@legacy_calls(moved_to_keywords(2, ["positions", "k"]), "logit_lens(model, batch, positions=..., k=...)")
def logit_lens(model, batch, *, positions: Any = "image", k: int = 5) -> LogitLens:
    """Decode every layer's residual stream at some positions through the final norm and unembedding.

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        batch: from ``model.prepare``.
        positions: a position selector (see :mod:`lvlm_probe.hooks.selectors`), default the image tokens.
        k: how many top tokens to keep per position.

    Returns:
        A :class:`LogitLens`; one layer is decoded at a time and only its top ``k`` kept, so the
        memory never holds ``[layer, pos, vocab]``.

    Raises:
        InputError: for ``k`` outside ``[1, vocab]``; position errors as in ``model.capture``.

    Example:
        >>> lens = lp.attribution.logit_lens(model, batch, positions="image", k=5)
        >>> lens.tokens(layer=-1, example=0)
    """
    if not isinstance(k, int) or not 1 <= k <= model.d_vocab:
        raise InputError(f"k must be an integer in [1, {model.d_vocab}], got {k!r}")
    with model.capture("blocks.*.hook_resid_post", positions=positions) as cache:
        model.forward(batch, last_position=True)  # values come from the hooks
    kept = cache.positions()
    if kept is None:  # positions="all": every position of the padded batch
        n, length = batch.input_ids.shape
        kept = torch.arange(length).expand(n, length).clone()
    top_ids, top_probs = [], []
    for layer in range(model.n_layers):
        probs = torch.softmax(unembed(model, cache[f"blocks.{layer}.hook_resid_post"]), dim=-1)
        values, ids = probs.topk(k, dim=-1)
        top_ids.append(ids.cpu())
        top_probs.append(values.cpu())
    return LogitLens(torch.stack(top_ids), torch.stack(top_probs), kept.cpu(), list(range(model.n_layers)),
                     model.tokenizer, [lay.image_grids[0] if lay.image_grids else None for lay in batch.layouts],
                     method="logit_lens", layouts=list(batch.layouts))
