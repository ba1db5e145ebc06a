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
contains the concept, and with labels balanced within each attribute (``design``, below) a probe
can only solve the control by decoding all three attributes and memorising an arbitrary table of
their combinations, which is what the word-type control asks of a probe. There is no default:
the right key depends on the target and the split, and a wrong one silently gives a meaningless
selectivity. :func:`control_labels` warns for the two degenerate choices it can see without the
split (every example its own type; types that are the labels), and :func:`type_overlap`
measures condition 1 for a split.

Types that combine attributes (``design``). A word type is atomic; an object type is not. Drawn
independently per type, as Hewitt & Liang draw per word, the labels of the 16 types that share a
colour (8 shapes x 2 sizes) are 16 draws, and some label is usually more common among them than
overall. A probe then beats chance on the control by decoding colour, shape and size
*separately* and adding their evidence, with no memorising at all. On a simulated representation that encodes the three
attributes as separate one-hot codes (8 shapes x 6 colours x 2 sizes, 300 training objects), such
a probe reaches 0.45 control accuracy against a majority rate of 0.25, so a perfectly
disentangled representation looked unselective. ``design="factorial"`` (the default for types of
two or more columns) assigns the labels so that every value of every attribute carries each
label in the real labels' proportions, as nearly as the counts allow. The control is then
solvable only through the combinations themselves, which is what memorising types means; the same
simulated probe scores 0.13 (chance 1/6) on it, while a representation with one code per type
still learns it (0.93). ``tests/unit/test_probing_helpers.py`` runs this simulation.
"""
from __future__ import annotations

import hashlib
import warnings
from collections import Counter
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


DESIGNS = ("auto", "factorial", "independent")


def control_labels(labels: Any, by: Any, *, seed: int = 0, design: str = "auto") -> np.ndarray | Tensor:
    """Hewitt & Liang control labels: one random label per type, in the real labels' proportions.

    Every distinct value of ``by`` (a type; see the module docstring for how to choose it) gets
    one label from the classes of ``labels``; every example gets its type's label, so the same
    type always has the same control label across examples and example orders. Call it once on
    the whole dataset, before splitting.

    Args:
        labels: ``[N]`` real labels (any sortable values).
        by: the type of each example: ``[N]`` values, an ``[N, k]`` array, or a DataFrame with
            ``N`` rows (each row one type), e.g. ``meta[["shape", "color", "size"]]``. Types
            compare by value after NumPy scalars become Python ones.
        seed: selects the random assignment.
        design: ``"independent"`` draws each type's label on its own from the labels' empirical
            distribution (Hewitt & Liang's word types); it depends only on ``seed``, the type and
            that distribution, so it is also the same across datasets and processes.
            ``"factorial"`` (types of two or more columns) balances the labels within every
            value of every column, so that no single attribute predicts them (see the module
            docstring); the assignment depends on the whole set of types and their counts.
            ``"auto"``: factorial for types of two or more columns, else independent.

    Returns:
        ``[N]`` control labels, values of ``labels``; a tensor if ``labels`` is one, else an array.

    Raises:
        InputError: if ``labels`` is empty or not 1-D, ``by`` has a different length, or
            ``design`` is unknown, or factorial for types of one column.

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
    if design not in DESIGNS:
        raise InputError(f"unknown control design {design!r}; expected one of {DESIGNS}")
    is_tensor = isinstance(labels, Tensor)
    y = labels.detach().cpu().numpy() if is_tensor else np.asarray(labels)
    if y.ndim != 1 or len(y) == 0:
        raise InputError(f"labels must be a non-empty 1-D sequence; got shape {y.shape}")
    keys = _keys(by, len(y))
    columns = len(keys[0]) if all(isinstance(k, tuple) for k in keys) else 1
    if design == "factorial" and columns < 2:
        raise InputError("design='factorial' balances labels across the columns of a type; got "
                         "types of one column (pass several, or design='independent')")
    factorial = columns >= 2 and design != "independent"
    classes, counts = np.unique(y, return_counts=True)
    types = list(dict.fromkeys(keys))
    if factorial:
        label_of = _factorial(keys, counts / counts.sum(), seed)
        label_of = {t: classes[c] for t, c in label_of.items()}
    else:
        cdf = np.cumsum(counts) / counts.sum()
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


def _factorial(keys: list[tuple], shares: np.ndarray, seed: int) -> dict[tuple, int]:
    """A class index per type such that, within every value of every column, the examples'
    classes come in ``shares`` as nearly as the counts allow.

    The cost is a chi-square statistic per column, summed: ``sum over columns, values, classes of
    (n[value, class] - e)^2 / e`` with ``e = n[value] * share[class]``, so that a rare value or a
    rare class counts as much as a common one. Types are placed one by one in a seeded order,
    each in the class that raises the cost least; then each type in turn is moved to its best
    class until none moves (every move lowers the cost, so the passes end). Ties go to a seeded
    draw per (type, class).
    """
    examples = Counter(keys)  # types in order of first appearance, with their example counts
    types, weights = list(examples), np.array(list(examples.values()), dtype=np.float64)
    order = sorted(range(len(types)), key=lambda i: _uniform(types[i], seed))
    columns, k = len(types[0]), len(shares)
    value_ids = [{v: j for j, v in enumerate(dict.fromkeys(t[f] for t in types))} for f in range(columns)]
    rows = np.array([[value_ids[f][t[f]] for f in range(columns)] for t in types])  # [types, columns]
    totals = [np.bincount(rows[:, f], weights, minlength=len(value_ids[f])) for f in range(columns)]
    expected = [np.outer(totals[f], shares) for f in range(columns)]  # n[value] share[class]
    deviation = [-e for e in expected]  # n[value, class] - n[value] share[class]
    ties = np.array([[_uniform((t, c), seed) for c in range(k)] for t in types])
    label = np.full(len(types), -1)

    def place(i: int, c: int, sign: int) -> None:
        for f in range(columns):
            deviation[f][rows[i, f], c] += sign * weights[i]

    def best(i: int) -> int:  # the class where adding type i raises the cost least
        w = weights[i]
        rise = np.round(sum(((deviation[f][rows[i, f]] + w) ** 2 - deviation[f][rows[i, f]] ** 2)
                            / expected[f][rows[i, f]] for f in range(columns)), 9)
        if label[i] >= 0 and rise[label[i]] == rise.min():  # a tie keeps the current class
            return int(label[i])
        return int(np.lexsort((ties[i], rise))[0])

    for i in order:
        label[i] = best(i)
        place(i, label[i], +1)
    for _ in range(100):  # each move lowers the cost, so this ends; 100 passes bound a pathological case
        moved = False
        for i in order:
            place(i, label[i], -1)
            c = best(i)
            moved |= c != label[i]
            label[i] = c
            place(i, c, +1)
        if not moved:
            break
    return {t: int(c) for t, c in zip(types, label)}


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
