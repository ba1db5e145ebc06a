"""Control tasks (Hewitt & Liang, 2019, "Designing and Interpreting Probes with Control Tasks").

A control task gives every input *type* a random label and every example its type's label. In
Hewitt & Liang the type is the word type: each word type ``v`` gets a label ``C(v)`` drawn
independently from the empirical distribution of the real labels (part-of-speech tags), and every
token of ``v`` carries ``C(v)`` whatever its context. The control has the real task's inputs and
label space but no structure, so a probe can only solve it by memorising types from the
representation. Selectivity = task accuracy - control accuracy (same probe family, same
hyperparameters, same split); a probe is selective when it decodes the concept but cannot
memorise arbitrary type labels.

Choosing the type (``by``) for images. Two conditions make the control meaningful:

1. **Types recur across the train/test split.** Word types recur across sentences, so a probe that
   memorised "cat -> 37" in training is tested on new tokens of "cat". If no test type occurs in
   training, control accuracy is chance by construction and selectivity degenerates to accuracy
   minus chance. Probing sweeps split by scene (:func:`~lvlm_probe.probing.group_split`, so no
   scene leaks between train and test); a scene id, an object instance or a hash of the image is
   therefore *not* a usable type under that split (check with :func:`type_overlap`). A scene id
   is the right type only when the same scene appears in both splits (e.g. several renderings,
   crops or prompts of a scene, split by example rather than by scene).
2. **Types are finer than the concept.** If the type is the concept value itself (``by=color``
   for a colour probe), the control labels are a relabelling of the real labels and the probe
   solves the control exactly as it solves the task: selectivity 0 by construction.

The analogue of a word type is therefore the identity of the *thing being probed* at the
granularity at which it recurs: for an object-level probe in ShapesWorld, the object type
``(shape, color, size)`` (``by=meta[["shape", "color", "size"]]``): it recurs across scenes,
contains the concept, and a probe can only solve the control by decoding all three attributes
and memorising an arbitrary table of their combinations, which is what the word-type control
asks of a probe. There is no default: the right key depends on the target and the split, and a
wrong one silently gives a meaningless selectivity. :func:`control_labels` warns for the two
degenerate choices it can see without the split (every example its own type; types that are
the labels), and :func:`type_overlap` measures condition 1 for a split.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..errors import InputError


def _keys(by: Any, n: int) -> list:
    """One hashable key per example from a column, a 2-D array or a DataFrame (rows as tuples)."""
    if isinstance(by, pd.DataFrame):
        rows = by.to_numpy(dtype=object).tolist()
    elif isinstance(by, Tensor):
        rows = by.detach().cpu().tolist()
    elif isinstance(by, pd.Series):
        rows = by.tolist()
    else:
        rows = np.asarray(by, dtype=object).tolist()
    if len(rows) != n:
        raise InputError(f"by must give one type per example: expected {n}, got {len(rows)}")
    return [tuple(map(_plain, r)) if isinstance(r, (list, tuple)) else _plain(r) for r in rows]


def _plain(v: Any) -> Any:
    # NumPy scalars print differently from Python ones (np.int64(3) vs 3); keys hash by repr.
    return v.item() if isinstance(v, np.generic) else v


def _uniform(key: Any, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, key): the same type gets the same draw in any process,
    dataset or order (Python's own hash of a string changes between processes)."""
    digest = hashlib.blake2b(f"{seed}\x1f{key!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def control_labels(labels: Any, by: Any, *, seed: int = 0) -> np.ndarray | Tensor:
    """Hewitt & Liang control labels: one random label per type, drawn from the real labels'
    empirical distribution.

    Every distinct value of ``by`` (a type; see the module docstring for how to choose it) gets a
    label drawn independently from the empirical distribution of ``labels``; every example gets
    its type's label. The draw for a type depends only on ``seed``, the type's value and that
    distribution, so the same type always gets the same control label: across examples, calls,
    processes and example orders. Call it once on the whole dataset, before splitting.

    Args:
        labels: ``[N]`` real labels (any sortable values).
        by: the type of each example: ``[N]`` values, an ``[N, k]`` array, or a DataFrame with
            ``N`` rows (each row one type), e.g. ``meta[["shape", "color", "size"]]``. Types
            compare by value after NumPy scalars become Python ones.
        seed: selects the random assignment.

    Returns:
        ``[N]`` control labels, values of ``labels``; a tensor if ``labels`` is one, else an array.

    Raises:
        InputError: if ``labels`` is empty or not 1-D, or ``by`` has a different length.

    Warns:
        UserWarning: if every example is its own type (the control cannot be learned beyond
            chance on held-out data) or the types are the labels (the control is a relabelling of
            the task).

    Example:
        >>> meta = store.meta
        >>> ctl = control_labels(meta["color"], by=meta[["shape", "color", "size"]], seed=0)
        >>> train, test = group_split(meta["scene"], seed=0)
        >>> type_overlap(meta[["shape", "color", "size"]], train, test)   # near 1: usable
    """
    is_tensor = isinstance(labels, Tensor)
    y = labels.detach().cpu().numpy() if is_tensor else np.asarray(labels)
    if y.ndim != 1 or len(y) == 0:
        raise InputError(f"labels must be a non-empty 1-D sequence; got shape {y.shape}")
    keys = _keys(by, len(y))
    classes, counts = np.unique(y, return_counts=True)
    cdf = np.cumsum(counts) / counts.sum()
    types = list(dict.fromkeys(keys))
    draws = np.array([_uniform(k, seed) for k in types])
    # Inverse-CDF sampling; the clip guards against cdf[-1] rounding to just below 1.
    drawn = classes[np.minimum(np.searchsorted(cdf, draws, side="right"), len(classes) - 1)]
    label_of = dict(zip(types, drawn))
    out = np.array([label_of[k] for k in keys], dtype=y.dtype)

    if len(types) == len(y) and len(y) > 1:
        warnings.warn(
            "every example is its own type: no control label recurs, so a held-out control "
            "accuracy is chance by construction; use a key shared by several examples",
            stacklevel=2,
        )
    pairs = set(zip(keys, y.tolist()))
    if len(pairs) == len(types) == len(classes):
        warnings.warn(
            "the types correspond one-to-one to the labels: the control task is a relabelling of "
            "the real task and selectivity will be 0; use a key finer than the label",
            stacklevel=2,
        )
    return torch.as_tensor(out, device=labels.device) if is_tensor else out


def type_overlap(by: Any, train_idx: Any, test_idx: Any) -> float:
    """Fraction of test examples whose type also occurs in the training set.

    A control task is informative only if this is well above 0 (see the module docstring); at 0
    every control test label is a fresh random draw and control accuracy is chance.

    Args:
        by: the types, as for :func:`control_labels`.
        train_idx: indices of training examples.
        test_idx: indices of test examples.

    Returns:
        A fraction in [0, 1].

    Raises:
        InputError: for indices outside the examples.

    Example:
        >>> type_overlap(meta["scene"], *group_split(meta["scene"]))   # scene split, scene types
        0.0
    """
    keys = _keys(by, len(by))
    train_idx, test_idx = (np.asarray(i, dtype=np.int64).reshape(-1) for i in (train_idx, test_idx))
    for name, idx in (("train_idx", train_idx), ("test_idx", test_idx)):
        if len(idx) and not (0 <= idx.min() and idx.max() < len(keys)):
            raise InputError(
                f"{name} must index the {len(keys)} examples; got values in "
                f"[{idx.min()}, {idx.max()}]"
            )
    seen = {keys[i] for i in train_idx}
    return float(np.mean([keys[i] in seen for i in test_idx])) if len(test_idx) else 0.0
