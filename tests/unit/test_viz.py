"""Figures draw the numbers of the tables they are given, in forward order through the towers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lvlm_probe import viz
from lvlm_probe.errors import InputError


def sweep_table(heads: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for target in ("color", "shape"):
        for tower, n in (("lm", 3), ("projector", 1), ("vision", 2)):  # deliberately out of order
            for layer in range(n):
                for head in (range(4) if heads else [None]):
                    acc = float(rng.uniform(0.3, 1.0))
                    rows.append(dict(hook=f"{tower}.{layer}", tower=tower,
                                     layer=None if tower == "projector" else layer, head=head,
                                     target=target, accuracy=acc, ci_low=acc - 0.05, ci_high=acc + 0.05,
                                     control_accuracy=0.3, selectivity=acc - 0.3,
                                     chance=0.25 if target == "color" else 0.5, n_train=48, n_test=12))
    return pd.DataFrame(rows)


def test_tower_axis_follows_the_forward_pass():
    placed = viz.tower_axis(sweep_table()).drop_duplicates("x").sort_values("x")
    assert list(zip(placed["tower"], placed["layer"].fillna(-1).astype(int))) == [
        ("vision", 0), ("vision", 1), ("projector", -1), ("lm", 0), ("lm", 1), ("lm", 2)]


def test_layer_curves_plot_the_table():
    table = sweep_table()
    fig = viz.layer_curves(table, chance=1 / 6)
    top, bottom = fig.axes[:2]
    lines = {line.get_label(): line for line in top.get_lines()}
    color = viz.tower_axis(table[table["target"] == "color"]).sort_values("x")
    assert np.allclose(lines["color"].get_ydata(), color["accuracy"])
    assert np.allclose(lines["color (control)"].get_ydata(), 0.3)
    selectivity = {line.get_label(): line for line in bottom.get_lines()}["color"]
    assert np.allclose(selectivity.get_ydata(), color["accuracy"] - 0.3)
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["0", "1", "proj", "0", "1", "2"]
    embed = pd.DataFrame([dict(tower="lm", layer=None, target="color", accuracy=0.2)])
    fig = viz.layer_curves(pd.concat([table, embed], ignore_index=True))
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()][3] == "embed"  # before LM layer 0


def test_head_heatmap_is_layer_by_head():
    table = sweep_table(heads=True)
    fig = viz.head_heatmap(table[table["tower"] == "lm"], target="shape", value="accuracy")
    grid = fig.axes[0].get_images()[0].get_array()
    lm = table[(table["tower"] == "lm") & (table["target"] == "shape")]
    assert grid.shape == (3, 4)
    assert np.isclose(grid[2, 1], lm[(lm["layer"] == 2) & (lm["head"] == 1)]["accuracy"].item())
    with pytest.raises(InputError, match="pass target="):
        viz.head_heatmap(table)
    with pytest.raises(InputError, match="heads=True"):
        viz.head_heatmap(sweep_table())


def test_bad_tables_are_named():
    with pytest.raises(InputError, match=r"lacks \['accuracy'\]"):
        viz.layer_curves(sweep_table().drop(columns="accuracy"))
    with pytest.raises(InputError, match="unknown tower"):
        viz.layer_curves(sweep_table().assign(tower="decoder"))
    with pytest.raises(InputError, match="2-D"):
        viz.layer_map(np.zeros(3))


def test_layer_map_and_alignment_curves():
    matrix = np.arange(6.0).reshape(2, 3) / 6
    fig = viz.layer_map(matrix)
    assert np.allclose(fig.axes[0].get_images()[0].get_array(), matrix)
    table = pd.DataFrame({"layer": [0, 1, 2] * 2, "metric": ["cka"] * 3 + ["mutual_knn"] * 3,
                          "value": [0.1, 0.5, 0.9, 0.2, 0.3, 0.4]})
    lines = {line.get_label(): line for line in viz.alignment_curves(table).axes[0].get_lines()}
    assert np.allclose(lines["cka"].get_ydata(), [0.1, 0.5, 0.9])
