"""Matplotlib figures: layer curves through the towers, per-head heatmaps, alignment curves and maps.

Example:
    >>> fig = lp.viz.layer_curves(results)   # a probing sweep's table
    >>> fig.savefig("emergence.png")
"""
from __future__ import annotations

from .layers import TOWERS, alignment_curves, head_heatmap, layer_curves, layer_map, tower_axis
from .save import save_figure

__all__ = ["TOWERS", "alignment_curves", "head_heatmap", "layer_curves", "layer_map", "save_figure", "tower_axis"]
