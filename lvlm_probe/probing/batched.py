"""Many independent linear probes fitted in one batched optimisation (one per layer, per head...).

``fit_many(X [P, n, d], y)`` fits ``P`` logistic-regression probes with the objective of
:class:`~lvlm_probe.probing.LinearProbe`. The probes share matrix products, not optimisation
state: each has its own L-BFGS history, step length and stopping test, so probe ``p`` ends where
``LinearProbe().fit(X[p], y)`` ends, and splitting the probes into chunks (``chunk_size``, to
bound memory) changes nothing in the result.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from einops import rearrange, repeat
from jaxtyping import Bool, Float, Int
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

from ..devices import resolve_device, resolve_dtype
from ..errors import InputError
from ._solver import DTYPES, check_hyperparameters, fit_logistic
from .probe import as_tensor, check_tensor, input_device

Features = Tensor | np.ndarray | Sequence[Tensor | np.ndarray]

# Size of the float64 feature blocks predictions are computed on (see BatchedProbes._logits).
_PREDICT_BLOCK_BYTES = 8 * 2**20


class _Probes:
    """``P`` feature matrices ``[n, d]`` given as one ``[P, n, d]`` tensor/array or a sequence,
    read a chunk of probes at a time so the whole stack is never copied."""

    def __init__(self, X: Features) -> None:
        if isinstance(X, (Tensor, np.ndarray)):
            if X.ndim != 3:
                raise InputError(
                    f"X must be [P, n, d] (probes, samples, features); got shape {tuple(X.shape)}"
                )
            self.shape = tuple(X.shape)
        elif isinstance(X, Sequence) and len(X) and all(isinstance(x, (Tensor, np.ndarray)) for x in X):
            shapes = {tuple(x.shape) for x in X}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                raise InputError(
                    f"a sequence X must hold [n, d] matrices of one shape; got shapes {sorted(shapes)}"
                )
            self.shape = (len(X), *next(iter(shapes)))
        else:
            raise InputError(
                "X must be a [P, n, d] tensor or array, or a non-empty sequence of [n, d] ones; "
                f"got {type(X).__name__}"
            )
        self.X = X

    def chunk(
        self, start: int, stop: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, bool]:
        """Probes ``start:stop`` as a ``[c, n, d]`` tensor, and whether it is a private copy
        (which may then be modified in place)."""
        X = self.X
        if isinstance(X, Tensor):
            view = X[start:stop].detach()
            out = view.to(device=device, dtype=dtype)
            owned = out is not view
        elif isinstance(X, np.ndarray):
            view = X[start:stop]
            copied = not view.flags.writeable
            if copied:  # torch cannot wrap read-only memory (e.g. a memmap)
                view = np.array(view)
            out = torch.as_tensor(view, device=device, dtype=dtype)
            shared = out.device.type == "cpu" and out.data_ptr() == view.__array_interface__["data"][0]
            owned = copied or not shared
        else:
            out = torch.stack([as_tensor(x, device, dtype) for x in X[start:stop]])
            owned = True
        check_tensor(out, 3)
        return out, owned


def _labels(y: Any, P: int, n: int) -> tuple[Int[Tensor, "P n"], Int[Tensor, " n_classes"]]:
    """Validate integer labels ``[n]`` or ``[P, n]``; return class indices ``[P, n]``, classes."""
    y = y if isinstance(y, Tensor) else torch.as_tensor(np.asarray(y))
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputError(
            f"y must hold integer class labels; got dtype {y.dtype} (encode other labels first, "
            f"e.g. with pandas.factorize)"
        )
    if tuple(y.shape) not in {(n,), (P, n)}:
        raise InputError(
            f"y must be [n] = [{n}] or [P, n] = [{P}, {n}]; got shape {tuple(y.shape)}"
        )
    classes, idx = torch.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise InputError(f"probes need at least 2 classes in y; got only {classes.tolist()}")
    return (repeat(idx, "n -> p n", p=P) if idx.ndim == 1 else idx), classes


def _standardise(Xc: Tensor, owned: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-probe feature z-scores of ``Xc [c, n, d]``, and the mean and scale ``[c, d]`` used."""
    # One probe at a time: torch.std_mean materialises a temporary as large as its input.
    stats = [torch.std_mean(x, dim=0, correction=0) for x in Xc]
    std = rearrange(torch.stack([s for s, _ in stats]), "c d -> c 1 d")
    mean = rearrange(torch.stack([m for _, m in stats]), "c d -> c 1 d")
    # Constant features (up to rounding) keep scale 1, as in sklearn's StandardScaler, rather than
    # having their rounding noise blown up.
    constant = std <= 10 * torch.finfo(Xc.dtype).eps * mean.abs()
    scale = torch.where(constant | (std == 0), torch.ones_like(std), std)
    Xc = Xc.sub_(mean).div_(scale) if owned else (Xc - mean) / scale
    return Xc, mean[:, 0], scale[:, 0]


def _bounds(P: int, chunk_size: int | None) -> Iterator[tuple[int, int]]:
    step = P if chunk_size is None else chunk_size
    return ((s, min(s + step, P)) for s in range(0, P, step))


@dataclass(frozen=True, repr=False)  # __repr__ below prints a summary
class BatchedProbes:
    """``P`` fitted linear probes (see :func:`fit_many`); all tensors live on ``device``.

    Attributes:
        coef_: ``[P, K, d]`` float64 weights, ``K = 1`` for two classes (logit of ``classes_[1]``),
            else ``n_classes``. With ``standardize`` they act on standardised features.
        intercept_: ``[P, K]`` float64 intercepts.
        classes_: ``[n_classes]`` the sorted integer labels.
        mean_, scale_: ``[P, d]`` training-set feature mean and standard deviation per probe
            (``None`` without ``standardize``).
        n_iter_: ``[P]`` L-BFGS iterations per probe.
        grad_norm_: ``[P]`` final ``max |gradient|`` per probe (of the objective divided by ``n``).
        converged_: ``[P]`` whether ``grad_norm_ <= tol``.
        chunk_size: probes per chunk at prediction too (``None``: all at once).
    """

    coef_: Float[Tensor, "P K d"]
    intercept_: Float[Tensor, "P K"]
    classes_: Int[Tensor, " n_classes"]
    mean_: Float[Tensor, "P d"] | None
    scale_: Float[Tensor, "P d"] | None
    n_iter_: Int[Tensor, " P"]
    grad_norm_: Float[Tensor, " P"]
    converged_: Bool[Tensor, " P"]
    chunk_size: int | None = None

    def __len__(self) -> int:
        return self.coef_.shape[0]

    def __repr__(self) -> str:
        """A short summary (the library's result format: ``Name(a, b; c, d)``), never the weights."""
        P, _, d = self.coef_.shape
        scaled = "standardized" if self.mean_ is not None else "raw features"
        fit = (f"{int(self.converged_.sum())} of {P} converged, at most {int(self.n_iter_.max())} iterations, "
               f"largest gradient {float(self.grad_norm_.max()):.3g}") if P else "no probes"
        return (f"BatchedProbes({P} probe{'' if P == 1 else 's'}, {len(self.classes_)} classes, {d} features, "
                f"{scaled}, {self.device.type}; {fit})")

    def __str__(self) -> str:
        return repr(self)

    def to_frame(self) -> pd.DataFrame:
        """One row per probe: ``probe`` (its index: the layer or head it was fitted on),
        ``n_iter``, ``grad_norm``, ``converged``."""
        return pd.DataFrame({"probe": np.arange(len(self)), "n_iter": self.n_iter_.cpu().numpy(),
                             "grad_norm": self.grad_norm_.cpu().double().numpy(),
                             "converged": self.converged_.cpu().numpy()})

    @property
    def device(self) -> torch.device:
        return self.coef_.device

    def decision_function(self, X: Features) -> Float[Tensor, "P m"] | Float[Tensor, "P m K"]:
        """Logits, ``[P, m]`` for two classes, ``[P, m, n_classes]`` otherwise (float64).

        Args:
            X: ``[P, m, d]`` features of the probes' own layers/heads, in the forms
                :func:`fit_many` accepts.

        Raises:
            InputError: if ``X`` does not have ``P`` probes and ``d`` features.
        """
        z = self._logits(X)
        return z[..., 0] if z.shape[-1] == 1 else z

    def predict_proba(self, X: Features) -> Float[Tensor, "P m n_classes"]:
        """Class probabilities ``[P, m, n_classes]``, in ``classes_`` order."""
        z = self._logits(X)
        if z.shape[-1] == 1:
            z = torch.cat([torch.zeros_like(z), z], -1)
        return torch.softmax(z, -1)

    def predict(self, X: Features) -> Int[Tensor, "P m"]:
        """Predicted labels ``[P, m]`` (values of ``classes_``)."""
        z = self._logits(X)
        idx = (z[..., 0] > 0).long() if z.shape[-1] == 1 else z.argmax(-1)
        return self.classes_[idx]

    def correct(self, X: Features, y: Any) -> Bool[Tensor, "P m"]:
        """Whether each probe classifies each example right, ``[P, m]`` (input of ``bootstrap_ci``).

        Args:
            X: ``[P, m, d]`` features.
            y: ``[m]`` or ``[P, m]`` integer labels.
        """
        pred = self.predict(X)
        y = torch.as_tensor(y if isinstance(y, Tensor) else np.asarray(y), device=self.device)
        if tuple(y.shape) not in {(pred.shape[1],), tuple(pred.shape)}:
            raise InputError(
                f"y must be [m] or [P, m] with shape {tuple(pred.shape)}; got {tuple(y.shape)}"
            )
        return pred == y

    def accuracy(self, X: Features, y: Any) -> Float[Tensor, " P"]:
        """Accuracy of each probe, ``[P]``."""
        return self.correct(X, y).double().mean(1)

    def _logits(self, X: Features) -> Float[Tensor, "P m K"]:
        probes = _Probes(X)
        P, _, d = probes.shape
        if (P, d) != (len(self), self.coef_.shape[2]):
            raise InputError(
                f"X must be [P, m, d] with P={len(self)} probes and d={self.coef_.shape[2]} "
                f"features; got shape {probes.shape}"
            )
        # float64, like LinearProbe.predict: a prediction must not depend on the batch it is in.
        # The float64 copy is made a block of probes at a time, small enough to stay in cache:
        # one [P, m, d] float64 copy is a large fresh allocation, slower to fill than to use.
        # Each block also stays within chunk_size, the caller's memory bound.
        block = max(1, _PREDICT_BLOCK_BYTES // (probes.shape[1] * d * 8))
        out = []
        for start, stop in _bounds(P, min(block, self.chunk_size or P)):
            Xc, owned = probes.chunk(start, stop, self.device, torch.float64)
            if self.mean_ is not None:
                mean, scale = self.mean_[start:stop, None], self.scale_[start:stop, None]
                Xc = Xc.sub_(mean).div_(scale) if owned else (Xc - mean) / scale
            z = torch.matmul(Xc, self.coef_[start:stop].transpose(1, 2))
            out.append(z + rearrange(self.intercept_[start:stop], "p k -> p 1 k"))
        return torch.cat(out)


def fit_many(
    X: Features,
    y: Any,
    *,
    C: float = 1.0,
    max_iter: int = 1000,
    tol: float = 1e-4,
    fit_intercept: bool = True,
    standardize: bool = False,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    precondition: bool = True,
) -> BatchedProbes:
    """Fit ``P`` independent L2 logistic-regression probes in one batched L-BFGS run.

    Probe ``p`` minimises ``LinearProbe(C=C)``'s objective on ``(X[p], y[p])`` and reaches the
    same solution as that estimator would alone: the probes share only the batched products.

    Standardisation: the residual stream's scale grows with depth, so one ``C`` is a weak penalty
    for early layers and a strong one for late layers, and late layers converge slowly.
    ``standardize=True`` z-scores every feature of every probe with the mean and standard
    deviation of its training set (``mean_``, ``scale_``) and applies the same map to any ``X``
    given to the prediction methods; ``coef_`` then acts on standardised features. Use it to
    compare layers with one ``C``; it equals ``Pipeline(StandardScaler(), LinearProbe())`` per
    probe.

    Memory: ``chunk_size`` probes are fitted at a time; peak memory is one chunk of ``X`` in
    ``dtype`` on ``device`` (plus one more copy when ``standardize`` must not modify the caller's
    tensor), plus ``20 * chunk_size * (K * d + K)`` float64 of L-BFGS history. A NumPy memmap or
    a list of per-layer matrices is read one chunk at a time. The result does not depend on
    ``chunk_size``.

    Args:
        X: ``[P, n, d]`` features of ``P`` probes (layers, heads...) on the same ``n`` examples:
            a tensor, an array (memmaps welcome), or a sequence of ``P`` ``[n, d]`` matrices.
        y: ``[n]`` integer labels shared by all probes, or ``[P, n]`` per probe. The classes are
            the union over probes; a probe missing a class still gets a row for it.
        C: inverse L2 strength (scikit-learn's ``C``), positive.
        max_iter: L-BFGS iterations per probe.
        tol: a probe stops when ``max |gradient|`` of its objective divided by ``n`` is at most
            ``tol``; in float32 reachable down to about 1e-6.
        fit_intercept: learn an unpenalised intercept per probe.
        standardize: z-score features per probe (see above).
        chunk_size: probes per chunk (``None``: all).
        device: where to fit; ``None`` uses a tensor ``X``'s device, else the CPU.
        dtype: feature dtype for the products (``"float32"``, ``"float64"`` or a torch dtype).
        precondition: probes still unconverged after 20 iterations continue from a low-rank
            approximation of their Hessian (same solutions, far fewer iterations on correlated
            features; see ``_solver.curvature_preconditioner``); ``False``: plain L-BFGS.

    Returns:
        :class:`BatchedProbes`.

    Raises:
        InputError: for misshapen or non-finite ``X``, non-integer or misshapen ``y``, a single
            class, or invalid hyperparameters.

    Example:
        >>> X = torch.stack([store[h] for h in hooks])      # [n_layers, N, d_model]
        >>> train, test = group_split(store.meta["scene"], seed=0)
        >>> probes = fit_many(X[:, train], y[train], C=0.1, standardize=True)
        >>> probes.accuracy(X[:, test], y[test])            # [n_layers]
        >>> fit_many([store[h][train] for h in hooks], y[train], chunk_size=4)   # no stacking
    """
    check_hyperparameters(C, max_iter, tol)
    bad_chunk = isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    if chunk_size is not None and bad_chunk:
        raise InputError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
    dtype = resolve_dtype(dtype, allowed=DTYPES)
    probes = _Probes(X)
    P, n, _ = probes.shape
    first = X[0] if isinstance(X, Sequence) else X
    device = resolve_device(device, default=input_device(first))
    y_idx, classes = _labels(y, P, n)
    y_idx, classes = y_idx.to(device), classes.to(device)
    parts: list[tuple] = []
    for start, stop in _bounds(P, chunk_size):
        Xc, owned = probes.chunk(start, stop, device, dtype)
        mean = scale = None
        if standardize:
            Xc, mean, scale = _standardise(Xc, owned)
        sol = fit_logistic(
            Xc, y_idx[start:stop], len(classes),
            C=float(C), max_iter=max_iter, tol=float(tol), fit_intercept=fit_intercept,
            precondition=precondition,
        )
        parts.append((sol, mean, scale))
        del Xc  # release the chunk before the next is read
    sols = [p[0] for p in parts]
    result = BatchedProbes(
        coef_=torch.cat([s.coef for s in sols]),
        intercept_=torch.cat([s.intercept for s in sols]),
        classes_=classes,
        mean_=torch.cat([p[1] for p in parts]).double() if standardize else None,
        scale_=torch.cat([p[2] for p in parts]).double() if standardize else None,
        n_iter_=torch.cat([s.n_iter for s in sols]),
        grad_norm_=torch.cat([s.grad_norm for s in sols]),
        converged_=torch.cat([s.converged for s in sols]),
        chunk_size=chunk_size,
    )
    if not bool(result.converged_.all()):
        bad = (~result.converged_).nonzero().squeeze(1).tolist()
        warnings.warn(
            f"probes {bad} did not reach tol={tol} in max_iter={max_iter} iterations (max |gradient| "
            f"{result.grad_norm_.max().item():.2e}); raise max_iter, use standardize=True, or "
            f"dtype='float64' for tolerances below ~1e-6",
            ConvergenceWarning,
            stacklevel=2,
        )
    return result
