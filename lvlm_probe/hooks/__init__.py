"""Canonical hook names, position selectors and the capture context manager.

Example:
    >>> with model.capture("blocks.*.hook_resid_post", positions="image", reduce="mean") as cache:
    ...     model.forward(batch)
    >>> cache.stack("blocks.*.hook_resid_post")   # [layer, batch, d_model]
"""
from __future__ import annotations

from .capture import ActivationCache, Capture, running
from .names import HookPoint, expand, hook_points
from .selectors import GROUP_SELECTORS, REDUCTIONS

__all__ = [
           "GROUP_SELECTORS",
           "REDUCTIONS",
           "ActivationCache",
           "Capture",
           "HookPoint",
           "expand",
           "hook_points",
           "running",
]
