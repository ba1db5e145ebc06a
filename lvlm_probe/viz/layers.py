"""Figures over layers: probe accuracy through the three towers, per-head heatmaps, alignment curves.

Every function takes a tidy DataFrame (one row per measurement, as :func:`lvlm_probe.probing.sweep`
and :mod:`lvlm_probe.alignment` return) and returns a matplotlib Figure; nothing calls
``plt.show()``, so figures can be saved, embedded in a report or shown by a notebook. Figures are
built as ``matplotlib.figure.Figure`` objects, not through pyplot, so no backend is chosen or changed.
"""
from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
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


def _span(values: pd.Series, spec: str = "") -> str:
    """One value, or ``low-high`` where the rows differ (e.g. n_test per hook)."""
    values = values.dropna()
    if values.empty:
        return "?"
    low, high = values.min(), values.max()
    if spec == "" and float(low).is_integer() and float(high).is_integer():
        low, high = int(low), int(high)
    return f"{low:{spec}}" if low == high else f"{low:{spec}}-{high:{spec}}"


def sample_title(table: pd.DataFrame, width: int | None = None) -> str:
    """What a sweep's figure was measured on, per target: ``color: n train 32, test 8, chance
    0.33`` (the parts the table has columns for; targets separated by ``;``), wrapped at ``width``
    characters when given.

    A figure of accuracies means little without its test size (10 test images make 1.000 common)
    and its chance level, so every sweep figure carries them.
    """
    if "target" not in table:
        return ""
    parts = []
    for target, part in table.groupby("target", sort=True):
        bits = []
        if {"n_train", "n_test"} <= set(part):
            bits.append(f"n train {_span(part['n_train'])}, test {_span(part['n_test'])}")
        if "chance" in part and part["chance"].notna().any():
            bits.append(f"chance {_span(part['chance'], '.2f')}")
        parts.append(f"{target}: {', '.join(bits)}" if bits else str(target))
    text = "; ".join(parts)
    return textwrap.fill(text, width=width) if width else text


def _suptitle(fig: Figure, what: str, table: pd.DataFrame, fontsize: float = 9) -> None:
    """``what | target: n train, test, chance`` as the figure's title, wrapped to its width."""
    about = sample_title(table)
    width = max(30, int(fig.get_figwidth() * 72 / (0.6 * fontsize)) - 6)  # characters per line
    fig.suptitle(textwrap.fill(f"{what} | {about}" if about else what, width=width), fontsize=fontsize)


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

    The title names each target with its train and test sizes and chance level (from the
    ``n_train``, ``n_test`` and ``chance`` columns, where the table has them).

    Args:
        results: a sweep's table (columns tower, layer, target, accuracy, and optionally
            ci_low, ci_high, control_accuracy, selectivity, chance, n_train, n_test). Per-head
            rows (non-null ``head``) are left out: see :func:`head_heatmap`.
        chance: draws a dotted line at this accuracy when given; else each target's ``chance``
            column, where present, in the target's colour.

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
        if chance is None and "chance" in part and part["chance"].notna().any():
            axes[0].axhline(float(part["chance"].dropna().iloc[0]), ls=":", color=line.get_color(),
                            label=f"{target} (chance)")
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
    _suptitle(fig, "probe accuracy per layer", rows)
    fig.tight_layout()
    return fig


def _ticks(ax, placed: pd.DataFrame) -> None:
    """Label each position with its layer; the projector "proj", the embeddings "embed"."""
    ticks = placed.drop_duplicates("x").sort_values("x")
    labels = ["proj" if tower == "projector" else "embed" if pd.isna(layer) else str(int(layer))
              for tower, layer in zip(ticks["tower"], ticks["layer"])]
    ax.set_xticks(ticks["x"], labels, fontsize=7, rotation=90)
    ax.set_xlabel("layer")


# The level each value is read against, and what it means there: a diverging scale is white at
# it, so a head's colour says at once whether it beats that level.
REFERENCES = {"accuracy": "chance", "control_accuracy": "chance", "selectivity": "zero"}


def head_heatmap(results: pd.DataFrame, target: str | None = None, value: str = "selectivity",
                 chance: float | None = None) -> Figure:
    """A layer x head heatmap of one value of a per-head sweep.

    Accuracies are drawn on a diverging scale centred on chance (white: chance, red above, blue
    below), selectivity on one centred on zero (accuracy equal to the control task's); the colour
    bar is labelled and marks that level with a black line. Other values use a sequential scale.
    The title names the target, its train and test sizes and chance.

    Args:
        results: a sweep's table with per-head rows (non-null ``head``).
        target: which target to show; may be omitted when the table has one.
        value: the column to colour by (``"accuracy"``, ``"selectivity"``, ...).
        chance: the chance accuracy; default: the table's ``chance`` column for the target.

    Raises:
        InputError: without per-head rows, for an unknown value column, an ambiguous target, or
            an accuracy heatmap without a chance level (no ``chance`` column and no ``chance=``).
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
    level, label = _reference(rows, value, chance)
    fig = Figure(figsize=(0.35 * grid.shape[1] + 3.2, 0.3 * grid.shape[0] + 2.0))
    ax = fig.subplots()
    data = grid.to_numpy(dtype=float)
    if level is None:
        image = ax.imshow(data, aspect="auto", origin="lower", cmap="viridis")
    else:
        image = ax.imshow(data, aspect="auto", origin="lower", cmap="RdBu_r", norm=_centred(data, level))
    ax.set_xticks(range(grid.shape[1]), [str(int(h)) for h in grid.columns], fontsize=7)
    ax.set_yticks(range(grid.shape[0]), [str(int(la)) for la in grid.index], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(label, fontsize=8)
    if level is not None:
        bar.ax.axhline(level, color="black", lw=1.5)
    ax.set_title(textwrap.fill(f"{value} per head | {sample_title(rows)}",
                               max(30, int(fig.get_figwidth() * 72 / (0.6 * 8)) - 10)), fontsize=8)
    fig.tight_layout()
    return fig


def _reference(rows: pd.DataFrame, value: str, chance: float | None) -> tuple[float | None, str]:
    """The level a value is read against (chance for accuracies, 0 for selectivity; None for
    other values) and the colour bar's label."""
    kind = REFERENCES.get(value)
    if kind == "zero":
        return 0.0, f"{value} (accuracy - control accuracy; white, black line: 0)"
    if kind is None:
        return None, value
    if chance is None:
        if "chance" not in rows or rows["chance"].isna().all():
            raise InputError(f"head_heatmap of {value!r} marks chance, but the table has no 'chance' column "
                             "and no chance= was given; pass chance=")
        chance = float(rows["chance"].dropna().iloc[0])
    return chance, f"{value} (white, black line: chance {chance:.2f})"


def _centred(data: np.ndarray, level: float) -> TwoSlopeNorm:
    """A diverging norm white at ``level`` that spans the data (and a little either side of
    ``level`` when every value is on one side of it)."""
    finite = data[np.isfinite(data)]
    low = float(finite.min()) if finite.size else level
    high = float(finite.max()) if finite.size else level
    pad = 1e-3 * max(1.0, abs(level))
    return TwoSlopeNorm(vcenter=level, vmin=min(low, level - pad), vmax=max(high, level + pad))


def alignment_curves(table: pd.DataFrame, ylabel: str = "alignment", chance: float | None = None,
                     title: str | None = None) -> Figure:
    """Alignment against layer, one line per metric (columns layer, metric, value; optional tower).

    Also draws transfer accuracies (one line per direction, ``ylabel="transfer accuracy"``), with a
    dotted line at ``chance`` when given. The title is ``title``, else ``ylabel`` with each
    target's train and test sizes and chance where the table has those columns (transfer tables
    do).

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
    if title is not None:
        fig.suptitle(title, fontsize=9)
    else:
        _suptitle(fig, f"{ylabel} per layer", table)
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
