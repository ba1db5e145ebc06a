"""Figures of circuit analyses: patching heatmaps and per-head grids.

Both take the tidy tables of :mod:`lvlm_probe.circuits` and return a ``matplotlib.figure.Figure``
(never through pyplot, never shown), with a diverging colour scale centred on 0 so that restoring
the clean answer (1) and pushing further toward the corrupted one (negative) read apart.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import InputError
from .layers import require

CMAP = "RdBu_r"
ANNOTATE_MAX = 120  # cells per panel up to which each cell's value is written in it


def patching_heatmap(table: pd.DataFrame, value: str = "metric", title: str | None = None) -> Figure:
    """Patching results as heatmaps: layer across, positions (or heads) down.

    One panel per hook leaf (``blocks.*.hook_resid_pre``, ...). Tables of per-head names get one
    panel per (hook, positions) with heads down. Per-example tables are averaged over examples.

    Args:
        table: from :func:`lvlm_probe.circuits.patch` (columns hook, layer, positions, head, metric).
        value: the column to colour, ``"metric"`` (normalised) or ``"value"`` (raw).
        title: a figure title; default the metric's name from ``table.attrs``.

    Returns:
        A Figure.

    Raises:
        InputError: for a table without the needed columns, or no rows.

    Example:
        >>> fig = lp.viz.circuits.patching_heatmap(lp.circuits.patch(model, clean, corrupted))
    """
    require(table, ["hook", "layer", "positions", value], "patching_heatmap")
    if table.empty:
        raise InputError("patching_heatmap got an empty table")
    table = table.assign(leaf=table["hook"].map(lambda h: re.sub(r"\.\d+\.", ".*.", h)))
    has_head = "head" in table and table["head"].notna().any()
    panels = []
    positions_order = list(dict.fromkeys(table["positions"]))
    for leaf, part in table.groupby("leaf", sort=False):
        if has_head and part["head"].notna().any():
            for pos in positions_order:
                sub = part[part["positions"] == pos]
                if not sub.empty:
                    grid = sub.pivot_table(index="head", columns="layer", values=value, aggfunc="mean")
                    panels.append((f"{leaf} @ {pos}", grid, "head"))
        else:
            grid = part.pivot_table(index="positions", columns="layer", values=value, aggfunc="mean")
            grid = grid.reindex([p for p in positions_order if p in grid.index])
            panels.append((leaf, grid, "positions"))
    limit = max(1.0, float(np.nanmax(np.abs(table[value].to_numpy(dtype=float)))))
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    tallest = max(len(g) for _, g, _ in panels)
    widest = max(g.shape[1] for _, g, _ in panels)
    label_chars = max(len(str(i)) for _, g, _ in panels for i in g.index)
    fig = Figure(figsize=(cols * (0.45 * widest + 1.2 + 0.07 * label_chars) + 1.4, rows * (0.3 * tallest + 1.4)),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    image = None
    for ax, (name, grid, ylabel) in zip(axes, panels):
        image = _draw(ax, grid, limit)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    metric_name = table.attrs.get("metric_name", value)
    label = f"{metric_name} restored (1 = clean, 0 = corrupted)" if value == "metric" else metric_name
    fig.colorbar(image, ax=list(axes[:len(panels)]), label=label, shrink=0.9)
    fig.suptitle(title or "activation patching", fontsize=9)
    return fig


def head_grid(table: pd.DataFrame, value: str = "score", title: str | None = None) -> Figure:
    """A per-head value as a heatmap, layer across and head down.

    Args:
        table: one row per head, columns layer, head and ``value``: the table of
            :func:`lvlm_probe.circuits.head_attribution` or :func:`lvlm_probe.circuits.path_patch`.
        value: the column to colour.
        title: the axes title; default ``value``.

    Returns:
        A Figure.

    Raises:
        InputError: for a table without the needed columns.

    Example:
        >>> head_grid(lp.circuits.path_patch(model, clean, corrupted), "metric")
    """
    require(table, ["layer", "head", value], "head_grid")
    grid = table.pivot_table(index="head", columns="layer", values=value, aggfunc="mean")
    limit = float(np.nanmax(np.abs(grid.to_numpy(dtype=float)))) or 1.0
    fig = Figure(figsize=(0.5 * grid.shape[1] + 2.6, 0.35 * grid.shape[0] + 1.6), layout="constrained")
    ax = fig.subplots()
    image = _draw(ax, grid, limit)
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel("head", fontsize=8)
    ax.set_title(title or value, fontsize=9)
    fig.colorbar(image, ax=ax, label=value)
    return fig


def _draw(ax, grid: pd.DataFrame, limit: float):
    data = grid.to_numpy(dtype=float)
    image = ax.imshow(data, cmap=CMAP, vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns], fontsize=7)
    ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index], fontsize=7)
    if data.size <= ANNOTATE_MAX:
        for (r, c), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(v) > 0.6 * limit else "black")
    return image
