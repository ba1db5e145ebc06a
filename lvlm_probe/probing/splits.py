"""Train/test splits that keep every group (scene) on one side."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Int
from sklearn.model_selection import GroupShuffleSplit
from torch import Tensor

from ..errors import InputError


def group_split(
    groups: Any, test_size: float | int = 0.25, seed: int = 0
) -> tuple[Int[np.ndarray, " n_train"], Int[np.ndarray, " n_test"]]:
    """Split examples into train and test so that no group has examples on both sides.

    Examples of one scene share its image, so a probe tested on a scene it was trained on is
    partly tested on memorised pixels; grouping by scene id removes that leak. The split is
    scikit-learn's ``GroupShuffleSplit``: ``test_size`` is a fraction (or a count) of *groups*,
    not of examples.

    Args:
        groups: ``[N]`` group of each example (e.g. scene ids): array, list, Series or tensor.
        test_size: fraction of groups in ``(0, 1)``, or number of groups, to hold out.
        seed: random seed; the same seed and groups give the same split.

    Returns:
        ``(train_idx, test_idx)``: sorted int64 index arrays, disjoint, covering all examples.

    Raises:
        InputError: with fewer than 2 distinct groups, or a ``test_size`` that leaves one side
            empty.

    Example:
        >>> train, test = group_split(meta["scene"], test_size=0.25, seed=0)
        >>> probe.fit(X[train], y[train]).score(X[test], y[test])
    """
    values = groups.detach().cpu().numpy() if isinstance(groups, Tensor) else groups
    values = np.asarray(values, dtype=object)
    if values.ndim != 1:
        raise InputError(f"groups must be 1-D, one group per example; got shape {values.shape}")
    codes, uniques = pd.factorize(values)
    if len(uniques) < 2:
        raise InputError(
            f"a group split needs at least 2 distinct groups; got {len(uniques)} "
            f"({list(uniques)[:3]!r}) over {len(values)} examples"
        )
    splitter = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    try:
        train, test = next(splitter.split(np.zeros((len(codes), 1)), groups=codes))
    except ValueError as err:
        raise InputError(
            f"test_size={test_size!r} does not split {len(uniques)} groups: {err}"
        ) from err
    return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)
