"""Scale-out with Ray: extraction and probe sweeps on a Ray cluster.

Ray is an optional extra (``pip install 'lvlm-probe[distributed]'``) and is imported only when a
call asks for ``backend="ray"``; the local path never imports it. Importing this package (which
``import lvlm_probe`` does) registers the executors named ``"ray"`` with the store
(:data:`lvlm_probe.store.executor.executors`) and with probe sweeps
(:data:`lvlm_probe.probing.sweeps.sweep_executors`); it does not import Ray.

* ``lp.extract(..., backend="ray")``: shards go to a pool of Ray actors, each holding the model
  (one per GPU with ``ray_resources={"num_gpus": 1}``); the driver commits shards in order, so
  the store is byte-identical to a local extraction and resumes the same way. An actor that dies
  is restarted and its shard retried (:mod:`lvlm_probe.distributed.extract`).
* ``lp.probing.sweep(..., backend="ray")``: hooks (layers) are fitted in parallel tasks; the
  results equal the local ones (:mod:`lvlm_probe.distributed.sweep`).
* ``run_sweep`` and the YAML keys ``backend:`` / ``ray_address:`` do both.

Without ``ray_address`` a call uses the running Ray session (``ray.init(...)`` first to share one
across calls) or starts a local instance for its own duration; ``ray_address="auto"`` joins the
cluster this node belongs to, ``"ray://head:10001"`` a remote one through Ray Client. Workers get
the driver's ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``HF_HOME`` and ``LVLM_PROBE_CACHE``
through the workers' ``runtime_env``, and one math-library thread per reserved CPU.
Stores must be on storage every worker can write (NFS, Lustre, a local disk on one node).

Example:
    >>> import ray; ray.init(address="auto")
    >>> store = lp.extract(model, questions, hooks=["blocks.*.hook_resid_post"], out="/shared/acts",
    ...                    backend="ray", ray_resources={"num_gpus": 1})
    >>> lp.probing.sweep(store, target="color", backend="ray")
"""
from __future__ import annotations

import warnings
from typing import Any

from ..probing.sweeps import sweep_executors
from ..store.executor import executors
from .extract import RayExecutor
from .options import check_ray_options
from .runtime import INSTALL, MissingDependencyError, require_ray
from .sweep import RaySweepExecutor

executors.register(RayExecutor())
sweep_executors.register(RaySweepExecutor())


def check_backend(backend: Any, ray_address: Any = None, ray_resources: Any = None) -> None:
    """Deprecated: backends are checked by the registry that selects them,
    ``lp.store.executors.check(lp.store.executors.resolve(backend), options)``.

    Raises:
        InputError: an unknown backend, Ray options with another backend, or bad Ray options.
        MissingDependencyError: ``backend="ray"`` without Ray installed.
    """
    warnings.warn("lvlm_probe.distributed.check_backend is deprecated and will be removed in the next "
                  "release; use lp.store.executors.check(lp.store.executors.resolve(backend), options)",
                  DeprecationWarning, stacklevel=2)
    executors.check(executors.resolve(backend),
                    {"ray_address": ray_address, "ray_resources": ray_resources})


def __getattr__(name: str) -> Any:
    if name == "BACKENDS":  # the registered extraction backends, as a tuple
        warnings.warn("lvlm_probe.distributed.BACKENDS is deprecated and will be removed in the next "
                      "release; use lp.store.executors.names()", DeprecationWarning, stacklevel=2)
        return tuple(executors.names())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["RayExecutor", "RaySweepExecutor", "check_ray_options", "require_ray", "MissingDependencyError",
           "INSTALL"]
