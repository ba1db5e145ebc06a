"""Batched probe sweep vs a loop of scikit-learn LogisticRegression fits on the same activations.

Run:  .venv/bin/python benchmarks/probes.py [--sizes 64 256 1024] [--layers 24] [--examples 3000]

Activations are synthetic and shaped like a residual stream: ``layers`` layers of ``examples``
vectors of each hidden size, six classes whose separation grows with depth (early layers near
chance, late layers easy) and whose scale grows with depth, as the residual stream's norm does.
Both sides fit one L2 multinomial logistic regression per layer with C=1 on the same standardised
features and the same 75/25 split, and are scored on the same held-out examples: lvlm_probe in one
batched run (``probing.fit_many``), scikit-learn in a Python loop of ``LogisticRegression(lbfgs)``
(its defaults: tol 1e-4; max_iter raised so that every fit converges). The script prints, per size,
the time ratio (sklearn loop / batched) and the largest accuracy difference over layers, from one
run.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from lvlm_probe.probing import fit_many


def activations(layers: int, n: int, d: int, classes: int = 6, seed: int = 0):
    """``[layers, n, d]`` float32 features and ``[n]`` labels, shaped like a residual stream: a
    power-law spectrum of variances (a few directions carry most of the variance, as in trained
    transformers), the classes' means along random directions at a separation that grows with
    depth (chance at the first layer, separable at the last), and a norm that grows
    with depth."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    spectrum = 1.0 / np.sqrt(np.arange(1, d + 1))
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    centres = rng.normal(size=(classes, d)) / np.sqrt(d)
    out = np.empty((layers, n, d), dtype=np.float32)
    for layer, depth in enumerate(np.linspace(0.0, 1.0, layers)):
        noise = (rng.normal(size=(n, d)) * spectrum) @ basis.T
        out[layer] = (1.0 + 9.0 * depth) * (noise + 1.2 * depth * centres[y])
    return out, y


def standardised(X: np.ndarray, train: np.ndarray) -> np.ndarray:
    mean = X[:, train].mean(1, keepdims=True)
    std = X[:, train].std(1, keepdims=True) + 1e-12
    return ((X - mean) / std).astype(np.float32)


def run(layers: int, n: int, d: int, device: str, chunk_size: int | None = None) -> dict:
    X, y = activations(layers, n, d)
    rng = np.random.default_rng(1)
    order = rng.permutation(n)
    train, test = np.sort(order[: 3 * n // 4]), np.sort(order[3 * n // 4:])
    Xs = standardised(X, train)

    start = time.perf_counter()
    Xt = torch.as_tensor(Xs, device=device)
    probes = fit_many(Xt[:, train], torch_labels(y[train], device), C=1.0, tol=1e-4, max_iter=1000,
                      chunk_size=chunk_size)
    ours = probes.accuracy(Xt[:, test], torch_labels(y[test], device)).cpu().numpy()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    batched = time.perf_counter() - start

    start = time.perf_counter()
    theirs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # a fit that stops early is not a fair time
        for layer in range(layers):
            fit = LogisticRegression(C=1.0, max_iter=5000).fit(Xs[layer, train], y[train])
            theirs.append(fit.score(Xs[layer, test], y[test]))
    loop = time.perf_counter() - start
    return {"d": d, "batched_s": batched, "sklearn_s": loop, "ratio": loop / batched,
            "max_acc_diff": float(np.abs(ours - np.array(theirs)).max()),
            "acc_range": (float(min(theirs)), float(max(theirs)))}


def torch_labels(y: np.ndarray, device: str) -> torch.Tensor:
    return torch.as_tensor(y, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="probes fitted at a time (default all; smaller chunks bound memory)")
    args = parser.parse_args()
    print(f"{args.layers} layers x {args.examples} examples, 6 classes, C=1, standardised features; "
          f"lvlm_probe on {args.device} with {torch.get_num_threads()} threads\n")
    print(f"{'d':>6}  {'sklearn loop / batched':>22}  {'seconds':>13}  {'target':>8}  {'max |acc diff|':>14}  "
          f"{'sklearn acc range':>18}")
    run(2, 300, 16, args.device)  # warm-up: both libraries' first calls load and set up kernels
    for d in args.sizes:
        r = run(args.layers, args.examples, d, args.device, args.chunk_size)
        target = ">= 1.0" if d < 256 else ">= 5.0"
        met = r["ratio"] >= (1.0 if d < 256 else 5.0) and r["max_acc_diff"] <= 0.01
        print(f"{d:>6}  {r['ratio']:>22.2f}  {r['sklearn_s']:>6.2f} / {r['batched_s']:<4.2f}  {target:>8}  "
              f"{r['max_acc_diff']:>14.4f}  "
              f"{r['acc_range'][0]:>8.3f} .. {r['acc_range'][1]:.3f}  {'met' if met else 'NOT MET'}")


if __name__ == "__main__":
    main()
