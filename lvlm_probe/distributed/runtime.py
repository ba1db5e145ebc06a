"""Connecting to Ray: the import with an install hint, the session, and what workers inherit."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ..errors import LVLMProbeError, MissingDependencyError

INSTALL = "pip install 'lvlm-probe[distributed]'"
# Environment that decides where workers find models and whether they may use the network;
# tokens are left out on purpose (a runtime_env is visible to everyone on the cluster).
FORWARDED = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
             "LVLM_PROBE_CACHE", "TOKENIZERS_PARALLELISM", "MKL_NUM_THREADS")


def require_ray() -> Any:
    """Import Ray, or say how to install it.

    Raises:
        MissingDependencyError: Ray is not installed, or fails to import (says which).
    """
    try:
        import ray
    except ImportError as err:
        if getattr(err, "name", None) == "ray" or isinstance(err, ModuleNotFoundError) and err.name is None:
            raise MissingDependencyError(
                f"backend='ray' needs Ray, which is not installed; install it with {INSTALL}"
            ) from err
        # Ray is there but one of its own imports failed (a shadowing file, a broken install)
        raise MissingDependencyError(f"backend='ray': importing Ray failed: {err}; reinstall it with "
                                     f"{INSTALL}") from err
    return ray


def runtime_env(num_cpus: float) -> dict[str, Any]:
    """The ``runtime_env`` of lvlm_probe's tasks: the driver's model cache and offline settings,
    and one math-library thread per reserved CPU (torch would otherwise start one per core of
    the node in every worker, and the workers would compete for them)."""
    env = {k: os.environ[k] for k in FORWARDED if k in os.environ}
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", str(max(1, int(num_cpus))))
    return {"env_vars": env}


@contextlib.contextmanager
def session(address: str | None) -> Iterator[Any]:
    """Use the running Ray session, or connect to ``address``, or start a local instance.

    A session this context started is shut down when it ends; one that was running is left
    running (start Ray yourself with ``ray.init`` to share one across calls).

    Raises:
        MissingDependencyError: Ray is not installed.
        LVLMProbeError: Ray could not connect or start (with Ray's reason).
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": True}
    if address is None:
        kwargs["include_dashboard"] = False
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        raise LVLMProbeError(f"could not connect to {where}: {err}") from err
    try:
        yield ray
    finally:
        ray.shutdown()


def default_resources(ray: Any) -> dict[str, Any]:
    """One GPU per extraction worker on a cluster with GPUs; else one worker per node with all of
    the smallest node's CPUs (a model copy per CPU would multiply memory for no speed: torch
    already uses every core it is given)."""
    if ray.cluster_resources().get("GPU"):
        return {"num_gpus": 1}
    cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    cpus = [c for c in cpus if c]
    return {"num_cpus": max(1, int(min(cpus))) if cpus else 1}


def n_workers(ray: Any, resources: dict[str, Any]) -> int:
    """How many tasks with ``resources`` the cluster can run at once (at least 1)."""
    total = ray.cluster_resources()
    counts = [total.get(key, 0.0) / need for key, need in
              (("CPU", resources.get("num_cpus", 1)), ("GPU", resources.get("num_gpus", 0))) if need]
    return max(1, int(min(counts))) if counts else 1


def task_error(ray: Any, err: Exception) -> BaseException:
    """The error to raise for a failed task: the library's own error as the worker raised it
    (its message names the examples), else Ray's."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, LVLMProbeError) else err
