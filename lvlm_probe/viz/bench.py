"""Figures of the misalignment benchmark: accuracy per level, POPE, error causes, probe emergence
curves and the source split of wrong answers.

Each function takes a tidy table of :func:`lvlm_probe.bench.misalignment` and returns a matplotlib
Figure (built without pyplot, so no backend is chosen). :func:`png_bytes` renders one for embedding.

Causes and sources have colours of their own: a source (prior, prompt, image) keeps the colour
:meth:`SourceSplit.plot <lvlm_probe.attribution.SourceSplit.plot>` gives it, and no cause reuses
one, so a bar coloured as the prompt never reads as a cause. Tables of the wrong answers' source
split use the library's names (:func:`source_columns`): ``prior``, ``prompt``, ``image``, ``full``
as :func:`~lvlm_probe.attribution.source_split` names its credits, ``question`` for the question's
text.
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .layers import require

# the colours SourceSplit.plot gives the sources
SOURCE_COLORS = {"prior": "0.6", "prompt": "tab:orange", "image": "tab:blue"}
# hues far from grey, orange and blue (RGB distance above 0.3), so a cause never reads as a source
CAUSE_COLORS = {"prior override": "tab:red", "knows but doesn't say": "darkviolet",
                "perception failure": "tab:olive"}
# the diagnosis's column names -> the library's (source_split's credits; the question's text)
LIBRARY_NAMES = {"prompt": "question", "prompt_credit": "prompt"}


def source_columns(errors: pd.DataFrame) -> pd.DataFrame:
    """The diagnosis's table of wrong answers under the library's column names: the prompt's
    credit ``prompt_credit`` becomes ``prompt`` (as :func:`~lvlm_probe.attribution.source_split`
    names it) and the question's text ``prompt`` becomes ``question``. A table already under
    those names is returned unchanged."""
    if "prompt_credit" not in errors:
        return errors
    return errors.rename(columns=LIBRARY_NAMES)


def png_bytes(fig: Figure, dpi: int = 90) -> bytes:
    """The figure as PNG bytes, without the software tag, so equal figures give equal bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def _grouped_bars(ax, table: pd.DataFrame, group: str, series: str, value: str) -> None:
    groups = list(dict.fromkeys(table[group]))
    names = list(dict.fromkeys(table[series]))
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        part = table[table[series] == name].set_index(group).reindex(groups)
        ax.bar(np.arange(len(groups)) + (k - (len(names) - 1) / 2) * width, part[value], width, label=str(name))
    ax.set_xticks(range(len(groups)), groups, fontsize=8)


def level_bars(levels: pd.DataFrame) -> Figure:
    """Accuracy (left) and severity of the errors (right) per level, one bar per split."""
    require(levels, ["split", "level", "accuracy", "severity"], "level_bars")
    fig = Figure(figsize=(7.5, 3.0))
    left, right = fig.subplots(1, 2)
    _grouped_bars(left, levels, "level", "split", "accuracy")
    left.set_ylim(0, 1)
    left.set_ylabel("accuracy")
    left.legend(fontsize=7)
    _grouped_bars(right, levels, "level", "split", "severity")
    right.set_ylim(0, 1)
    right.set_ylabel("mean p(wrong answer)")
    fig.tight_layout()
    return fig


def pope_bars(pope: pd.DataFrame) -> Figure:
    """POPE's accuracy, F1 and yes-ratio per sampling mode, one panel per split."""
    require(pope, ["split", "pope", "accuracy", "f1", "yes_ratio"], "pope_bars")
    parts = [(s, p) for s, p in pope.groupby("split", sort=True) if s != "all"]
    fig = Figure(figsize=(3.6 * max(len(parts), 1), 2.9))
    axes = np.atleast_1d(fig.subplots(1, max(len(parts), 1)))
    for ax, (split, part) in zip(axes, parts):
        long = part.melt(id_vars="pope", value_vars=["accuracy", "f1", "yes_ratio"], var_name="metric")
        _grouped_bars(ax, long, "pope", "metric", "value")
        ax.axhline(0.5, color="0.3", lw=0.8, ls=":")
        ax.set_ylim(0, 1)
        ax.set_title(split, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def cause_bars(causes: pd.DataFrame) -> Figure:
    """Errors per split and level stacked by cause (counts; colours: :data:`CAUSE_COLORS`)."""
    require(causes, ["split", "level", "cause", "n"], "cause_bars")
    groups = list(dict.fromkeys(causes["split"] + "\n" + causes["level"]))
    fig = Figure(figsize=(max(5.0, 1.1 * len(groups) + 2), 3.2))
    ax = fig.subplots()
    bottom = np.zeros(len(groups))
    for cause, color in CAUSE_COLORS.items():
        part = causes[causes["cause"] == cause]
        counts = (part.assign(g=part["split"] + "\n" + part["level"]).set_index("g")["n"]
                  .reindex(groups).fillna(0).to_numpy(float))
        ax.bar(range(len(groups)), counts, bottom=bottom, color=color, label=cause)
        bottom += counts
    ax.set_xticks(range(len(groups)), groups, fontsize=7)
    ax.set_ylabel("errors")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def emergence_curves(probes: pd.DataFrame) -> Figure:
    """Held-out probe accuracy against layer, one panel per question kind; solid: the question's
    last position, dashed: the asked object's image tokens, dash-dot: a relation's two objects'
    tokens; dotted grey: chance."""
    require(probes, ["kind", "location", "layer", "accuracy", "chance"], "emergence_curves")
    kinds = list(dict.fromkeys(probes["kind"]))
    cols = min(3, max(len(kinds), 1))
    rows = -(-len(kinds) // cols) or 1
    fig = Figure(figsize=(3.2 * cols, 2.5 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    for ax, kind in zip(axes, kinds):
        part = probes[probes["kind"] == kind]
        layers = list(dict.fromkeys(part["layer"]))
        for location, style in (("last", "-"), ("object", "--"), ("pair", "-.")):
            line = part[part["location"] == location].set_index("layer").reindex(layers)
            if line["accuracy"].notna().any():
                ax.plot(range(len(layers)), line["accuracy"], style, marker="o", ms=3, label=location)
        ax.axhline(float(part["chance"].iloc[0]), color="0.5", ls=":", lw=1)
        step = max(1, -(-len(layers) // 12))  # at most about 12 labels for deep models
        ax.set_xticks(range(0, len(layers), step), layers[::step], fontsize=7)
        ax.set_ylim(0, 1.02)
        ax.set_title(kind, fontsize=9)
    for ax in axes[len(kinds):]:
        ax.set_axis_off()
    axes[0].legend(fontsize=7)
    axes[0].set_ylabel("probe accuracy")
    fig.tight_layout()
    return fig


def split_bars(errors: pd.DataFrame, first: int = 30) -> Figure:
    """Source split of wrong answers (log-odds of the wrong answer against the gold one): stacked
    prior, prompt and image credit per error, positive up, negative down; coloured tick: its cause
    (the diagnosis's table, or the same under the library's names: :func:`source_columns`)."""
    errors = source_columns(errors)
    require(errors, ["prior", "prompt", "image", "full", "cause"], "split_bars")
    table = errors.dropna(subset=["full"]).head(first).reset_index(drop=True)
    fig = Figure(figsize=(max(5.0, 0.28 * len(table) + 2), 3.4))
    ax = fig.subplots()
    up, down = np.zeros(len(table)), np.zeros(len(table))
    for source, color in SOURCE_COLORS.items():
        values = table[source].to_numpy(float)
        ax.bar(range(len(table)), values, bottom=np.where(values >= 0, up, down), color=color,
               label=source, width=0.7)
        up, down = up + np.maximum(values, 0), down + np.minimum(values, 0)
    ax.scatter(range(len(table)), table["full"], color="black", marker="_", s=120, zorder=3, label="full")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(range(len(table)), [f"{a}/{g}" for a, g in zip(table.get("answer", ""), table.get("gold", ""))],
                  rotation=90, fontsize=6)
    for tick, cause in zip(ax.get_xticklabels(), table["cause"]):
        tick.set_color(CAUSE_COLORS.get(cause, "black"))
    ax.set_ylabel("log-odds wrong vs gold")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    return fig


def split_means(errors: pd.DataFrame) -> Figure:
    """Mean prior, prompt and image credit of the wrong answers per cause, one panel per level
    (the diagnosis's table, or the same under the library's names: :func:`source_columns`)."""
    errors = source_columns(errors)
    require(errors, ["level", "prior", "prompt", "image", "cause"], "split_means")
    table = errors.dropna(subset=["full"])
    levels = [lv for lv in ("object", "attribute", "relation") if lv in set(table["level"])]
    fig = Figure(figsize=(3.3 * max(len(levels), 1), 3.0))
    axes = np.atleast_1d(fig.subplots(1, max(len(levels), 1), sharey=True))
    causes = [c for c in CAUSE_COLORS]
    for ax, level in zip(axes, levels):
        means = table[table["level"] == level].groupby("cause")[list(SOURCE_COLORS)].mean().reindex(causes)
        width = 0.26
        for k, (source, color) in enumerate(SOURCE_COLORS.items()):
            ax.bar(np.arange(len(causes)) + (k - 1) * width, means[source], width, color=color, label=source)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xticks(range(len(causes)), [c.replace(" but ", "\nbut ").replace(" ", "\n", 1) if c.startswith("p")
                                           else c.replace(" but ", "\nbut ") for c in causes], fontsize=7)
        ax.set_title(level, fontsize=9)
    axes[0].set_ylabel("mean credit (log-odds)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
