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

Correlated features make some objectives ill-conditioned: on layers near chance plain L-BFGS
needs ten times the iterations of the others. A probe still unconverged after
``PLAIN_ITERATIONS`` iterations goes on with two-loop recursions that start from a fixed
approximation of its inverse Hessian built from ``X'X`` (:func:`curvature_preconditioner`)
instead of a multiple of the identity.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import InputError

# Half precisions are left out on purpose: their gradients (~1e-3 relative) cannot reach the
# usual tolerances. Half-precision activations are upcast one chunk at a time instead.
DTYPES = (torch.float32, torch.float64)
_C1 = 1e-4  # Armijo sufficient-decrease constant (Nocedal & Wright's usual choice)
_DELTA = 0.1  # Hager & Zhang's approximate-Wolfe constant
_MAX_HALVINGS = 25
PLAIN_ITERATIONS = 20  # iterations before a probe not yet converged is preconditioned


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


def _take(T: Tensor, rows: Tensor) -> Tensor:
    """``T[rows]`` for sorted ``rows``, as a view (no copy) when they are a contiguous range.

    In a layer sweep the probes converge roughly in order of depth, so the probes still being
    optimised are usually a contiguous range of layers."""
    if len(rows) == 0:
        return T[rows]
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    return T[lo:hi] if hi - lo == len(rows) else T[rows]


def _runs(rows: Tensor) -> list[tuple[int, int]]:
    """The maximal ranges ``[lo, hi)`` of consecutive values in sorted ``rows``, in order."""
    if len(rows) == 0:
        return []
    breaks = (torch.diff(rows) != 1).nonzero().squeeze(1).tolist()
    starts, ends = [0, *[b + 1 for b in breaks]], [*[b + 1 for b in breaks], len(rows)]
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, ends)]


def _objective(X: Tensor, y: Tensor, n_classes: int, C: float, fit_intercept: bool):
    """``(x [r, m], rows [r]) -> (f [r], grad [r, m])``: the objectives of probes ``rows`` (sorted)
    at their flattened parameters ``x = (W, b)``."""
    P, n, d = X.shape
    K = 1 if n_classes == 2 else n_classes
    labels = y.to(torch.float64) if K == 1 else rearrange(y, "p n -> p 1 n")

    def products(A: Tensor, runs: list[tuple[int, int]], transpose: bool) -> Tensor:
        """``A[i] X[rows[i]]'`` (or ``A[i] X[rows[i]]``) in float64, one batched product per run of
        consecutive probes: ``X[lo:hi]`` is a view, so evaluating any subset of the probes copies
        no features.

        Each probe's product must not depend on which others are evaluated with it. On the CPU a
        batched product gives each matrix of the batch to one thread, but a batch of one is split
        across threads, which sums in another order; so a lone probe is evaluated beside a
        neighbour (with zero weights, its result dropped)."""
        parts, start = [], 0
        for lo, hi in runs:
            Ar = A[start:start + hi - lo].to(X.dtype)
            start += hi - lo
            keep = slice(None)
            if hi - lo == 1 and P > 1:
                blank = torch.zeros_like(Ar)
                if hi < P:
                    hi, Ar, keep = hi + 1, torch.cat([Ar, blank]), slice(0, 1)
                else:
                    lo, Ar, keep = lo - 1, torch.cat([blank, Ar]), slice(1, 2)
            Xr = X[lo:hi].transpose(1, 2) if transpose else X[lo:hi]
            parts.append(torch.matmul(Ar, Xr)[keep])
        return torch.cat(parts).to(torch.float64) if len(parts) > 1 else parts[0].to(torch.float64)

    def fun(x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        runs = _runs(rows)
        target = labels if len(rows) == P else labels[rows]
        W = rearrange(x[:, : K * d], "p (k d) -> p k d", k=K)
        # Only the two products with the features run in the working dtype; the rest in float64.
        # The logits are laid out [p, k, n]: on the CPU, W X' is ~1.4x faster than X W'.
        z = products(W, runs, transpose=True)
        if fit_intercept:
            z = z + x[:, K * d:, None]
        # The gradient is written out (softmax minus one-hot, times X): autograd's backward pass
        # costs twice the forward here, and F.cross_entropy is ~10x slower on CPU at these sizes.
        if K == 1:  # binomial: log(1 + e^z) - y z
            ce = (F.softplus(z[:, 0]) - target * z[:, 0]).sum(1)
            residual = (torch.sigmoid(z[:, 0]) - target)[:, None]
        else:
            log_norm = torch.logsumexp(z, 1, keepdim=True)
            ce = (log_norm[:, 0] - z.gather(1, target).squeeze(1)).sum(1)
            residual = torch.exp(z - log_norm)
            residual.scatter_add_(1, target, residual.new_full(target.shape, -1.0))
        f = (ce + W.pow(2).sum((1, 2)) / (2.0 * C)) / n
        gW = products(residual, runs, transpose=False) + W / C
        g = [rearrange(gW, "p k d -> p (k d)")]
        if fit_intercept:
            g.append(residual.sum(2))
        return f, torch.cat(g, 1) / n

    return fun


def curvature_preconditioner(
    X: Float[Tensor, "P n d"], n_classes: int, C: float, fit_intercept: bool, rank: int = 128
) -> Callable[[Tensor, Tensor], Tensor] | None:
    """``(v [r, m], rows [r]) -> M v``, with ``M`` the inverse of a fixed approximation of each
    probe's Hessian (``None`` below 8 features or examples, too few for the approximation: plain
    L-BFGS then), the same for every class block: ``H = c S + I / (n C)`` with ``S = X'X / n``
    (``X`` with a column of ones when there is an intercept) and ``c = (1 - 1/K) / K``, which are
    the diagonal blocks of the Hessian at the starting point ``W = 0`` (all of it for two classes).

    Why: residual-stream features are strongly correlated (a few directions carry most of the
    variance), so the objective is ill-conditioned and plain L-BFGS needs hundreds of iterations
    on layers near chance. Starting each two-loop recursion from ``M`` instead of a multiple of
    the identity removes most of that conditioning; the iterates change, the minimiser does not.

    ``S`` is kept at rank ``rank``, its remaining spectrum replaced by its mean, so ``M`` costs
    ``O(n d rank)`` to build and ``O(d rank)`` to apply, instead of the ``O(n d^2)`` and
    ``O(d^3)`` of the full matrix. The rank-``rank`` part is the Nystrom approximation of ``S``
    on a range found with one power iteration (Halko et al. 2011; the stable shifted Nystrom of
    Frangella, Tropp & Udell 2023, Algorithm 2.1): two products with ``X'X``, where a range
    finder followed by a Rayleigh-Ritz step needs three, for the same quality. The random test
    matrix is the same for every probe, and the rank is a multiple of 8 so that the batched
    QR, Cholesky and eigendecompositions see matrices whose sizes are multiples of 64 bytes
    (batched LAPACK results otherwise depend on where a matrix sits in the batch): each probe's
    ``M`` is the same in any batch or chunk.
    """
    P, n, d = X.shape
    K = 1 if n_classes == 2 else n_classes
    curvature = (1 - 1 / n_classes) / n_classes  # softmax's p (1 - p) at the start, W = 0
    size = d + 1 if fit_intercept else d  # the features and, with an intercept, a column of ones
    rank = min(rank, size, n) // 8 * 8
    if rank == 0:
        return None

    def gram_times(Z: Tensor) -> Tensor:
        """``Xa'Xa Z`` for ``Xa = [X, 1]``, without building ``Xa`` (a copy of the features); the
        products with the features in their dtype, as in the objective, the rest in float64."""
        Z = Z.to(X.dtype)
        XaZ = X @ Z[..., :d, :]
        if not fit_intercept:
            return (X.transpose(1, 2) @ XaZ).to(torch.float64)
        XaZ = XaZ + Z[..., d:, :]
        return torch.cat([X.transpose(1, 2) @ XaZ, XaZ.sum(1, keepdim=True)], 1).to(torch.float64)

    g = torch.Generator(device="cpu").manual_seed(0)
    omega = torch.randn(size, rank, generator=g, dtype=torch.float64).to(X.device)
    Q = torch.linalg.qr(gram_times(omega)).Q  # X'X's leading range
    XtXQ = gram_times(Q)
    # Nystrom: X'X ~ B B' with B = Y L'^-1, L L' = Q'Y and Y = (X'X + nu) Q. The shift nu keeps
    # the Cholesky factorisation safe from the rounding of the working dtype's products; it is
    # taken off the eigenvalues afterwards.
    nu = size**0.5 * torch.finfo(X.dtype).eps * torch.linalg.matrix_norm(XtXQ)
    eye = torch.eye(rank, dtype=torch.float64, device=X.device)
    for _ in range(8):
        Y = XtXQ + nu[:, None, None] * Q
        core = Q.transpose(1, 2) @ Y
        L, info = torch.linalg.cholesky_ex((core + core.transpose(1, 2)) / 2)
        if not bool(info.any()):
            break
        nu = torch.where(info > 0, 10 * nu, nu)
    else:
        raise RuntimeError("the Nystrom approximation of X'X found no positive-definite core")
    Linv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
    sigma2, U = torch.linalg.eigh(Linv @ (Y.transpose(1, 2) @ Y) @ Linv.transpose(1, 2))  # B'B
    sigma = sigma2.clamp(min=torch.finfo(torch.float64).tiny).sqrt()
    V = Y @ (Linv.transpose(1, 2) @ (U / sigma[:, None]))  # B's left singular vectors
    lam = (sigma2 - nu[:, None]).clamp(min=0) / n  # the eigenvalues of S on V's columns
    # the trace of Xa'Xa: the squared norm of the features (one pass, no squared copy), plus n ones
    trace = (torch.linalg.vector_norm(X, dim=(1, 2)).double() ** 2 + (n if fit_intercept else 0)) / n
    tail = ((trace - lam.sum(1)) / max(size - rank, 1)).clamp(min=0)
    ridge = 1.0 / (n * C)
    inside = 1.0 / (curvature * lam.clamp(min=0) + ridge)   # M on the leading directions
    outside = 1.0 / (curvature * tail + ridge)              # and on the rest

    def apply(v: Tensor, rows: Tensor) -> Tensor:
        blocks = rearrange(v[:, : K * d], "p (k d) -> p d k", k=K)
        if fit_intercept:
            blocks = torch.cat([blocks, v[:, None, K * d:]], 1)
        Vr = _take(V, rows)
        coords = Vr.transpose(1, 2) @ blocks
        out = outside[rows, None, None] * blocks + Vr @ ((inside[rows] - outside[rows, None])[:, :, None] * coords)
        flat = [rearrange(out[:, :d], "p d k -> p (k d)")]
        if fit_intercept:
            flat.append(out[:, d])
        return torch.cat(flat, 1)

    return apply


def _direction(
    g: Tensor, S: Tensor, Y: Tensor, rho: Tensor, gamma: Tensor, newest: Tensor,
    precondition: Callable[[Tensor, Tensor], Tensor] | None, rows_of: Tensor,
) -> Tensor:
    """L-BFGS two-loop recursion, per probe; empty history slots have ``rho = 0`` (no-ops).
    ``precondition(q, rows_of)`` is the initial inverse Hessian (default the identity), scaled
    by ``gamma``."""
    P, h, _ = S.shape
    ages = range(h)  # newest pair first
    if P and bool((newest == newest[0]).all()):
        # Probes that took their steps together (the usual case) keep their newest pair in the
        # same slot: their history is then read through views instead of gathered.
        slot = int(newest[0])
        pairs = [(S[:, j], Y[:, j], rho[:, j]) for j in ((slot - age) % h for age in ages)]
    else:
        rows = torch.arange(P, device=g.device)
        pairs = [(S[rows, j], Y[rows, j], rho[rows, j]) for j in ((newest - age) % h for age in ages)]
    q, alphas = g.clone(), []
    for s_j, y_j, rho_j in pairs:
        a = rho_j * (s_j * q).sum(1)
        q -= a[:, None] * y_j
        alphas.append(a)
    r = gamma[:, None] * (q if precondition is None else precondition(q, rows_of))
    for (s_j, y_j, rho_j), a in zip(reversed(pairs), reversed(alphas)):
        b = rho_j * (y_j * r).sum(1)
        r += (a - b)[:, None] * s_j
    return -r


def lbfgs(
    fun, x: Float[Tensor, "P m"], *, max_iter: int, tol: float, f_noise: float, history: int = 10,
    precondition: Callable[[Tensor, Tensor], Tensor] | None = None,
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
        precondition: ``(v [r, m], rows [r]) -> M v``, a fixed symmetric positive-definite
            approximation ``M`` of probes ``rows``' inverse Hessians (``None``: the identity).

    Returns:
        ``(x, n_iter [P], grad_norm [P])``.
    """
    P, m = x.shape
    work = torch.arange(P, device=x.device)  # the probes whose directions are computed (see below)
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
        d[work] = _direction(g[work], _take(S, work), _take(Y, work), rho[work], gamma[work],
                             newest[work], precondition, work)
        gtd = (g * d).sum(1)
        # Rounding can make the quasi-Newton direction non-descending: use steepest descent then.
        bad = gtd >= 0
        d = torch.where(bad[:, None], -g, d)
        gtd = torch.where(bad, -(g * g).sum(1), gtd)
        d = torch.where(active[:, None], d, torch.zeros_like(d))
        # Without curvature information the unit step is blind; start as torch.optim.LBFGS does.
        # A preconditioner is curvature information: its direction is a Newton-like step.
        informed = has_history | (precondition is not None)
        t = torch.where(informed & ~bad, x.new_ones(P), (1.0 / g.abs().sum(1)).clamp(max=1.0))
        searching = active.clone()
        x_new, f_new, g_new = x.clone(), f.clone(), g.clone()
        slack = f_noise * (1.0 + f.abs())
        for _ in range(_MAX_HALVINGS):
            trying = searching.nonzero().squeeze(1)  # converged and accepted probes are not evaluated
            f_try, g_try = f.clone(), g.clone()
            f_try[trying], g_try[trying] = fun(x[trying] + t[trying, None] * d[trying], trying)
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
        # the scale of the initial inverse Hessian: Shanno's s'y / y'My
        my = yv[idx] if precondition is None else precondition(yv[idx], idx)
        gamma[idx] = sy[idx] / (yv[idx] * my).sum(1)
        has_history |= update
        # A failed line search with history gets one retry from steepest descent; without it the
        # probe has reached the precision its loss can resolve and stops.
        retry = searching & active & has_history
        rho[retry], has_history[retry], gamma[retry] = 0.0, False, 1.0
        x, f, g = x_new, f_new, g_new
        n_iter += accepted.long()
        active = (accepted | retry) & (g.abs().amax(1) > tol)
        # Stop computing converged probes' directions: at once when the rest are a shorter
        # contiguous range (views of the histories), else when at most half are left (a copy of
        # their histories: gathering them at every iteration would cost more than the
        # directions it saves).
        left = active.nonzero().squeeze(1)
        if len(left):
            lo, hi = int(left[0]), int(left[-1]) + 1
            if hi - lo < len(work):
                work = torch.arange(lo, hi, device=x.device)
            elif len(left) <= len(work) // 2:
                work = left
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
    precondition: bool = True,
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
        precondition: probes still short of ``tol`` after ``PLAIN_ITERATIONS`` iterations (the
            ill-conditioned ones, usually layers near chance) go on from there with
            :func:`curvature_preconditioner`, to ``tol / 10`` (same minimiser, far fewer
            iterations); ``False``: plain L-BFGS throughout.

    Returns:
        The :class:`Solution`; the caller decides how to report non-converged probes.
    """
    P, n, d = X.shape
    K = 1 if n_classes == 2 else n_classes
    x0 = X.new_zeros(P, K * d + (K if fit_intercept else 0), dtype=torch.float64)
    fun = _objective(X, y, n_classes, C, fit_intercept)
    f_noise = 8 * torch.finfo(X.dtype).eps
    plain = min(max_iter, PLAIN_ITERATIONS) if precondition else max_iter
    x, n_iter, grad_norm = lbfgs(fun, x0, max_iter=plain, tol=tol, f_noise=f_noise)
    # Most probes converge within a few dozen plain iterations; building the preconditioner for
    # them would cost more than it saves. The rest, out of iterations, continue preconditioned,
    # to a tenth of tol: their objectives are flat along some directions, where a gradient of tol
    # still leaves the weights far from the minimiser (held-out accuracy a point or two off),
    # and the extra digit costs the preconditioned iterations little.
    slow = ((grad_norm > tol) & (n_iter == plain)).nonzero().squeeze(1)
    if len(slow) and max_iter > plain:
        X_slow, y_slow = _take(X, slow), _take(y, slow)
        M = curvature_preconditioner(X_slow, n_classes, C, fit_intercept)
        fun_slow = _objective(X_slow, y_slow, n_classes, C, fit_intercept)
        x_slow, more, grad_slow = lbfgs(fun_slow, x[slow], max_iter=max_iter - plain, tol=tol / 10,
                                        f_noise=f_noise, precondition=M)
        x[slow], n_iter[slow], grad_norm[slow] = x_slow, n_iter[slow] + more, grad_slow
    coef = rearrange(x[:, : K * d], "p (k d) -> p k d", k=K)
    intercept = x[:, K * d:] if fit_intercept else x.new_zeros(P, K)
    if K > 1:
        # Softmax ignores a shift shared by all intercepts and the intercept is unpenalised, so
        # it is defined only up to that shift; centre it (scikit-learn's solution is centred too).
        intercept = intercept - intercept.mean(1, keepdim=True)
    return Solution(coef, intercept, n_iter, grad_norm, grad_norm <= tol)
