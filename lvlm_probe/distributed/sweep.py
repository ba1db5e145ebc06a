"""Probe sweeps with Ray: groups of hooks (layers) are fitted in parallel tasks.

:class:`RaySweepExecutor` is the :class:`~lvlm_probe.probing.sweeps.SweepExecutor` named ``"ray"``.
Each hook's probes depend only on its features and on the labels, split and seeds that
:class:`~lvlm_probe.probing.sweeps.HookJob` carries, so a task fits exactly what the local loop
fits and the table is the same, row for row and in the same order.
"""
from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..probing.sweeps import SweepExecutor, SweepPlan
from .options import RayOptions
from .runtime import n_workers, runtime_env, task_error


class RaySweepExecutor(RayOptions, SweepExecutor):
    """``lp.probing.sweep(..., backend="ray", ray_address=..., ray_resources=...)``.

    Options:
        ray_address: the Ray cluster; None uses the running session or starts a local one.
        ray_resources: Ray resources per task, default ``{"num_cpus": 1}``.
    """

    name = "ray"
    options = ("ray_address", "ray_resources")

    def run(self, plan: SweepPlan) -> list[list[dict[str, Any]]]:
        """Fit the plan's job on every hook with Ray tasks; returns each hook's rows, in
        ``plan.hooks`` order.

        An :class:`~lvlm_probe.ActivationStore` is opened by each task from its folder (shared
        storage), so only the hooks a task fits are read, and by that task; a dict of arrays sends
        each task its hooks' arrays.

        Raises:
            InputError: a store that is not on disk.
            The library errors a task raises, as they are.
        """
        source, hooks, job = plan.source, plan.hooks, plan.job
        resources = dict(plan.options.get("ray_resources") or {"num_cpus": 1})
        root = getattr(source, "root", None)
        if not isinstance(source, dict) and root is None:
            raise InputError(f"backend='ray' needs an ActivationStore on disk or a dict of arrays, "
                             f"got {type(source).__name__}")
        with self.session(plan.options) as ray:
            task = ray.remote(fit_hooks).options(max_retries=3, retry_exceptions=False,
                                                 runtime_env=runtime_env(resources.get("num_cpus", 1)),
                                                 **resources)
            n_groups = min(len(hooks), 2 * n_workers(ray, resources))
            groups = [hooks[i::n_groups] for i in range(n_groups)]  # interleaved: layers differ in cost
            refs = []
            for group in groups:
                features = str(root) if root is not None else {h: source[h] for h in group}
                refs.append(task.remote(job, features, group))
            try:
                results = ray.get(refs)
            except ray.exceptions.RayTaskError as err:
                raise task_error(ray, err) from err
        by_hook = {hook: rows for group, part in zip(groups, results) for hook, rows in zip(group, part)}
        return [by_hook[h] for h in hooks]


def fit_hooks(job: Any, features: str | dict[str, Any], hooks: list[str]) -> list[list[dict[str, Any]]]:
    """Ray task: each hook's result rows.

    Args:
        job: the sweep's :class:`~lvlm_probe.probing.sweeps.HookJob`.
        features: a store folder, or ``{hook: array [N, ...]}``.
        hooks: the hooks to fit.
    """
    import numpy as np
    import torch

    if isinstance(features, str):
        from ..store import ActivationStore

        get = ActivationStore.open(features, verify=False).__getitem__
    else:
        arrays = {h: v if torch.is_tensor(v) else _tensor(np.asarray(v)) for h, v in features.items()}
        get = arrays.__getitem__
    return job.rows_many(get, hooks)


def _tensor(array: Any) -> Any:
    """The tensor probing.sweep makes of an array; Ray hands tasks read-only views of the
    object store's numpy buffers, which torch must not share, so those are copied."""
    import torch

    return torch.as_tensor(array if array.flags.writeable else array.copy())
