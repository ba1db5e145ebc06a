"""How aligned two representations of the same examples are: paired cosine, mutual k-NN and CKA.

Row ``i`` of ``X`` and row ``i`` of ``Y`` describe the same example, e.g. image ``i``'s mean
image-token state in the vision tower and its caption's mean state in the language model. Inputs
are torch tensors or numpy arrays ``[n, d]``; work stays on their device; scalars are floats.

References: Kornblith et al. (2019), "Similarity of Neural Network Representations Revisited"
(CKA ports their ``representation_similarity/Demo.ipynb``); Huh et al. (2024), "The Platonic
Representation Hypothesis" (``mutual_knn`` is their metric on L2-normalised features).
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from .errors import InputError

MatrixX = Float[Tensor, "n d_x"] | Float[np.ndarray, "n d_x"]
MatrixY = Float[Tensor, "n d_y"] | Float[np.ndarray, "n d_y"]
Layer = str | int
KERNELS = ("linear", "rbf")
__all__ = ["paired_cosine", "cosine", "mutual_knn", "cka", "feature_space_linear_cka", "alignment_curve", "cka_map"]


def _matrix(x: Any, name: str, wide: bool = False) -> Tensor:
    """``x`` as a detached 2-D floating tensor on its own device, with every value finite."""
    if not isinstance(x, Tensor):
        try:
            x = torch.from_numpy(np.asarray(x))
        except (TypeError, ValueError) as err:
            raise InputError(f"{name} must be a tensor or array [n, d]; got {type(x).__name__}") from err
    if x.ndim != 2 or 0 in x.shape:
        raise InputError(f"{name} must be 2-D [n, d], one row per example; got shape {tuple(x.shape)}")
    if wide:  # CKA sums n^2 products; MPS has no float64, so it keeps float32 there
        dtype = torch.float32 if x.device.type == "mps" else torch.float64
    else:  # half precision would round near neighbours into ties
        dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.detach().to(dtype)
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{name} must be finite; got {bad} NaN or infinite values of {x.numel()}")
    return x


def _pair(
    x: Any, y: Any, *, min_n: int = 1, same_d: bool = False, wide: bool = False,
    names: tuple[str, str] = ("X", "Y"),
) -> tuple[Tensor, Tensor]:
    """Validated paired matrices of one dtype on one device."""
    (a, b), x, y = names, _matrix(x, names[0], wide), _matrix(y, names[1], wide)
    if x.shape[0] != y.shape[0] or (same_d and x.shape[1] != y.shape[1]):
        what = "shape [n, d]" if same_d else "number of rows n (row i of each is example i)"
        raise InputError(f"{a} and {b} must have the same {what}; got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < min_n:
        raise InputError(f"this metric needs at least {min_n} examples; got n={x.shape[0]}")
    if x.device != y.device:
        raise InputError(f"{a} and {b} must be on one device; got {x.device} and {y.device}")
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype), y.to(dtype)


def paired_cosine(X: MatrixX, Y: MatrixX) -> Float[Tensor, " n"]:
    """Cosine similarity of each row of ``X`` with the same row of ``Y``.

    Args:
        X: ``[n, d]`` tensor or array.
        Y: ``[n, d]``, the same shape as ``X``.

    Returns:
        ``[n]`` tensor on the inputs' device; a row of zeros has similarity 0.

    Raises:
        InputError: if the shapes differ, an input is not 2-D, or a value is NaN or infinite.

    Example:
        >>> paired_cosine(img_states, text_states).argmin()   # the least aligned pair
    """
    x, y = _pair(X, Y, same_d=True)
    return torch.nn.functional.cosine_similarity(x, y, dim=1)


def cosine(X: MatrixX, Y: MatrixX) -> float:
    """Mean over rows of the paired cosine similarity (:func:`paired_cosine`).

    Example:
        >>> cosine(img_states, text_states)   # 1.0 if every pair points the same way
    """
    return float(paired_cosine(X, Y).mean())


def _knn(x: Tensor, k: int) -> Tensor:
    z = torch.nn.functional.normalize(x, dim=1)
    return (z @ z.T).fill_diagonal_(-torch.inf).topk(k, dim=1).indices  # self is no neighbour


def mutual_knn(X: MatrixX, Y: MatrixY, k: int = 10) -> float:
    """Mean overlap of each example's k nearest neighbours in ``X`` and in ``Y``.

    Neighbours are by cosine similarity, self excluded; the score is the mean over rows of
    ``|N_X(i) & N_Y(i)| / k`` (Huh et al. 2024, ``mutual_knn``). It is 1 when both spaces rank
    neighbours alike, and ``k / (n - 1)`` in expectation for unrelated representations.

    Args:
        X: ``[n, d_x]`` tensor or array.
        Y: ``[n, d_y]``; ``d_y`` may differ from ``d_x``.
        k: neighbours per example, ``1 <= k < n``.

    Returns:
        The score in ``[0, 1]``.

    Raises:
        InputError: for a bad ``k``, different ``n``, an input that is not 2-D, or NaN.

    Example:
        >>> mutual_knn(vision_states, text_states, k=10)
    """
    x, y = _pair(X, Y)
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k < n:
        raise InputError(f"k must be an integer with 1 <= k < n = {n} (self is excluded); got k={k!r}")
    in_x = torch.zeros(n, n, dtype=torch.bool, device=x.device).scatter_(1, _knn(x, int(k)), True)
    shared = in_x.gather(1, _knn(y, int(k))).sum()
    return int(shared) / (n * int(k))


def _check_kernel(kernel: str, threshold: float) -> None:
    if kernel not in KERNELS:
        raise InputError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    if not (isinstance(threshold, numbers.Real) and threshold > 0):
        raise InputError(f"threshold must be a number > 0; got {threshold!r}")


def _gram(x: Float[Tensor, "n d"], kernel: str, threshold: float) -> Float[Tensor, "n n"]:
    """Kornblith et al.'s ``gram_linear`` or ``gram_rbf`` (bandwidth: threshold x median distance)."""
    dot = x @ x.T
    if kernel == "linear":
        return dot
    sq_dist = -2 * dot + dot.diagonal()[:, None] + dot.diagonal()[None, :]
    # numpy's median (their code) averages the two middle values; torch.median takes the lower one
    flat = sq_dist.flatten().sort().values
    median = (flat[(flat.numel() - 1) // 2] + flat[flat.numel() // 2]) / 2
    if not median > 0:
        raise InputError(f"RBF bandwidth is 0: median squared distance between rows is {float(median)}")
    return torch.exp(-sq_dist / (2 * threshold**2 * median))


def _center_gram(gram: Float[Tensor, "n n"], unbiased: bool) -> Float[Tensor, "n n"]:
    """Kornblith et al.'s ``center_gram``; ``unbiased`` makes <K, L> the unbiased HSIC (Song et al. 2012)."""
    gram, n = gram.clone(), gram.shape[0]
    if unbiased:  # Szekely & Rizzo (2014)'s form of the U-statistic, which they found more stable
        gram.fill_diagonal_(0)
        means = gram.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
    else:
        means = gram.mean(0)
        means -= means.mean() / 2
    gram -= means[:, None]
    gram -= means[None, :]
    return gram.fill_diagonal_(0) if unbiased else gram


def _unit_gram(x: Tensor, kernel: str, debiased: bool, threshold: float, name: str) -> Tensor:
    """Centred Gram matrix scaled to unit Frobenius norm, so CKA is one inner product."""
    try:
        gram = _center_gram(_gram(x, kernel, threshold), debiased)
    except InputError as err:
        raise InputError(f"{name}: {err}") from err
    norm = torch.linalg.norm(gram)
    if not norm > 0:
        raise InputError(f"{name} does not vary across rows, so CKA is undefined")
    return gram / norm


def _gram_cka(x: Tensor, y: Tensor, kernel: str, debiased: bool, threshold: float) -> float:
    """Kornblith et al.'s ``cka(gram_x, gram_y, debiased)`` on the kernel's Gram matrices."""
    gx = _unit_gram(x, kernel, debiased, threshold, "X")
    return float((gx * _unit_gram(y, kernel, debiased, threshold, "Y")).sum())


def _debiased_dot(xty: Tensor, rows_x: Tensor, rows_y: Tensor, sq_x: Tensor, sq_y: Tensor, n: int) -> Tensor:
    # Song et al.'s unbiased HSIC, rewritten in feature space (Kornblith et al.'s helper)
    return xty - n / (n - 2.0) * rows_x.dot(rows_y) + sq_x * sq_y / ((n - 1) * (n - 2))


def _feature_cka(x: Tensor, y: Tensor, debiased: bool) -> float:
    x, y = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    dot = torch.linalg.norm(x.T @ y) ** 2
    norm_x, norm_y = torch.linalg.norm(x.T @ x), torch.linalg.norm(y.T @ y)
    if not (norm_x > 0 and norm_y > 0):
        raise InputError(f"{'X' if not norm_x > 0 else 'Y'} does not vary across rows, so CKA is undefined")
    if debiased:
        n = x.shape[0]
        rows_x, rows_y = torch.einsum("ij,ij->i", x, x), torch.einsum("ij,ij->i", y, y)
        sq_x, sq_y = rows_x.sum(), rows_y.sum()
        dot = _debiased_dot(dot, rows_x, rows_y, sq_x, sq_y, n)
        norm_x = torch.sqrt(_debiased_dot(norm_x**2, rows_x, rows_x, sq_x, sq_x, n))
        norm_y = torch.sqrt(_debiased_dot(norm_y**2, rows_y, rows_y, sq_y, sq_y, n))
    return float(dot / (norm_x * norm_y))


def feature_space_linear_cka(X: MatrixX, Y: MatrixY, debiased: bool = False) -> float:
    """Linear CKA from feature products ``||Y^T X||_F^2`` (Kornblith et al.'s ``feature_space_linear_cka``).

    The same value as the Gram-matrix path of :func:`cka` with ``kernel="linear"``, which picks
    this path by itself when features are fewer than examples.

    Args:
        X: ``[n, d_x]`` tensor or array.
        Y: ``[n, d_y]``.
        debiased: use the unbiased HSIC estimator, as in :func:`cka`.

    Returns:
        Linear CKA.

    Raises:
        InputError: as :func:`cka`.

    Example:
        >>> feature_space_linear_cka(vision_states, text_states)
    """
    return _feature_cka(*_pair(X, Y, min_n=4 if debiased else 2, wide=True), debiased)


def cka(X: MatrixX, Y: MatrixY, kernel: str = "linear", debiased: bool = False, threshold: float = 1.0) -> float:
    """Centered kernel alignment, ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` (Kornblith et al. 2019).

    Linear CKA is invariant to orthogonal transforms and isotropic scaling of either input, not to
    arbitrary invertible linear maps; ``cka(X, X) == 1``. Computed in float64.

    Args:
        X: ``[n, d_x]`` tensor or array.
        Y: ``[n, d_y]``; ``d_y`` may differ from ``d_x``.
        kernel: ``"linear"`` or ``"rbf"``.
        debiased: use the unbiased HSIC estimator (Song et al. 2012); for small ``n``. It may be
            negative, and NaN when ``n`` is tiny. Needs ``n >= 4``.
        threshold: RBF bandwidth as a fraction of the median distance between rows.

    Returns:
        CKA, in ``[0, 1]`` unless ``debiased``.

    Raises:
        InputError: for an unknown kernel, different ``n``, too few rows, a constant input or NaN.

    Example:
        >>> cka(vision_states, text_states, kernel="rbf", threshold=0.5)
    """
    _check_kernel(kernel, threshold)
    x, y = _pair(X, Y, min_n=4 if debiased else 2, wide=True)
    if kernel == "linear" and max(x.shape[1], y.shape[1]) < x.shape[0]:
        return _feature_cka(x, y, debiased)  # d x d products beat n x n Gram matrices here
    return _gram_cka(x, y, kernel, debiased, threshold)


METRICS: dict[str, Callable[..., float]] = {"cosine": cosine, "mutual_knn": mutual_knn, "cka": cka}


def alignment_curve(
    xs: Mapping[Layer, MatrixX], ys: Mapping[Layer, MatrixY] | MatrixY, metric: str = "cka", **kw: Any
) -> pd.DataFrame:
    """One alignment value per layer: each ``xs[layer]`` against ``ys[layer]``, or against one ``ys``.

    Args:
        xs: layer -> ``[n, d]`` states, e.g. image-token states at each language-model layer.
        ys: layer -> ``[n, d]`` with the same layers as ``xs``, or one ``[n, d]`` reference.
        metric: ``"cosine"``, ``"mutual_knn"`` or ``"cka"``.
        **kw: passed to the metric (``k=``, ``kernel=``, ``debiased=``, ``threshold=``).

    Returns:
        DataFrame with columns ``layer``, ``metric``, ``value``, one row per layer of ``xs``.

    Raises:
        InputError: for an unknown metric, no layers, layers that differ, or a bad layer (named).

    Example:
        >>> alignment_curve(image_states, text_states, metric="mutual_knn", k=10)
    """
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; expected one of {tuple(METRICS)}")
    if not xs:
        raise InputError("xs has no layers; expected a dict layer -> [n, d] states")
    if isinstance(ys, Mapping) and set(xs) != set(ys):
        only = [sorted(map(str, set(a) - set(b))) for a, b in ((xs, ys), (ys, xs))]
        raise InputError(f"xs and ys must have the same layers; only in xs: {only[0]}, only in ys: {only[1]}")
    rows = []
    for layer, x in xs.items():
        try:
            value = METRICS[metric](x, ys[layer] if isinstance(ys, Mapping) else ys, **kw)
        except InputError as err:
            raise InputError(f"layer {layer!r}: {err}") from err
        rows.append({"layer": layer, "metric": metric, "value": value})
    return pd.DataFrame(rows, columns=["layer", "metric", "value"])


def cka_map(
    A: Mapping[Layer, MatrixX], B: Mapping[Layer, MatrixY], kernel: str = "linear", debiased: bool = False,
    threshold: float = 1.0, as_tensor: bool = False,
) -> pd.DataFrame | Float[Tensor, "layer_a layer_b"]:
    """CKA between every layer of ``A`` and every layer of ``B``, e.g. vision tower x language model.

    Each layer's centred Gram matrix is built once, so memory holds ``len(B) + 1`` of ``[n, n]``.

    Args:
        A: layer -> ``[n, d_a]`` states; all layers of ``A`` and ``B`` share the same ``n`` examples.
        B: layer -> ``[n, d_b]`` states.
        kernel, debiased, threshold: as in :func:`cka`.
        as_tensor: return a ``[len(A), len(B)]`` float64 tensor in the dicts' order.

    Returns:
        DataFrame with columns ``layer_a``, ``layer_b``, ``value`` (one row per pair), or the tensor.

    Raises:
        InputError: as :func:`cka`, naming the layer; or if ``A`` or ``B`` is empty.

    Example:
        >>> cka_map(vision_layers, lm_layers, as_tensor=True)   # [24, 32]
    """
    _check_kernel(kernel, threshold)
    if not A or not B:
        raise InputError(f"A and B need at least one layer each; got {len(A)} and {len(B)}")
    (first, ref), min_n = next(iter(A.items())), 4 if debiased else 2

    def unit(side: str, layer: Layer, x: Any) -> Tensor:
        name = f"{side}[{layer!r}]"  # every layer is paired with A's first: same n, same device
        x = _pair(ref, x, min_n=min_n, wide=True, names=(f"A[{first!r}]", name))[1]
        return _unit_gram(x, kernel, debiased, threshold, name)

    grams_b = {lb: unit("B", lb, y) for lb, y in B.items()}
    values = []
    for la, x in A.items():
        ga = unit("A", la, x)
        values.append([float((ga * gb).sum()) for gb in grams_b.values()])
    if as_tensor:
        return torch.tensor(values, dtype=torch.float64)
    rows = [(la, lb, v) for la, row in zip(A, values) for lb, v in zip(grams_b, row)]
    return pd.DataFrame(rows, columns=["layer_a", "layer_b", "value"])
