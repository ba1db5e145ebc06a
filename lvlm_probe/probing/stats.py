"""Confidence intervals for probe accuracies."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError

_DRAWS_PER_BLOCK = 256  # bounds the [draws, m] weight matrix for large test sets


class AccuracyCI(NamedTuple):
    """Accuracy and its percentile bootstrap interval, each ``[P]`` (or scalar for 1-D input)."""

    accuracy: Float[Tensor, "*P"]
    low: Float[Tensor, "*P"]
    high: Float[Tensor, "*P"]


def bootstrap_ci(
    correct: Any,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    *,
    groups: Any = None,
) -> AccuracyCI:
    """Percentile bootstrap confidence interval of accuracy, for many probes at once.

    Each bootstrap draw resamples the test examples with replacement, the same draw for every
    probe (so intervals of different layers come from the same resamples), and computes each
    probe's accuracy on it. A draw is represented by how many times it picks each example, so all
    draws are one matrix product with ``correct``; no loop over draws. With ``groups``, whole
    groups are resampled (a cluster bootstrap): examples of one scene are not independent, and
    resampling them one by one understates the uncertainty.

    Args:
        correct: ``[P, m]`` or ``[m]`` booleans (or 0/1), whether each probe got each test example
            right, e.g. ``BatchedProbes.correct(X, y)``.
        n_boot: number of bootstrap draws.
        alpha: the interval covers ``1 - alpha``.
        seed: random seed; the same seed gives the same intervals.
        groups: optional ``[m]`` group of each example (e.g. scene ids) to resample by.

    Returns:
        :class:`AccuracyCI` ``(accuracy, low, high)``, float64 tensors of shape ``[P]`` (scalars
        for 1-D ``correct``) on the CPU.

    Raises:
        InputError: for empty or misshapen ``correct``, bad ``n_boot`` or ``alpha``, or ``groups``
            of the wrong length.

    Example:
        >>> acc, low, high = bootstrap_ci(probes.correct(X_test, y_test), n_boot=2000)
    """
    c = correct.detach().cpu() if isinstance(correct, Tensor) else torch.as_tensor(np.asarray(correct))
    if c.ndim not in (1, 2) or c.shape[-1] == 0:
        raise InputError(f"correct must be [m] or [P, m] with m >= 1; got shape {tuple(c.shape)}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise InputError(f"n_boot must be a positive int; got {n_boot!r}")
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1); got {alpha!r}")
    squeeze = c.ndim == 1
    c = c.reshape(-1, c.shape[-1]).to(torch.float64)
    m = c.shape[1]
    if groups is None:
        codes, n_groups = torch.arange(m), m
    else:
        g = groups.detach().cpu().numpy() if isinstance(groups, Tensor) else groups
        g = np.asarray(g, dtype=object)
        if g.shape != (m,):
            raise InputError(f"groups must be [m] = [{m}]; got shape {g.shape}")
        codes_np, uniques = pd.factorize(g)
        codes, n_groups = torch.as_tensor(codes_np), len(uniques)

    gen = torch.Generator().manual_seed(seed)
    boot = []
    for start in range(0, n_boot, _DRAWS_PER_BLOCK):
        b = min(_DRAWS_PER_BLOCK, n_boot - start)
        picks = torch.randint(0, n_groups, (b, n_groups), generator=gen)
        counts = torch.zeros(b, n_groups, dtype=torch.float64).scatter_add_(
            1, picks, torch.ones(b, n_groups, dtype=torch.float64)
        )
        weights = counts[:, codes]  # [b, m]: how often each example is in the draw
        boot.append((weights @ c.T) / weights.sum(1, keepdim=True))  # [b, P]
    boot = torch.cat(boot)
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)
    low, high = torch.quantile(boot, q, dim=0)
    acc = c.mean(1)
    if squeeze:
        acc, low, high = acc[0], low[0], high[0]
    return AccuracyCI(acc, low, high)
