"""LinearProbe: L2-regularised logistic regression trained in torch; a scikit-learn classifier."""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, column_or_1d, validate_data
from torch import Tensor

from ..devices import resolve_device, resolve_dtype
from ..errors import InputError
from ._solver import DTYPES, check_hyperparameters, fit_logistic


def input_device(X: Any) -> torch.device:
    """The device of a tensor input; the CPU for arrays."""
    return X.device if isinstance(X, Tensor) else torch.device("cpu")


def check_tensor(X: Tensor, ndim: int, name: str = "X") -> None:
    """Validate a feature tensor as ``check_array`` validates an array (shape, dtype, finiteness).

    Raises:
        InputError: for the wrong number of dimensions, an empty axis, a non-real dtype or
            non-finite values.
    """
    if X.ndim != ndim:
        raise InputError(f"{name} must have {ndim} dimensions; got shape {tuple(X.shape)}")
    if 0 in X.shape:
        raise InputError(
            f"{name} has an empty axis: shape {tuple(X.shape)}; need at least 1 sample and 1 feature"
        )
    if X.is_complex() or X.dtype == torch.bool:
        raise InputError(f"{name} must hold real numbers; got dtype {X.dtype}")
    # A sum first (NaN and infinities propagate into it; ~50x faster than an isfinite mask, which
    # is also a quarter of the stack's size); only when it is not finite, which overflow alone
    # can cause, the exact test in blocks of rows.
    if X.is_floating_point() and not bool(torch.isfinite(X.sum())) and not all(
        bool(torch.isfinite(rows).all()) for rows in X.reshape(-1, X.shape[-1]).split(4096)
    ):
        raise InputError(f"{name} contains NaN or infinity")


def as_tensor(X: Any, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``X`` on ``device`` in ``dtype``, without the read-only-NumPy warning torch would raise."""
    if isinstance(X, Tensor):
        return X.detach().to(device=device, dtype=dtype)
    if isinstance(X, np.ndarray) and not X.flags.writeable:
        return torch.tensor(X, device=device, dtype=dtype)  # copy: torch cannot wrap read-only memory
    return torch.as_tensor(X, device=device, dtype=dtype)


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression with an L2 penalty, fitted by L-BFGS in torch.

    The objective is scikit-learn's ``LogisticRegression(C=C)`` (l2 penalty, lbfgs): the sum of
    the per-example cross-entropies plus ``||coef_||^2 / (2 C)``, the intercept unpenalised. The
    solution therefore matches scikit-learn's; only the optimisation runs in torch, on any device.
    As in scikit-learn, two classes use one row of weights (the logit of ``classes_[1]``) and
    ``decision_function`` returns a vector; more classes use one row per class.

    During ``fit`` features enter matrix products in ``dtype``; parameters, loss and optimiser
    state are float64. Predictions are computed in float64.
    Inputs may be NumPy arrays, pandas frames or torch tensors (which stay on their device unless
    ``device`` is given); outputs of ``predict*`` are NumPy arrays, as scikit-learn's are.

    Args:
        C: inverse of the L2 strength; smaller is stronger regularisation. Must be positive.
        max_iter: maximum L-BFGS iterations.
        tol: stop when ``max |gradient|`` of the objective divided by ``n_samples`` is at most
            ``tol`` (scikit-learn's ``gtol``). In float32 reachable down to about 1e-6.
        fit_intercept: learn an (unpenalised) intercept.
        device: torch device to fit and predict on; ``None`` uses a tensor input's device, or the
            CPU for anything else.
        dtype: feature dtype for the matrix products: ``"float32"`` (default), ``"float64"``, or a
            ``torch.dtype``. A string, like ``lp.load(..., dtype="bfloat16")``.
        random_state: accepted for API compatibility; the fit is deterministic (L-BFGS from zero).

    Attributes:
        coef_: ``[K, d]`` float64 weights, ``K = 1`` for two classes, else ``n_classes``.
        intercept_: ``[K]`` float64 intercepts.
        classes_: the sorted class labels.
        n_features_in_: ``d``.
        n_iter_: ``[1]`` L-BFGS iterations taken (scikit-learn's shape).

    Example:
        >>> probe = LinearProbe(C=0.1).fit(X_train, y_train)   # X [n, d] array or tensor
        >>> probe.score(X_test, y_test)
        0.93
        >>> sklearn.base.clone(probe).set_params(C=1.0)
    """

    def __init__(
        self,
        *,
        C: float = 1.0,
        max_iter: int = 1000,
        tol: float = 1e-4,
        fit_intercept: bool = True,
        device: str | None = None,
        dtype: str = "float32",
        random_state: int | None = None,
    ) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.fit_intercept = fit_intercept
        self.device = device
        self.dtype = dtype
        self.random_state = random_state

    def fit(self, X: Any, y: Any) -> LinearProbe:
        """Fit the probe.

        Args:
            X: ``[n, d]`` features: array-like, pandas DataFrame or torch tensor.
            y: ``[n]`` class labels (any hashable dtype NumPy can sort).

        Returns:
            ``self``, fitted.

        Raises:
            InputError: for invalid hyperparameters, non-finite features or a single class.
            ValueError: scikit-learn's validation errors (shapes, continuous targets, sparse input).
        """
        dtype = resolve_dtype(self.dtype, allowed=DTYPES)
        check_hyperparameters(self.C, self.max_iter, self.tol)
        device = resolve_device(self.device, default=input_device(X))
        if isinstance(X, Tensor):
            check_tensor(X, 2)
            validate_data(self, X, skip_check_array=True)
            y = column_or_1d(check_array(_to_numpy(y), ensure_2d=False, dtype=None), warn=True)
            if len(y) != X.shape[0]:
                raise InputError(f"X has {X.shape[0]} samples but y has {len(y)}; they must match")
        else:
            X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        classes, y_idx = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise InputError(
                f"{type(self).__name__} needs samples of at least 2 classes in the data, but the data "
                f"contains only one class: {classes[0]!r}"
            )
        Xt = as_tensor(X, device, dtype)
        yt = torch.as_tensor(y_idx.reshape(-1), device=device)
        sol = fit_logistic(
            Xt[None], yt[None], len(classes),
            C=float(self.C), max_iter=self.max_iter, tol=float(self.tol),
            fit_intercept=self.fit_intercept,
        )
        if not bool(sol.converged[0]):
            warnings.warn(
                f"LinearProbe did not reach tol={self.tol} in {int(sol.n_iter[0])} iterations "
                f"(max |gradient| = {float(sol.grad_norm[0]):.2e}); raise max_iter, standardise the "
                f"features, or use dtype='float64' for tolerances below ~1e-6",
                ConvergenceWarning,
                stacklevel=2,
            )
        self.classes_ = classes
        self.coef_ = sol.coef[0].cpu().numpy()
        self.intercept_ = sol.intercept[0].cpu().numpy()
        self.n_iter_ = np.array([int(sol.n_iter[0])], dtype=np.int32)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Logits: ``[n]`` for two classes (of ``classes_[1]``), ``[n, n_classes]`` otherwise.

        Raises:
            sklearn.exceptions.NotFittedError: before ``fit``.
        """
        z = self._logits(X).cpu().numpy()
        return z[:, 0] if z.shape[1] == 1 else z

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``[n, n_classes]``, columns in ``classes_`` order."""
        z = self._logits(X)
        if z.shape[1] == 1:
            z = torch.cat([torch.zeros_like(z), z], 1)  # binomial = softmax over logits (0, z)
        return torch.softmax(z, 1).cpu().numpy()

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Log class probabilities ``[n, n_classes]``."""
        z = self._logits(X)
        if z.shape[1] == 1:
            z = torch.cat([torch.zeros_like(z), z], 1)
        return torch.log_softmax(z, 1).cpu().numpy()

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class labels ``[n]`` (values of ``classes_``)."""
        z = self._logits(X)
        idx = (z[:, 0] > 0).long() if z.shape[1] == 1 else z.argmax(1)
        return self.classes_[idx.cpu().numpy()]

    def _logits(self, X: Any) -> Float[Tensor, "n K"]:
        check_is_fitted(self)
        device = resolve_device(self.device, default=input_device(X))
        if isinstance(X, Tensor):
            check_tensor(X, 2)
            validate_data(self, X, reset=False, skip_check_array=True)
        else:
            X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        # float64 at prediction: the cost is one product, and a float32 product's rounding depends
        # on the batch size, so a sample's prediction would depend on what it is predicted with.
        Xt = as_tensor(X, device, torch.float64)
        W = torch.as_tensor(self.coef_, device=device, dtype=torch.float64)
        return Xt @ W.T + torch.as_tensor(self.intercept_, device=device, dtype=torch.float64)


def _to_numpy(y: Any) -> Any:
    return y.detach().cpu().numpy() if isinstance(y, Tensor) else y
