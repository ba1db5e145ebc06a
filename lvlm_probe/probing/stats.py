"""Confidence intervals for probe accuracies and other per-example means.

Accuracies get the Wilson score interval (:func:`wilson_ci`): a closed form that stays honest at
small test sets and at 0% or 100% accuracy, where a bootstrap collapses to a single point (10 of 10
test images right gives ``[0.72, 1.00]``, not ``[1.00, 1.00]``). Quantities without a closed form
(selectivity: accuracy minus control accuracy) get a cluster bootstrap (:func:`bootstrap_ci`),
which reports a degenerate interval (every resample equal) as NaN with a warning.
"""
from __future__ import annotations

import warnings
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError

_DRAWS_PER_BLOCK = 256  # bounds the [draws, m] weight matrix for large test sets


class AccuracyCI(NamedTuple):
    """An estimate (accuracy, or the mean of other per-example values) and its interval, each
    ``[P]`` (or scalar for 1-D input)."""

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
    """Percentile bootstrap confidence interval of a per-example mean, for many probes at once.

    For accuracies prefer :func:`wilson_ci`, which has a closed form and does not collapse at
    0% or 100%; the bootstrap is for means without one, such as selectivity (pass the per-example
    difference ``correct - control_correct``, values in {-1, 0, 1}).

    Each bootstrap draw resamples the test examples with replacement, the same draw for every
    probe (so intervals of different layers come from the same resamples), and computes each
    probe's mean on it. A draw is represented by how many times it picks each example, so all
    draws are one matrix product with ``correct``; no loop over draws. With ``groups``, whole
    groups are resampled (a cluster bootstrap): examples of one scene are not independent, and
    resampling them one by one understates the uncertainty.

    A probe whose every resample gives the same value (e.g. 100% accuracy: every resample is 100%)
    has no bootstrap interval: its ``low`` and ``high`` are NaN and a warning names the probes, as
    a point interval would claim a certainty the test set cannot give.

    Args:
        correct: ``[P, m]`` or ``[m]`` per-example values: booleans or 0/1 (whether each probe got
            each test example right, e.g. ``BatchedProbes.correct(X, y)``), or any numbers.
        n_boot: number of bootstrap draws.
        alpha: the interval covers ``1 - alpha``.
        seed: random seed; the same seed gives the same intervals.
        groups: optional ``[m]`` group of each example (e.g. scene ids) to resample by.

    Returns:
        :class:`AccuracyCI` ``(accuracy, low, high)``, float64 tensors of shape ``[P]`` (scalars
        for 1-D ``correct``) on the CPU; ``accuracy`` is the mean over the examples.

    Raises:
        InputError: for empty or misshapen ``correct``, bad ``n_boot`` or ``alpha``, or ``groups``
            of the wrong length.

    Warns:
        UserWarning: for degenerate intervals (every resample equal), whose bounds are NaN.

    Example:
        >>> acc, low, high = bootstrap_ci(probes.correct(X_test, y_test), n_boot=2000)
    """
    c, squeeze = _as_matrix(correct)
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise InputError(f"n_boot must be a positive int; got {n_boot!r}")
    _check_alpha(alpha)
    m = c.shape[1]
    codes, n_groups = _group_codes(groups, m)

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
    degenerate = boot.amax(0) == boot.amin(0)
    if bool(degenerate.any()):
        low, high = low.masked_fill(degenerate, float("nan")), high.masked_fill(degenerate, float("nan"))
        which = degenerate.nonzero().flatten().tolist()
        warnings.warn(f"bootstrap interval is degenerate for probe(s) {which[:10]}"
                      f"{' ...' if len(which) > 10 else ''}: every one of the {n_boot} resamples of "
                      f"the {m} test examples gives the same value {boot[0, which[0]].item():.3f}, so "
                      "the bootstrap cannot bound it; their ci_low/ci_high are NaN (for an accuracy "
                      "use wilson_ci, which does not collapse at 0% or 100%)", UserWarning, stacklevel=2)
    acc = c.mean(1)
    if squeeze:
        acc, low, high = acc[0], low[0], high[0]
    return AccuracyCI(acc, low, high)


def wilson_ci(correct: Any, alpha: float = 0.05, *, groups: Any = None) -> AccuracyCI:
    """Wilson score confidence interval of accuracy, for many probes at once.

    For ``k`` of ``n`` right, ``p = k / n`` and ``z`` the normal quantile of ``1 - alpha / 2``::

        centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

    Unlike the normal approximation or a bootstrap it never collapses to a point: 10 of 10 right
    gives ``[0.722, 1.000]`` (95%), which says how little 10 test images can show.

    With ``groups`` (examples of one scene are not independent), ``n`` is the effective sample
    size ``n / deff``: the design effect ``deff`` is the ratio of the cluster-robust variance of
    the accuracy to the binomial one, kept between 1 (independent examples) and the mean group
    size (every group answered as one), so the effective size lies between the number of groups
    and the number of examples. At 0% or 100% accuracy the variances carry no information on the
    clustering, and the cautious end (the number of groups) is used.

    Args:
        correct: ``[P, m]`` or ``[m]`` booleans (or 0/1), whether each probe got each test example
            right, e.g. ``BatchedProbes.correct(X, y)``.
        alpha: the interval covers ``1 - alpha``.
        groups: optional ``[m]`` group of each example (e.g. scene ids).

    Returns:
        :class:`AccuracyCI` ``(accuracy, low, high)``, float64 tensors of shape ``[P]`` (scalars
        for 1-D ``correct``) on the CPU.

    Raises:
        InputError: for empty or misshapen ``correct``, values other than 0 and 1, a bad
            ``alpha``, or ``groups`` of the wrong length.

    Example:
        >>> acc, low, high = wilson_ci(probes.correct(X_test, y_test))
    """
    c, squeeze = _as_matrix(correct)
    if not bool(((c == 0) | (c == 1)).all()):
        raise InputError("wilson_ci needs right/wrong values (booleans or 0/1); got other numbers, "
                         "e.g. " + str(c[(c != 0) & (c != 1)][:3].tolist()) + "; for a mean of other "
                         "values use bootstrap_ci")
    _check_alpha(alpha)
    m = c.shape[1]
    p = c.mean(1)
    n = _effective_size(c, p, *_group_codes(groups, m)) if groups is not None else torch.full_like(p, m)
    z = NormalDist().inv_cdf(1 - alpha / 2)
    denominator = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denominator
    half = z / denominator * (p * (1 - p) / n + z**2 / (4 * n**2)).sqrt()
    # clamp rounding at the ends: the exact bounds at p = 0 and p = 1 are 0 and 1
    low, high = (centre - half).clamp(0.0, 1.0), (centre + half).clamp(0.0, 1.0)
    low, high = torch.where(p == 0, 0.0, low), torch.where(p == 1, 1.0, high)
    if squeeze:
        p, low, high = p[0], low[0], high[0]
    return AccuracyCI(p, low, high)


def _effective_size(c: Tensor, p: Tensor, codes: Tensor, n_groups: int) -> Tensor:
    """``[P]`` effective sample sizes ``m / deff`` of clustered right/wrong values (see wilson_ci)."""
    m = c.shape[1]
    sizes = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, codes, torch.ones(m, dtype=torch.float64))
    totals = torch.zeros(c.shape[0], n_groups, dtype=torch.float64).index_add_(1, codes, c)  # [P, G]
    worst = m / n_groups  # every group answered as one: the effective size is the number of groups
    if n_groups == 1:
        return torch.full_like(p, 1.0)
    # cluster-robust (ratio estimator) variance of the accuracy vs the binomial one
    robust = n_groups / (n_groups - 1) * ((totals - p[:, None] * sizes) ** 2).sum(1) / m**2
    binomial = p * (1 - p) / m
    deff = torch.where(binomial > 0, robust / binomial.clamp_min(1e-300), torch.full_like(p, worst))
    return m / deff.clamp(1.0, worst)


def _as_matrix(values: Any) -> tuple[Tensor, bool]:
    """``[P, m]`` float64 values on the CPU, and whether the input was ``[m]``."""
    c = values.detach().cpu() if isinstance(values, Tensor) else torch.as_tensor(np.asarray(values))
    if c.ndim not in (1, 2) or c.shape[-1] == 0:
        raise InputError(f"correct must be [m] or [P, m] with m >= 1; got shape {tuple(c.shape)}")
    return c.reshape(-1, c.shape[-1]).to(torch.float64), c.ndim == 1


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1); got {alpha!r}")


def _group_codes(groups: Any, m: int) -> tuple[Tensor, int]:
    """``[m]`` group index of each example and the number of groups (each example its own group
    when ``groups`` is None)."""
    if groups is None:
        return torch.arange(m), m
    g = groups.detach().cpu().numpy() if isinstance(groups, Tensor) else groups
    g = np.asarray(g, dtype=object)
    if g.shape != (m,):
        raise InputError(f"groups must be [m] = [{m}]; got shape {g.shape}")
    codes, uniques = pd.factorize(g)
    return torch.as_tensor(codes), len(uniques)
