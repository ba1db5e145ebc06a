"""Checking the ``backend`` arguments of extraction and sweeps.

The local code path calls :func:`check_backend` on every call, so this module imports nothing
heavier than the error classes; Ray is imported only to check ``backend="ray"``.
"""
from __future__ import annotations

from typing import Any

from ..errors import InputError

BACKENDS = ("local", "ray")
# Ray resource names a task may ask for (custom resources go in "resources")
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")


def check_backend(backend: Any, ray_address: Any = None, ray_resources: Any = None) -> None:
    """Raise unless ``backend`` and the Ray options fit together.

    Args:
        backend: ``"local"`` or ``"ray"``.
        ray_address: a Ray address (``"auto"``, ``"ray://head:10001"``) or None; Ray only.
        ray_resources: per-task Ray resources, e.g. ``{"num_gpus": 1}``; Ray only.

    Raises:
        InputError: an unknown backend, Ray options with the local backend, or a bad address or
            resource mapping (naming what was received and what is expected).
        MissingDependencyError: ``backend="ray"`` without Ray installed (before any work starts).
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if backend == "local":
        for name, value in (("ray_address", ray_address), ("ray_resources", ray_resources)):
            if value is not None:
                raise InputError(f"{name}={value!r} needs backend='ray', got backend='local'")
        return
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
    from .runtime import require_ray

    require_ray()
