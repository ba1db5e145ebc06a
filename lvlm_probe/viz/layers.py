"""Figures over layers: probe accuracy through the three towers, per-head heatmaps, alignment curves.

Every function takes a tidy DataFrame (one row per measurement, as :func:`lvlm_probe.probing.sweep`
and :mod:`lvlm_probe.alignment` return) and returns a matplotlib Figure; nothing calls
``plt.show()``, so figures can be saved, embedded in a report or shown by a notebook. Figures are
built as ``matplotlib.figure.Figure`` objects, not through pyplot, so no backend is chosen or changed.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import InputError

# The order a forward pass crosses the towers, left to right on a layer axis.
TOWERS = ("vision", "vision_global", "qformer", "projector", "lm")
TOWER_LABELS = {"vision": "vision tower", "vision_global": "global vision", "qformer": "Q-Former",
                "projector": "projector", "lm": "language model"}


def require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise InputError naming the missing columns of a results table."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{what} needs columns {list(columns)}; the table lacks {missing} "
                         f"(it has {list(df.columns)})")


def tower_axis(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``x``: one position per (tower, layer) in forward order, the towers side by side.

    The projector has no layers and takes one position; a tower's layers keep their order.
    """
    require(df, ["tower", "layer"], "a layer axis")
    unknown = sorted(set(df["tower"]) - set(TOWERS))
    if unknown:
        raise InputError(f"unknown tower(s) {unknown}; expected {list(TOWERS)}")
    keys = (df[["tower", "layer"]].drop_duplicates()
            .assign(order=lambda t: t["tower"].map(TOWERS.index), layer_=lambda t: t["layer"].fillna(-1))
            .sort_values(["order", "layer_"]))
    keys["x"] = np.arange(len(keys))
    return df.merge(keys[["tower", "layer", "x"]], on=["tower", "layer"], how="left")


def _tower_spans(ax, placed: pd.DataFrame) -> None:
    """Shade alternate towers and label each at the top of the axes."""
    for i, (tower, part) in enumerate(sorted(placed.groupby("tower"), key=lambda t: TOWERS.index(t[0]))):
        lo, hi = part["x"].min() - 0.5, part["x"].max() + 0.5
        if i % 2 == 0:
            ax.axvspan(lo, hi, color="0.93", zorder=0)
        ax.text((lo + hi) / 2, 1.01, TOWER_LABELS[tower], transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8)


def layer_curves(results: pd.DataFrame, chance: float | None = None) -> Figure:
    """Probe accuracy (with its confidence band) and control accuracy against layer, through the
    vision tower, projector and language model; selectivity below. One colour per target.

    Args:
        results: a sweep's table (columns tower, layer, target, accuracy, and optionally
            ci_low, ci_high, control_accuracy, selectivity). Per-head rows (non-null ``head``)
            are left out: see :func:`head_heatmap`.
        chance: draws a dotted line at this accuracy when given.

    Returns:
        A Figure with one or two axes (the second when selectivity is present).

    Example:
        >>> fig = layer_curves(lp.probing.sweep(store, target="color"))
        >>> fig.savefig("emergence.png")
    """
    require(results, ["tower", "layer", "target", "accuracy"], "layer_curves")
    rows = results[results["head"].isna()] if "head" in results else results
    if rows.empty:
        raise InputError("layer_curves got no per-layer rows (every row has a head)")
    placed = tower_axis(rows)
    with_selectivity = "selectivity" in placed and placed["selectivity"].notna().any()
    fig = Figure(figsize=(max(6.0, 0.22 * placed["x"].nunique() + 2), 5.5 if with_selectivity else 3.6))
    axes = fig.subplots(2 if with_selectivity else 1, 1, sharex=True, squeeze=False)[:, 0]
    for target, part in placed.groupby("target", sort=True):
        part = part.sort_values("x")
        (line,) = axes[0].plot(part["x"], part["accuracy"], marker=".", label=f"{target}")
        if {"ci_low", "ci_high"} <= set(part):
            axes[0].fill_between(part["x"], part["ci_low"], part["ci_high"], color=line.get_color(), alpha=0.2)
        if "control_accuracy" in part and part["control_accuracy"].notna().any():
            axes[0].plot(part["x"], part["control_accuracy"], ls="--", color=line.get_color(),
                         label=f"{target} (control)")
        if with_selectivity:
            axes[1].plot(part["x"], part["selectivity"], marker=".", color=line.get_color(), label=f"{target}")
    if chance is not None:
        axes[0].axhline(chance, ls=":", color="0.4", label="chance")
    axes[0].set_ylabel("probe accuracy")
    axes[0].legend(fontsize=7, ncol=2)
    if with_selectivity:
        axes[1].axhline(0.0, color="0.4", lw=0.8)
        axes[1].set_ylabel("selectivity")
    for ax in axes:
        _tower_spans(ax, placed)
    _ticks(axes[-1], placed)
    fig.tight_layout()
    return fig


def _ticks(ax, placed: pd.DataFrame) -> None:
    """Label each position with its layer; the projector "proj", the embeddings "embed"."""
    ticks = placed.drop_duplicates("x").sort_values("x")
    labels = ["proj" if tower == "projector" else "embed" if pd.isna(layer) else str(int(layer))
              for tower, layer in zip(ticks["tower"], ticks["layer"])]
    ax.set_xticks(ticks["x"], labels, fontsize=7, rotation=90)
    ax.set_xlabel("layer")


def head_heatmap(results: pd.DataFrame, target: str | None = None, value: str = "selectivity") -> Figure:
    """A layer x head heatmap of one value of a per-head sweep.

    Args:
        results: a sweep's table with per-head rows (non-null ``head``).
        target: which target to show; may be omitted when the table has one.
        value: the column to colour by (``"accuracy"``, ``"selectivity"``, ...).

    Raises:
        InputError: without per-head rows, for an unknown value column, or an ambiguous target.
    """
    require(results, ["layer", "head", "target", value], "head_heatmap")
    rows = results[results["head"].notna()]
    targets = sorted(rows["target"].unique())
    if not targets:
        raise InputError("head_heatmap needs per-head rows; run the sweep with heads=True")
    if target is None and len(targets) > 1:
        raise InputError(f"the table holds targets {targets}; pass target=")
    target = targets[0] if target is None else target
    rows = rows[rows["target"] == target]
    if rows.empty:
        raise InputError(f"no per-head rows for target {target!r}; the table has {targets}")
    grid = rows.pivot_table(index="layer", columns="head", values=value, aggfunc="mean").sort_index()
    fig = Figure(figsize=(0.35 * grid.shape[1] + 2.5, 0.3 * grid.shape[0] + 1.5))
    ax = fig.subplots()
    image = ax.imshow(grid.to_numpy(), aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(grid.shape[1]), [str(int(h)) for h in grid.columns], fontsize=7)
    ax.set_yticks(range(grid.shape[0]), [str(int(la)) for la in grid.index], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{target}: {value} per head", fontsize=9)
    fig.colorbar(image, ax=ax, label=value)
    fig.tight_layout()
    return fig


def alignment_curves(table: pd.DataFrame, ylabel: str = "alignment", chance: float | None = None) -> Figure:
    """Alignment against layer, one line per metric (columns layer, metric, value; optional tower).

    Also draws transfer accuracies (one line per direction, ``ylabel="transfer accuracy"``), with a
    dotted line at ``chance`` when given.

    Example:
        >>> alignment_curves(lp.alignment.alignment_curve(image_states, text_states, metric="cka"))
    """
    require(table, ["layer", "metric", "value"], "alignment_curves")
    placed = tower_axis(table) if "tower" in table else table.assign(x=table["layer"])
    fig = Figure(figsize=(6, 3.4))
    ax = fig.subplots()
    for metric, part in placed.groupby("metric", sort=True):
        part = part.sort_values("x")
        ax.plot(part["x"], part["value"], marker=".", label=str(metric))
    if chance is not None:
        ax.axhline(chance, ls=":", color="0.4", label="chance")
    if "tower" in table:
        _tower_spans(ax, placed)
        _ticks(ax, placed)
    else:
        ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def layer_map(matrix: np.ndarray, row_label: str = "vision layer", col_label: str = "LM layer",
              title: str = "linear CKA") -> Figure:
    """A layer x layer similarity map, e.g. CKA between vision-tower and language-model layers.

    Args:
        matrix: ``[rows, cols]`` values.
    """
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2:
        raise InputError(f"layer_map needs a 2-D matrix, got shape {matrix.shape}")
    fig = Figure(figsize=(0.3 * matrix.shape[1] + 2.5, 0.3 * matrix.shape[0] + 1.8))
    ax = fig.subplots()
    image = ax.imshow(matrix, origin="lower", aspect="auto", cmap="magma", vmin=0.0,
                      vmax=max(1.0, float(np.nanmax(matrix))))
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig
