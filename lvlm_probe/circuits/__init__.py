"""Circuits: activation and path patching, head attribution.

Example:
    >>> pairs = lp.worlds.ShapesWorld(seed=0).pairs(8, change="color")
    >>> clean = model.prepare([c.image for c, _ in pairs], [c.prompt for c, _ in pairs])
    >>> corrupted = model.prepare([x.image for _, x in pairs], [x.prompt for _, x in pairs])
    >>> table = lp.circuits.patch(model, clean, corrupted, "blocks.*.hook_resid_pre",
    ...                           positions=["image", "prompt", "last"])
    >>> lp.circuits.heatmap(table)
    >>> lp.circuits.path_patch(model, clean, corrupted, receivers="logits")   # every head's direct path
    >>> lp.circuits.head_attribution(model, lp.worlds.ShapesWorld(seed=1).questions(64, "attribute"))
"""
from __future__ import annotations

from ..hooks.patching import editing
from ..viz.circuits import head_grid
from ..viz.circuits import patching_heatmap as heatmap
from .heads import head_attribution, image_attention
from .metrics import METRICS, check_pair
from .pairs import pair_batches
from .patching import DEFAULT_POSITIONS, patch
from .paths import path_patch

__all__ = ["DEFAULT_POSITIONS", "METRICS", "check_pair", "editing", "head_attribution", "head_grid", "heatmap",
           "image_attention", "pair_batches", "patch", "path_patch"]
