"""``lp.probing.sweep`` end to end against the same analysis written with scikit-learn.

Run:  .venv/bin/python benchmarks/probes.py [--sizes 64 256 1024] [--layers 24] [--examples 3000]
                                            [--runs 5] [--data residual chance]

What users run: ``sweep({hook: X_layer}, target=y, control_by=types)`` on raw features (not
standardised beforehand), with its control task, Wilson intervals of accuracy and a 1000-draw
bootstrap of selectivity. The scikit-learn side does the same analysis as a researcher would write
it: per layer, ``make_pipeline(StandardScaler(), LogisticRegression())`` fitted on the target and
again on the same control labels, scored on the same held-out examples, the same Wilson interval
and a vectorised NumPy bootstrap of selectivity with the same number of draws. Both use C=1 and
scikit-learn's default tolerance (max_iter raised so that every scikit-learn fit converges).

Two kinds of features, each ``layers x examples x d`` float32 with six classes and 60 object types
(the class is a function of the type, as colour is of (shape, colour, size)):

* ``residual``: shaped like a residual stream: a power-law spectrum, separation growing with depth
  from chance to separable, norm growing with depth;
* ``chance``: the same, but only the last quarter of the layers carries the classes; the rest sit at
  chance (probes there converge slowly, as layers before a concept emerges do).

Each (size, data) pair runs ``--runs`` times, the two sides interleaved; the script prints the median
time ratio (scikit-learn / sweep) with its range, and the largest held-out accuracy difference over
all layers and runs. A second line per size times ``fit_many`` alone on the stacked, standardised
arrays against the scikit-learn loop of target fits, as before.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from statistics import NormalDist

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import lvlm_probe as lp
from lvlm_probe.probing import fit_many
from lvlm_probe.probing.controls import control_labels
from lvlm_probe.probing.splits import group_split

CLASSES, TYPES, N_BOOT, SEED = 6, 60, 1000, 0


def activations(layers: int, n: int, d: int, data: str, seed: int = 0):
    """``[layers, n, d]`` float32 features, ``[n]`` labels and ``[n]`` object types (see the module
    docstring)."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, TYPES, n)
    y = types % CLASSES
    spectrum = 1.0 / np.sqrt(np.arange(1, d + 1))
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    centres = rng.normal(size=(CLASSES, d)) / np.sqrt(d)
    out = np.empty((layers, n, d), dtype=np.float32)
    for layer, depth in enumerate(np.linspace(0.0, 1.0, layers)):
        separation = 1.2 * depth if data == "residual" else (1.2 if depth > 0.75 else 0.0)
        noise = (rng.normal(size=(n, d)) * spectrum) @ basis.T
        out[layer] = (1.0 + 9.0 * depth) * (noise + separation * centres[y])
    return out, y, types


def ours(X: np.ndarray, y: np.ndarray, types: np.ndarray):
    """The sweep as users call it; returns (seconds, accuracies [layers])."""
    features = {f"blocks.{layer}.hook_resid_post": X[layer] for layer in range(len(X))}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        table = lp.probing.sweep(features, y, hooks="blocks.*.hook_resid_post", control_by=types, groups=None,
                                 n_boot=N_BOOT, seed=SEED)
    return time.perf_counter() - start, table["accuracy"].to_numpy()


def wilson(k: int, n: int, z: float = NormalDist().inv_cdf(0.975)) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def theirs(X: np.ndarray, y: np.ndarray, types: np.ndarray):
    """The same analysis with scikit-learn and NumPy; returns (seconds, accuracies [layers])."""
    start = time.perf_counter()
    control = np.asarray(control_labels(y, by=types, seed=SEED))
    train, test = group_split(np.arange(len(y)), test_size=0.25, seed=SEED)
    rng = np.random.default_rng(SEED)
    draws = rng.integers(0, len(test), (N_BOOT, len(test)))
    accuracies = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # a fit that stops early is not a fair time
        for layer in range(len(X)):
            right = []
            for labels in (y, control):
                fit = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
                fit.fit(X[layer, train], labels[train])
                right.append(fit.predict(X[layer, test]) == labels[test])
            accuracies.append(right[0].mean())
            wilson(int(right[0].sum()), len(test))
            difference = right[0].astype(float) - right[1]
            np.percentile(difference[draws].mean(1), [2.5, 97.5])
    return time.perf_counter() - start, np.array(accuracies)


def fit_many_line(X: np.ndarray, y: np.ndarray):
    """fit_many on stacked standardised arrays vs a scikit-learn loop of target fits."""
    train, test = group_split(np.arange(len(y)), test_size=0.25, seed=SEED)
    mean, std = X[:, train].mean(1, keepdims=True), X[:, train].std(1, keepdims=True) + 1e-12
    Xs = torch.as_tensor((X - mean) / std)
    start = time.perf_counter()
    fit_many(Xs[:, train], torch.as_tensor(y[train]), C=1.0).accuracy(Xs[:, test], torch.as_tensor(y[test]))
    batched = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        for layer in range(len(X)):
            LogisticRegression(C=1.0, max_iter=5000).fit(Xs[layer, train].numpy(), y[train])
    return (time.perf_counter() - start) / batched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data", nargs="+", default=["residual", "chance"], choices=["residual", "chance"])
    args = parser.parse_args()
    print(f"{args.layers} layers x {args.examples} examples, {CLASSES} classes, control task, {N_BOOT} "
          f"bootstrap draws; {torch.get_num_threads()} threads; median of {args.runs} runs [min, max]\n")
    print(f"{'d':>6} {'data':>9}  {'sklearn / sweep':>24}  {'max |acc diff|':>14}  {'target':>7}")
    X, y, types = activations(2, 300, 16, "residual")
    ours(X, y, types), theirs(X, y, types)  # warm-up: first calls load and set up kernels
    for d in args.sizes:
        for data in args.data:
            X, y, types = activations(args.layers, args.examples, d, data)
            ratios, diffs = [], []
            for _ in range(args.runs):
                t_ours, a_ours = ours(X, y, types)
                t_theirs, a_theirs = theirs(X, y, types)
                ratios.append(t_theirs / t_ours)
                diffs.append(float(np.abs(a_ours - a_theirs).max()))
            target = 1.0 if d < 256 else 5.0
            met = statistics.median(ratios) >= target and max(diffs) <= 0.01
            print(f"{d:>6} {data:>9}  {statistics.median(ratios):>8.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]"
                  f"  {max(diffs):>14.4f}  {'>= ' + str(target):>7} {'met' if met else 'NOT MET'}")
        X, y, _ = activations(args.layers, args.examples, d, "residual")
        print(f"{d:>6} {'fit_many':>9}  {fit_many_line(X, y):>8.2f}x (fit_many alone vs the sklearn loop of "
              "target fits, one run)")


if __name__ == "__main__":
    main()
