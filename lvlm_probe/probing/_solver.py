"""L2-penalised logistic regression for many independent probes at once, by batched L-BFGS.

The objective of probe ``p`` is scikit-learn's ``LogisticRegression(C=C)`` objective divided by
the number of examples ``n`` (the same scaling scikit-learn's L-BFGS uses, so ``tol`` means the
same thing)::

    f_p(W, b) = ( sum_i CE(W x_i + b, y_i) + ||W||^2 / (2 C) ) / n

with the intercept ``b`` not penalised. Two classes use scikit-learn's binomial parametrisation
(one row of weights, the logit of the second class); more classes use the full multinomial one
(one row per class).

Every probe has its own L-BFGS state: its own curvature history, its own step length and its own
stopping test (``max |grad f_p| <= tol``, scikit-learn's ``gtol``), so fitting probes together
gives each the iterates it would get alone, whatever the batch or chunk it sits in. The probes
share only the batched matrix products. The features stay in the working dtype (usually float32)
for those products; the parameters, the loss and the L-BFGS vectors are float64, so the line
search can still see progress when the float32 loss could no longer resolve it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import InputError

# Half precisions are left out on purpose: their gradients (~1e-3 relative) cannot reach the
# usual tolerances. Half-precision activations are upcast one chunk at a time instead.
DTYPES = {"float32": torch.float32, "float64": torch.float64}
_C1 = 1e-4  # Armijo sufficient-decrease constant (Nocedal & Wright's usual choice)
_DELTA = 0.1  # Hager & Zhang's approximate-Wolfe constant
_MAX_HALVINGS = 25


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype that a ``dtype`` hyperparameter (``"float32"`` or a dtype) names."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise InputError(f"dtype must be one of {sorted(DTYPES)} or the torch dtype; got {dtype!r}")


def check_hyperparameters(C: float, max_iter: int, tol: float) -> None:
    """Validate the solver's hyperparameters (at fit time, as scikit-learn estimators do)."""
    if isinstance(C, bool) or not isinstance(C, (int, float)) or not C > 0:
        raise InputError(f"C must be a positive number; got {C!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise InputError(f"max_iter must be a positive int; got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise InputError(f"tol must be a non-negative number; got {tol!r}")


@dataclass(frozen=True)
class Solution:
    """What :func:`fit_logistic` found for each of ``P`` probes.

    Attributes:
        coef: ``[P, K, d]`` float64 weights (``K = 1`` for two classes, else the class count).
        intercept: ``[P, K]`` float64 intercepts (zeros without ``fit_intercept``).
        n_iter: ``[P]`` L-BFGS iterations each probe took.
        grad_norm: ``[P]`` final ``max |grad f_p|``.
        converged: ``[P]`` whether ``grad_norm <= tol``.
    """

    coef: Float[Tensor, "P K d"]
    intercept: Float[Tensor, "P K"]
    n_iter: Int[Tensor, " P"]
    grad_norm: Float[Tensor, " P"]
    converged: Bool[Tensor, " P"]


def _objective(X: Tensor, y: Tensor, n_classes: int, C: float, fit_intercept: bool):
    """``(x [r, m], rows [r]) -> (f [r], grad [r, m])``: the objectives of probes ``rows`` at their
    flattened parameters ``x = (W, b)``."""
    P, n, d = X.shape
    K = 1 if n_classes == 2 else n_classes
    labels = y.to(torch.float64) if K == 1 else rearrange(y, "p n -> p n 1")
    # The features of the probes still being optimised, copied out once per change of the set
    # (the solver shrinks it geometrically, so all copies together cost at most one more X).
    working: dict[str, Any] = {"rows": None, "X": X, "labels": labels}

    def fun(x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        if working["rows"] is None or not torch.equal(working["rows"], rows):
            everything = len(rows) == P
            working.update(rows=rows, X=X if everything else X[rows],
                           labels=labels if everything else labels[rows])
        X_, target = working["X"], working["labels"]
        W = rearrange(x[:, : K * d], "p (k d) -> p k d", k=K)
        # Only the two products with the features run in the working dtype; the rest in float64.
        z = torch.matmul(X_, W.to(X_.dtype).transpose(1, 2)).to(torch.float64)
        if fit_intercept:
            z = z + x[:, None, K * d:]
        # The gradient is written out (softmax minus one-hot, times X): autograd's backward pass
        # costs twice the forward here, and F.cross_entropy is ~10x slower on CPU at these sizes.
        if K == 1:  # binomial: log(1 + e^z) - y z
            ce = (F.softplus(z[..., 0]) - target * z[..., 0]).sum(1)
            residual = (torch.sigmoid(z[..., 0]) - target)[..., None]
        else:
            log_norm = torch.logsumexp(z, 2, keepdim=True)
            ce = (log_norm[..., 0] - z.gather(2, target).squeeze(2)).sum(1)
            residual = torch.exp(z - log_norm)
            residual.scatter_add_(2, target, residual.new_full(target.shape, -1.0))
        f = (ce + W.pow(2).sum((1, 2)) / (2.0 * C)) / n
        gW = torch.matmul(residual.transpose(1, 2).to(X_.dtype), X_).to(torch.float64) + W / C
        g = [rearrange(gW, "p k d -> p (k d)")]
        if fit_intercept:
            g.append(residual.sum(1))
        return f, torch.cat(g, 1) / n

    return fun


def _direction(
    g: Tensor, S: Tensor, Y: Tensor, rho: Tensor, gamma: Tensor, newest: Tensor
) -> Tensor:
    """L-BFGS two-loop recursion, per probe; empty history slots have ``rho = 0`` (no-ops)."""
    P, h, _ = S.shape
    rows = torch.arange(P, device=g.device)
    q, alphas, slots = g.clone(), [], []
    for age in range(h):  # newest pair first
        j = (newest - age) % h
        a = rho[rows, j] * (S[rows, j] * q).sum(1)
        q -= a[:, None] * Y[rows, j]
        alphas.append(a)
        slots.append(j)
    r = gamma[:, None] * q
    for j, a in zip(reversed(slots), reversed(alphas)):
        b = rho[rows, j] * (Y[rows, j] * r).sum(1)
        r += (a - b)[:, None] * S[rows, j]
    return -r


def lbfgs(
    fun, x: Float[Tensor, "P m"], *, max_iter: int, tol: float, f_noise: float, history: int = 10
):
    """Minimise ``P`` independent smooth convex functions with L-BFGS and a backtracking search.

    A step is accepted on Armijo's sufficient decrease or, near the minimum where rounding hides
    the decrease, on Hager & Zhang's approximate Wolfe test: the loss rose by at most the
    rounding level ``f_noise * (1 + |f|)`` and the directional derivative at the new point shows
    the step did not overshoot (``grad_new . d <= (1 - 2 delta) |grad . d|``; along a convex line
    that bounds the step below twice the minimiser's distance). Gradients stay accurate long after
    loss differences drown in rounding, so this reaches tolerances a float32 loss cannot.

    Args:
        fun: ``(x [r, m], rows [r]) -> (f [r], grad [r, m])``, the objectives of probes ``rows``;
            row ``i`` of the output may depend only on row ``i`` of ``x``.
        x: ``[P, m]`` float64 starting points.
        max_iter: iterations per probe.
        tol: a probe stops when ``max |grad| <= tol``.
        f_noise: relative rounding level of ``f`` (a few machine epsilons of the feature dtype).
        history: curvature pairs kept per probe.

    Returns:
        ``(x, n_iter [P], grad_norm [P])``.
    """
    P, m = x.shape
    work = torch.arange(P, device=x.device)  # the probes fun evaluates; shrinks as probes converge
    f, g = fun(x, work)
    S = x.new_zeros(P, history, m)
    Y = x.new_zeros(P, history, m)
    rho = x.new_zeros(P, history)
    gamma = x.new_ones(P)
    newest = torch.full((P,), history - 1, dtype=torch.long, device=x.device)
    has_history = torch.zeros(P, dtype=torch.bool, device=x.device)
    n_iter = torch.zeros(P, dtype=torch.long, device=x.device)
    active = g.abs().amax(1) > tol
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        d = torch.zeros_like(g)
        d[work] = _direction(g[work], S[work], Y[work], rho[work], gamma[work], newest[work])
        gtd = (g * d).sum(1)
        # Rounding can make the quasi-Newton direction non-descending: use steepest descent then.
        bad = gtd >= 0
        d = torch.where(bad[:, None], -g, d)
        gtd = torch.where(bad, -(g * g).sum(1), gtd)
        d = torch.where(active[:, None], d, torch.zeros_like(d))
        # Without curvature information the unit step is blind; start as torch.optim.LBFGS does.
        t = torch.where(has_history & ~bad, x.new_ones(P), (1.0 / g.abs().sum(1)).clamp(max=1.0))
        searching = active.clone()
        x_new, f_new, g_new = x.clone(), f.clone(), g.clone()
        slack = f_noise * (1.0 + f.abs())
        for _ in range(_MAX_HALVINGS):
            f_try, g_try = f.clone(), g.clone()  # rows outside `work` are not searching
            f_try[work], g_try[work] = fun(x[work] + t[work, None] * d[work], work)
            armijo = f_try <= f + _C1 * t * gtd
            approx_wolfe = (f_try <= f + slack) & ((g_try * d).sum(1) <= (2 * _DELTA - 1) * gtd)
            ok = searching & (armijo | approx_wolfe)
            x_new[ok] = x[ok] + t[ok, None] * d[ok]
            f_new[ok], g_new[ok] = f_try[ok], g_try[ok]
            searching &= ~ok
            if not bool(searching.any()):
                break
            t = torch.where(searching, t / 2, t)
        accepted = active & ~searching
        s, yv = x_new - x, g_new - g
        sy = (s * yv).sum(1)
        # The L2 penalty makes each objective strongly convex in W, so sy > 0 on accepted steps;
        # the guard only drops pairs that rounding has spoiled.
        update = accepted & (sy > 1e-12 * (yv * yv).sum(1).sqrt() * (s * s).sum(1).sqrt())
        idx = update.nonzero().squeeze(1)
        slot = (newest[idx] + 1) % history
        S[idx, slot], Y[idx, slot], rho[idx, slot] = s[idx], yv[idx], 1.0 / sy[idx]
        newest[idx] = slot
        gamma[idx] = sy[idx] / (yv[idx] * yv[idx]).sum(1)
        has_history |= update
        # A failed line search with history gets one retry from steepest descent; without it the
        # probe has reached the precision its loss can resolve and stops.
        retry = searching & active & has_history
        rho[retry], has_history[retry], gamma[retry] = 0.0, False, 1.0
        x, f, g = x_new, f_new, g_new
        n_iter += accepted.long()
        active = (accepted | retry) & (g.abs().amax(1) > tol)
        if 0 < int(active.sum()) <= len(work) // 2:  # most converged: stop computing them
            work = active.nonzero().squeeze(1)
    return x, n_iter, g.abs().amax(1)


def fit_logistic(
    X: Float[Tensor, "P n d"],
    y: Int[Tensor, "P n"],
    n_classes: int,
    *,
    C: float,
    max_iter: int,
    tol: float,
    fit_intercept: bool,
) -> Solution:
    """Fit ``P`` independent L2 logistic regressions on ``X[p], y[p]`` (see the module docstring).

    Args:
        X: ``[P, n, d]`` features in the working dtype, on the working device.
        y: ``[P, n]`` class indices in ``[0, n_classes)``, on the same device.
        n_classes: number of classes, at least 2.
        C: inverse L2 strength, as in scikit-learn.
        max_iter: L-BFGS iterations per probe.
        tol: gradient tolerance, scikit-learn's ``gtol``.
        fit_intercept: learn an unpenalised intercept.

    Returns:
        The :class:`Solution`; the caller decides how to report non-converged probes.
    """
    P, n, d = X.shape
    K = 1 if n_classes == 2 else n_classes
    x0 = X.new_zeros(P, K * d + (K if fit_intercept else 0), dtype=torch.float64)
    fun = _objective(X, y, n_classes, C, fit_intercept)
    f_noise = 8 * torch.finfo(X.dtype).eps
    x, n_iter, grad_norm = lbfgs(fun, x0, max_iter=max_iter, tol=tol, f_noise=f_noise)
    coef = rearrange(x[:, : K * d], "p (k d) -> p k d", k=K)
    intercept = x[:, K * d:] if fit_intercept else x.new_zeros(P, K)
    if K > 1:
        # Softmax ignores a shift shared by all intercepts and the intercept is unpenalised, so
        # it is defined only up to that shift; centre it (scikit-learn's solution is centred too).
        intercept = intercept - intercept.mean(1, keepdim=True)
    return Solution(coef, intercept, n_iter, grad_norm, grad_norm <= tol)
