"""Linear probes: a scikit-learn estimator, batched fitting across layers/heads, and the helpers
a probing sweep needs (group splits, control tasks, bootstrap intervals), and the sweeps.

Example:
    >>> from lvlm_probe import probing
    >>> probe = probing.LinearProbe(C=1.0).fit(X_train, y_train)        # X [n, d]
    >>> probes = probing.fit_many(X_layers[:, train], y[train], standardize=True)   # [P, n, d]
    >>> acc, low, high = probing.bootstrap_ci(probes.correct(X_layers[:, test], y[test]))
"""
from .batched import BatchedProbes, fit_many
from .controls import control_labels, type_overlap
from .probe import LinearProbe
from .splits import group_split
from .stats import AccuracyCI, bootstrap_ci, wilson_ci
from .sweeps import best_layers, sweep, transfer

__all__ = [
    "LinearProbe", "fit_many", "BatchedProbes", "group_split", "control_labels", "type_overlap",
    "bootstrap_ci", "wilson_ci", "AccuracyCI", "sweep", "transfer", "best_layers",
]
