"""Checking the Ray options of extraction and sweeps (``ray_address``, ``ray_resources``).

Both Ray executors check their options with :func:`check_ray_options` before any work starts;
this module imports nothing heavier than the error classes, and Ray only to check that it is
installed.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from ..errors import InputError
from .runtime import require_ray, session

# Ray resource names a task may ask for (custom resources go in "resources")
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")


def check_ray_options(ray_address: Any = None, ray_resources: Any = None) -> None:
    """Raise unless the Ray options are valid and Ray is installed.

    Args:
        ray_address: a Ray address (``"auto"``, ``"ray://head:10001"``) or None.
        ray_resources: per-task Ray resources, e.g. ``{"num_gpus": 1}``, or None.

    Raises:
        InputError: a bad address or resource mapping (naming what was received and what is
            expected).
        MissingDependencyError: Ray is not installed (before any work starts).
    """
    if ray_address is not None and (not isinstance(ray_address, str) or not ray_address.strip()):
        raise InputError(f"ray_address must be a non-empty string such as 'auto' or "
                         f"'ray://head:10001', got {ray_address!r}")
    if ray_resources is not None:
        if not isinstance(ray_resources, dict):
            raise InputError(f"ray_resources must be a dict such as {{'num_gpus': 1}}, got {ray_resources!r}")
        unknown = sorted(set(ray_resources) - set(RESOURCE_KEYS))
        if unknown:
            raise InputError(f"unknown Ray resource key(s) {unknown}; expected some of {list(RESOURCE_KEYS)}")
        for key in ("num_cpus", "num_gpus"):
            value = ray_resources.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InputError(f"ray_resources[{key!r}] must be a non-negative number, got {value!r}")
    require_ray()


class RayOptions:
    """What the Ray executors of extraction and of sweeps share: the ``ray_address`` and
    ``ray_resources`` options, checked before any work starts, and one Ray session per run."""

    def check(self, options: dict[str, Any]) -> None:
        check_ray_options(options.get("ray_address"), options.get("ray_resources"))

    def session(self, options: dict[str, Any]) -> AbstractContextManager[Any]:
        return session(options.get("ray_address"))
