"""LinearProbe against scikit-learn, and batched fitting against separate fits."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from lvlm_probe.errors import InputError
from lvlm_probe.probing import BatchedProbes, LinearProbe, fit_many
from lvlm_probe.probing import batched as batched_module
from lvlm_probe.probing._solver import _objective, _runs, _take, curvature_preconditioner


def dataset(n_classes: int, d: int, n: int = 400, seed: int = 0):
    """Overlapping classes (not separable): the optimum is set by the data, not by C alone."""
    X, y = make_classification(
        n_samples=n, n_features=d, n_informative=min(d, 8), n_redundant=0, n_classes=n_classes,
        n_clusters_per_class=1, class_sep=0.8, flip_y=0.05, random_state=seed,
    )
    return X * np.linspace(0.5, 2.0, d), y  # uneven feature scales, as in real activations


def layer_stack(P: int, n: int, d: int, K: int, seed: int = 0):
    """A [P, n, d] stack whose class signal and scale grow with depth, like a residual stream."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    means = torch.randn(K, d, generator=g) / d**0.5
    X = torch.stack([
        (1 + p) * (means[y] * (p + 1) + torch.randn(n, d, generator=g)) for p in range(P)
    ])
    return X, y


def objective_gradient(X, y, coef, intercept, C):
    """max |gradient| per probe of scikit-learn's objective / n, by autograd in float64: [P]."""
    W = coef.clone().requires_grad_(True)
    b = intercept.clone().requires_grad_(True)
    z = torch.einsum("pnd,pkd->pnk", X.double(), W) + b[:, None]
    ce = torch.nn.functional.cross_entropy(z.flatten(0, 1), y.repeat(len(X)), reduction="none")
    f = (ce.view(len(X), -1).sum(1) + W.pow(2).sum((1, 2)) / (2 * C)) / X.shape[1]
    gW, gb = torch.autograd.grad(f.sum(), (W, b))
    return torch.maximum(gW.abs().amax((1, 2)), gb.abs().amax(1))


# ---- LinearProbe --------------------------------------------------------------------------------

@pytest.mark.parametrize("n_classes,d,C", [(2, 20, 1.0), (5, 64, 1.0), (3, 32, 0.05)])
def test_solution_matches_sklearn(n_classes, d, C):
    X, y = dataset(n_classes, d)
    ref = LogisticRegression(C=C, solver="lbfgs", tol=1e-12, max_iter=20000).fit(X, y)
    probe = LinearProbe(C=C, dtype="float64", tol=1e-10, max_iter=5000).fit(X, y)
    assert probe.coef_.shape == ref.coef_.shape  # [1, d] for two classes, as scikit-learn
    np.testing.assert_allclose(probe.coef_, ref.coef_, atol=1e-5)
    np.testing.assert_allclose(probe.intercept_, ref.intercept_, atol=1e-5)
    np.testing.assert_allclose(probe.predict_proba(X), ref.predict_proba(X), atol=1e-6)
    np.testing.assert_allclose(probe.decision_function(X), ref.decision_function(X), atol=1e-5)
    assert probe.score(X, y) == ref.score(X, y)
    np.testing.assert_array_equal(probe.classes_, ref.classes_)

    # The default float32 features still reach scikit-learn's solution closely.
    fast = LinearProbe(C=C, tol=1e-6).fit(torch.as_tensor(X, dtype=torch.float32), y)
    np.testing.assert_allclose(fast.coef_, ref.coef_, atol=1e-3)
    np.testing.assert_allclose(fast.predict_proba(X), ref.predict_proba(X), atol=1e-4)


def test_string_labels_and_tensor_input_give_the_numpy_result():
    X, y = dataset(3, 16)
    names = np.array(["red", "green", "blue"])[y]
    a = LinearProbe().fit(X, names)
    b = LinearProbe().fit(torch.as_tensor(X), names)
    np.testing.assert_array_equal(a.classes_, ["blue", "green", "red"])
    np.testing.assert_allclose(a.coef_, b.coef_)
    np.testing.assert_array_equal(a.predict(torch.as_tensor(X)), b.predict(X))
    assert set(a.predict(X)) <= set(names)


def test_clone_and_params():
    probe = LinearProbe(C=0.3, dtype="float64", max_iter=50)
    copy = clone(probe)
    assert copy.get_params() == probe.get_params()
    assert copy.set_params(C=2.0).C == 2.0 and probe.C == 0.3
    fitted = probe.fit(*dataset(2, 8))
    with pytest.raises(NotFittedError):
        clone(fitted).predict(np.zeros((1, 8)))
    assert fitted.n_iter_.shape == (1,) and 1 <= fitted.n_iter_[0] <= 50
    assert fitted.n_features_in_ == 8


def test_bad_input_is_rejected_with_what_was_received():
    X, y = dataset(2, 8)
    with pytest.raises(InputError, match="only one class"):
        LinearProbe().fit(X, np.zeros(len(X), dtype=int))
    with pytest.raises(InputError, match="C must be a positive number; got -1"):
        LinearProbe(C=-1).fit(X, y)
    with pytest.raises(InputError, match="unknown dtype 'int8'"):
        LinearProbe(dtype="int8").fit(X, y)
    Xt = torch.tensor(X)
    Xt[3, 2] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        LinearProbe().fit(Xt, y)
    with pytest.raises(InputError, match="X has 400 samples but y has 399"):
        LinearProbe().fit(torch.as_tensor(X), y[:-1])
    with pytest.raises(ValueError, match="features"):
        LinearProbe().fit(X, y).predict(X[:, :5])


def test_too_few_iterations_warn():
    X, y = dataset(5, 64)
    with pytest.warns(Warning, match="did not reach tol"):
        LinearProbe(max_iter=2).fit(X, y)


# Every check of scikit-learn's estimator suite runs; none is expected to fail. One skips itself:
# check_array_api_input ("SCIPY_ARRAY_API is not set"); it tests array-API dispatch, which this
# estimator does not declare (it accepts torch tensors natively instead).
@parametrize_with_checks([LinearProbe(max_iter=300)])
def test_sklearn_estimator_contract(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # convergence notes on toy data
        check(estimator)


# ---- fit_many -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def layers():
    X, y = layer_stack(P=12, n=300, d=128, K=6)
    Xte, yte = layer_stack(P=12, n=200, d=128, K=6, seed=1)
    return X, y, Xte, yte


@pytest.fixture(scope="module")
def batched(layers):
    X, y, _, _ = layers
    return fit_many(X, y, C=0.5)


def test_batched_probes_equal_separate_fits(layers, batched):
    X, y, Xte, yte = layers
    assert isinstance(batched, BatchedProbes) and len(batched) == 12
    assert batched.coef_.shape == (12, 6, 128) and batched.intercept_.shape == (12, 6)
    preds = batched.predict(Xte)
    for p in range(12):
        alone = LinearProbe(C=0.5).fit(X[p], y)
        np.testing.assert_allclose(batched.coef_[p].numpy(), alone.coef_, atol=1e-4)
        np.testing.assert_allclose(batched.intercept_[p].numpy(), alone.intercept_, atol=1e-4)
        np.testing.assert_array_equal(preds[p].numpy(), alone.predict(Xte[p]))
        assert batched.accuracy(Xte, yte)[p].item() == pytest.approx(alone.score(Xte[p], yte))
    # Each probe converged on its own gradient, not only on the batch's: recomputed here.
    assert bool(batched.converged_.all()) and bool((batched.n_iter_ >= 1).all())
    grad = objective_gradient(X, y, batched.coef_, batched.intercept_, C=0.5)
    assert bool((grad <= 1e-4).all()), grad
    torch.testing.assert_close(grad, batched.grad_norm_, rtol=1e-2, atol=1e-6)


@pytest.fixture(scope="module")
def scaled_stack():
    """Four overlapping-class problems at feature scales 0.3 to 10, as layers at growing depth."""
    scales = [0.3, 1.0, 3.0, 10.0]
    Xs, ys = zip(*[dataset(4, 32, seed=p) for p in range(4)])
    return np.stack([x * s for x, s in zip(Xs, scales)]), np.stack(ys)


def test_batched_matches_sklearn_per_probe(scaled_stack):
    X, y = scaled_stack  # with per-probe labels [P, n]
    probes = fit_many(X, y, C=0.5, dtype="float64", tol=1e-10, max_iter=5000)
    proba = probes.predict_proba(X)
    for p in range(4):
        ref = LogisticRegression(C=0.5, tol=1e-12, max_iter=20000).fit(X[p], y[p])
        np.testing.assert_allclose(probes.coef_[p].numpy(), ref.coef_, atol=1e-5)
        np.testing.assert_allclose(probes.intercept_[p].numpy(), ref.intercept_, atol=1e-5)
        np.testing.assert_allclose(proba[p].numpy(), ref.predict_proba(X[p]), atol=1e-5)


def test_chunks_and_input_forms_give_identical_probes(layers, batched):
    X, y, Xte, _ = layers
    chunked = fit_many(X, y, C=0.5, chunk_size=5)
    assert torch.equal(chunked.coef_, batched.coef_)
    assert torch.equal(chunked.n_iter_, batched.n_iter_)
    readonly = X.numpy().copy()
    readonly.flags.writeable = False  # as a memmap opened read-only
    from_list = fit_many([X[p].numpy() for p in range(12)], y, C=0.5, chunk_size=4)
    from_memmap = fit_many(readonly, y.numpy(), C=0.5, chunk_size=7)
    assert torch.equal(from_list.coef_, batched.coef_)
    assert torch.equal(from_memmap.coef_, batched.coef_)
    assert torch.equal(chunked.predict(Xte), batched.predict(Xte))


def test_predictions_do_not_depend_on_the_block_of_probes_they_are_computed_in(layers, batched, monkeypatch):
    # Predictions convert features to float64 a block of probes at a time; one probe per block,
    # a few, or all of them must give the same logits (standardised and not).
    _, _, Xte, _ = layers
    standardised = fit_many(layers[0], layers[1], C=0.5, standardize=True)
    fitted = (batched, standardised)
    whole = [probes.decision_function(Xte) for probes in fitted]
    assert Xte.numel() * 8 <= batched_module._PREDICT_BLOCK_BYTES  # one block by default
    for budget in (1, Xte.shape[1] * Xte.shape[2] * 8 * 5):  # one probe, five probes per block
        monkeypatch.setattr(batched_module, "_PREDICT_BLOCK_BYTES", budget)
        for probes, reference in zip(fitted, whole):
            assert torch.equal(probes.decision_function(Xte), reference)
            assert torch.equal(probes.decision_function([x.numpy() for x in Xte]), reference)


def test_per_probe_labels(layers):
    X, y, _, _ = layers
    y2 = torch.stack([y, (y + 1) % 6])  # the second probe sees a relabelled task
    probes = fit_many(X[:2], y2, C=0.5)
    np.testing.assert_allclose(
        probes.coef_[1].numpy(), LinearProbe(C=0.5).fit(X[1], y2[1]).coef_, atol=1e-4
    )


def test_standardize_equals_scaler_pipeline_and_ignores_layer_scale(scaled_stack):
    X, y = scaled_stack
    exact = dict(C=0.5, dtype="float64", tol=1e-10, max_iter=5000)
    probes = fit_many(X, y, standardize=True, **exact)
    for p in range(4):
        pipe = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, tol=1e-12, max_iter=20000))
        pipe.fit(X[p], y[p])
        np.testing.assert_allclose(probes.coef_[p].numpy(), pipe[-1].coef_, atol=1e-5)
        np.testing.assert_allclose(probes.intercept_[p].numpy(), pipe[-1].intercept_, atol=1e-5)
        np.testing.assert_array_equal(probes.predict(X)[p].numpy(), pipe.predict(X[p]))
    # Rescaling a layer (as depth does) changes nothing once standardised...
    factors = np.array([100.0, 0.01, 3.0, 1.0])[:, None, None]
    rescaled = fit_many(X * factors, y, standardize=True, **exact)
    np.testing.assert_allclose(rescaled.coef_.numpy(), probes.coef_.numpy(), atol=1e-6)
    # ... and plain L-BFGS, slow on the large-scale layer raw, fits it standardised in far fewer
    # iterations.
    standardised = fit_many(X[3:], y[3:], standardize=True, precondition=False, **exact)
    raw = fit_many(X[3:], y[3:], precondition=False, **exact)
    assert standardised.n_iter_[0] < raw.n_iter_[0] / 3


def correlated_stack(P: int, n: int, d: int, K: int, seed: int = 0):
    """Features with a power-law spectrum (a few directions carry most of the variance, as in a
    residual stream), from chance (probe 0) to separable: ill-conditioned for plain L-BFGS."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].float()
    means = torch.randn(K, d, generator=g) / d**0.5
    spectrum = torch.arange(1, d + 1).float().rsqrt()
    X = torch.stack([(torch.randn(n, d, generator=g) * spectrum) @ basis.T + 1.5 * p / max(P - 1, 1) * means[y]
                     for p in range(P)])
    return X, y


@pytest.mark.parametrize("n_classes", [2, 6])
def test_preconditioning_reaches_the_same_minimiser_in_fewer_iterations(n_classes):
    X, y = correlated_stack(P=3, n=900, d=160, K=n_classes)
    exact = dict(C=1.0, dtype="float64", tol=1e-10, max_iter=5000)
    plain = fit_many(X, y, precondition=False, **exact)
    preconditioned = fit_many(X, y, precondition=True, **exact)
    assert bool(plain.converged_.all()) and bool(preconditioned.converged_.all())
    np.testing.assert_allclose(preconditioned.coef_.numpy(), plain.coef_.numpy(), atol=1e-6)
    np.testing.assert_allclose(preconditioned.intercept_.numpy(), plain.intercept_.numpy(), atol=1e-6)
    # The chance-level probe, the slowest for plain L-BFGS, is where conditioning matters: after
    # 20 plain iterations it goes on preconditioned, to a tenth of tol, in fewer iterations than
    # plain L-BFGS needs for tol itself. A batched sweep waits for its slowest probe.
    usual = dict(C=1.0, dtype="float64", tol=1e-6, max_iter=5000)
    plain, preconditioned = (fit_many(X, y, precondition=flag, **usual) for flag in (False, True))
    assert int(preconditioned.n_iter_[0]) < 0.6 * int(plain.n_iter_[0])
    assert float(preconditioned.grad_norm_[0]) <= 1e-7
    assert int(preconditioned.n_iter_.max()) < int(plain.n_iter_.max())
    # probes that converge within 20 iterations are not preconditioned at all
    fast = plain.n_iter_ <= 20
    assert torch.equal(preconditioned.coef_[fast], plain.coef_[fast])


def test_preconditioned_probes_are_the_same_in_any_chunk():
    # d + 1 = 513 doubles per row: batched LAPACK calls must not depend on a matrix's place in the batch
    X, y = correlated_stack(P=5, n=1500, d=512, K=4, seed=1)
    whole = fit_many(X, y, precondition=True)
    for chunk_size in (1, 2, 3):
        chunked = fit_many(X, y, precondition=True, chunk_size=chunk_size)
        assert torch.equal(chunked.coef_, whole.coef_) and torch.equal(chunked.n_iter_, whole.n_iter_)


@pytest.mark.parametrize("n_classes", [2, 5])
def test_preconditioner_is_the_exact_inverse_hessian_when_features_have_low_rank(n_classes):
    # Features of rank 12 < the preconditioner's rank: its Nystrom approximation of X'X is then
    # exact, so M must equal (c X'X / n + I / (n C))^-1 (the Hessian at W = 0 for each class block).
    P, n, d, C = 3, 300, 40, 0.5
    g = torch.Generator().manual_seed(0)
    X = torch.randn(P, n, 12, generator=g, dtype=torch.float64) @ torch.randn(
        P, 12, d, generator=g, dtype=torch.float64)
    M = curvature_preconditioner(X, n_classes, C, fit_intercept=False)
    K = 1 if n_classes == 2 else n_classes
    v = torch.randn(P, K * d, generator=g, dtype=torch.float64)
    c = (1 - 1 / n_classes) / n_classes
    H = c * X.transpose(1, 2) @ X / n + torch.eye(d, dtype=torch.float64) / (n * C)
    blocks = v.view(P, K, d).transpose(1, 2)  # [P, d, K], one column per class block
    exact = torch.cholesky_solve(blocks, torch.linalg.cholesky(H)).transpose(1, 2).reshape(P, -1)
    torch.testing.assert_close(M(v, torch.arange(P)), exact, rtol=1e-8, atol=0)
    # ... and the same for any subset of the probes, contiguous or not
    for rows in (torch.tensor([1, 2]), torch.tensor([0, 2])):
        torch.testing.assert_close(M(v[rows], rows), exact[rows], rtol=1e-8, atol=0)


def test_take_is_a_view_only_for_contiguous_rows():
    T = torch.arange(24.0).view(6, 4)
    for rows in ([2, 3, 4], [0, 2, 5], [5], []):
        rows = torch.tensor(rows, dtype=torch.long)
        assert torch.equal(_take(T, rows), T[rows])
    assert _take(T, torch.tensor([2, 3, 4])).data_ptr() == T[2].data_ptr()  # no copy
    assert _take(T, torch.tensor([0, 2, 5])).data_ptr() != T.data_ptr()


def test_binary_batched_shapes_and_probabilities(layers):
    X, y, Xte, _ = layers
    yb = (y >= 3).long()
    probes = fit_many(X[:4], yb)
    assert probes.coef_.shape == (4, 1, 128)  # scikit-learn's binomial parametrisation
    assert probes.decision_function(Xte[:4]).shape == (4, 200)
    proba = probes.predict_proba(Xte[:4])
    assert proba.shape == (4, 200, 2)
    torch.testing.assert_close(proba.sum(-1), torch.ones(4, 200, dtype=torch.float64))
    assert torch.equal(probes.predict(Xte[:4]), (proba[..., 1] > 0.5).long())


def test_fit_many_rejects_bad_input(layers):
    X, y, _, _ = layers
    with pytest.raises(InputError, match=r"X must be \[P, n, d\].*got shape \(300, 128\)"):
        fit_many(X[0], y)
    with pytest.raises(InputError, match="integer class labels; got dtype torch.float32"):
        fit_many(X, y.float())
    with pytest.raises(InputError, match=r"y must be \[n\] = \[300\]"):
        fit_many(X, y[:10])
    with pytest.raises(InputError, match="chunk_size must be a positive int"):
        fit_many(X, y, chunk_size=0)
    with pytest.warns(Warning, match=r"probes \[0, 1\] did not reach tol"):
        probes = fit_many(X[:2], y, max_iter=3)
    assert not bool(probes.converged_.any()) and bool((probes.n_iter_ == 3).all())
    with pytest.raises(InputError, match="P=2 probes and d=128"):
        probes.predict(X[:3])


def test_realistic_size_completes():
    # Sizes of a real sweep slice (8 layers, 2000 examples, d=512): must finish, not hang.
    X, y = layer_stack(P=8, n=2000, d=512, K=5, seed=2)
    probes = fit_many(X, y, C=1.0, standardize=True, chunk_size=4)
    assert bool(probes.converged_.all())
    assert bool((probes.accuracy(X, y) > 0.5).all())  # chance is 0.2


def test_runs_of_consecutive_probes():
    assert _runs(torch.tensor([0, 1, 2, 5, 7, 8])) == [(0, 3), (5, 6), (7, 9)]
    assert _runs(torch.tensor([4])) == [(4, 5)] and _runs(torch.tensor([], dtype=torch.long)) == []


@pytest.mark.parametrize("n_classes", [2, 6])
def test_objective_of_any_subset_equals_the_whole_batch_bitwise(n_classes):
    """A probe's loss and gradient do not depend on which other probes are evaluated with it: the
    line search evaluates only the probes still searching, and a probe's iterates must be the
    ones it would get in any batch. A lone probe is the case to watch (a batched product of one
    matrix is split across threads)."""
    X, y = correlated_stack(P=6, n=1500, d=256, K=n_classes, seed=2)
    X = torch.as_tensor(X, dtype=torch.float32)
    fun = _objective(X, y.expand(6, -1), n_classes, C=1.0, fit_intercept=True)
    K = 1 if n_classes == 2 else n_classes
    x = torch.randn(6, K * 256 + K, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 30
    f, g = fun(x, torch.arange(6))
    for rows in ([0], [5], [3], [0, 1, 2], [1, 4], [0, 2, 3, 5]):
        rows = torch.tensor(rows)
        f_r, g_r = fun(x[rows], rows)
        assert torch.equal(f_r, f[rows]) and torch.equal(g_r, g[rows]), rows.tolist()
