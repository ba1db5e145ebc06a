"""lvlm_probe.alignment against verbatim ports of the published reference code, plus known values.

References ported below, unchanged except for 4-space indentation:
  * Kornblith et al. (2019), google-research/google-research,
    representation_similarity/Demo.ipynb (Apache-2.0): gram_linear, gram_rbf, center_gram, cka,
    _debiased_dot_product_similarity_helper, feature_space_linear_cka.
  * Huh et al. (2024), minyoungg/platonic-rep, metrics.py (AlignmentMetrics.mutual_knn and
    compute_nearest_neighbors), which measure_alignment.py calls on F.normalize'd features.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lvlm_probe import alignment
from lvlm_probe.errors import InputError

# ---------------------------------------------------------------- Kornblith et al., Demo.ipynb


def ref_gram_linear(x):
    return x.dot(x.T)


def ref_gram_rbf(x, threshold=1.0):
    dot_products = x.dot(x.T)
    sq_norms = np.diag(dot_products)
    sq_distances = -2 * dot_products + sq_norms[:, None] + sq_norms[None, :]
    sq_median_distance = np.median(sq_distances)
    return np.exp(-sq_distances / (2 * threshold ** 2 * sq_median_distance))


def ref_center_gram(gram, unbiased=False):
    if not np.allclose(gram, gram.T):
        raise ValueError('Input must be a symmetric matrix.')
    gram = gram.copy()

    if unbiased:
        n = gram.shape[0]
        np.fill_diagonal(gram, 0)
        means = np.sum(gram, 0, dtype=np.float64) / (n - 2)
        means -= np.sum(means) / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
    else:
        means = np.mean(gram, 0, dtype=np.float64)
        means -= np.mean(means) / 2
        gram -= means[:, None]
        gram -= means[None, :]

    return gram


def ref_cka(gram_x, gram_y, debiased=False):
    gram_x = ref_center_gram(gram_x, unbiased=debiased)
    gram_y = ref_center_gram(gram_y, unbiased=debiased)
    scaled_hsic = gram_x.ravel().dot(gram_y.ravel())
    normalization_x = np.linalg.norm(gram_x)
    normalization_y = np.linalg.norm(gram_y)
    return scaled_hsic / (normalization_x * normalization_y)


def _debiased_dot_product_similarity_helper(
        xty, sum_squared_rows_x, sum_squared_rows_y, squared_norm_x, squared_norm_y,
        n):
    return (
        xty - n / (n - 2.) * sum_squared_rows_x.dot(sum_squared_rows_y)
        + squared_norm_x * squared_norm_y / ((n - 1) * (n - 2)))


def ref_feature_space_linear_cka(features_x, features_y, debiased=False):
    features_x = features_x - np.mean(features_x, 0, keepdims=True)
    features_y = features_y - np.mean(features_y, 0, keepdims=True)

    dot_product_similarity = np.linalg.norm(features_x.T.dot(features_y)) ** 2
    normalization_x = np.linalg.norm(features_x.T.dot(features_x))
    normalization_y = np.linalg.norm(features_y.T.dot(features_y))

    if debiased:
        n = features_x.shape[0]
        sum_squared_rows_x = np.einsum('ij,ij->i', features_x, features_x)
        sum_squared_rows_y = np.einsum('ij,ij->i', features_y, features_y)
        squared_norm_x = np.sum(sum_squared_rows_x)
        squared_norm_y = np.sum(sum_squared_rows_y)

        dot_product_similarity = _debiased_dot_product_similarity_helper(
            dot_product_similarity, sum_squared_rows_x, sum_squared_rows_y,
            squared_norm_x, squared_norm_y, n)
        normalization_x = np.sqrt(_debiased_dot_product_similarity_helper(
            normalization_x ** 2, sum_squared_rows_x, sum_squared_rows_x,
            squared_norm_x, squared_norm_x, n))
        normalization_y = np.sqrt(_debiased_dot_product_similarity_helper(
            normalization_y ** 2, sum_squared_rows_y, sum_squared_rows_y,
            squared_norm_y, squared_norm_y, n))

    return dot_product_similarity / (normalization_x * normalization_y)


# ---------------------------------------------------------------- Huh et al., platonic-rep metrics.py


def ref_compute_nearest_neighbors(feats, topk=1):
    assert feats.ndim == 2, f"Expected feats to be 2D, got {feats.ndim}"
    knn = (
        (feats @ feats.T).fill_diagonal_(-1e8).argsort(dim=1, descending=True)[:, :topk]
    )
    return knn


def ref_mutual_knn(feats_A, feats_B, topk):
    knn_A = ref_compute_nearest_neighbors(feats_A, topk)
    knn_B = ref_compute_nearest_neighbors(feats_B, topk)

    n = knn_A.shape[0]
    topk = knn_A.shape[1]

    range_tensor = torch.arange(n, device=knn_A.device).unsqueeze(1)

    lvm_mask = torch.zeros(n, n, device=knn_A.device)
    llm_mask = torch.zeros(n, n, device=knn_A.device)

    lvm_mask[range_tensor, knn_A] = 1.0
    llm_mask[range_tensor, knn_B] = 1.0

    acc = (lvm_mask * llm_mask).sum(dim=1) / topk

    return acc.mean().item()


# ---------------------------------------------------------------- data


def related(n: int, dx: int, dy: int, seed: int = 0, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """X and a noisy linear image of it, so every metric lands well inside (0, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dx))
    y = x @ rng.standard_normal((dx, dy)) + noise * rng.standard_normal((n, dy))
    return x, y


def random_orthogonal(d: int, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


# ---------------------------------------------------------------- CKA


@pytest.mark.parametrize("shape", [(60, 8, 13), (20, 40, 25)], ids=["feature-path", "gram-path"])
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize(
    "kernel,threshold", [("linear", 1.0), ("rbf", 0.5), ("rbf", 1.0), ("rbf", 2.0)]
)
def test_cka_matches_reference(shape, debiased, kernel, threshold):
    x, y = related(*shape)
    gram = ref_gram_linear if kernel == "linear" else (lambda a: ref_gram_rbf(a, threshold))
    expected = ref_cka(gram(x), gram(y), debiased=debiased)
    got = alignment.cka(x, y, kernel=kernel, debiased=debiased, threshold=threshold)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, abs=1e-6)
    assert 0.05 < abs(expected) < 0.99  # a value that could be wrong, not a trivial 0 or 1


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", [(60, 8, 13), (20, 40, 25)])
def test_feature_space_equals_gram_path_and_reference(debiased, shape):
    x, y = related(*shape, seed=3)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    features = alignment.feature_space_linear_cka(x, y, debiased=debiased)
    grams = alignment._gram_cka(tx, ty, "linear", debiased, 1.0)  # what cka() uses when d >= n
    assert features == pytest.approx(grams, abs=1e-9)
    assert features == pytest.approx(ref_feature_space_linear_cka(x, y, debiased), abs=1e-9)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("n", [9, 10])  # odd and even n: numpy's median of n^2 values differs
def test_grams_and_centering_match_reference(unbiased, n):
    x, _ = related(n, 5, 5, seed=4)
    tx = torch.from_numpy(x)
    np.testing.assert_allclose(alignment._gram(tx, "linear", 1.0).numpy(), ref_gram_linear(x), atol=1e-12)
    for threshold in (0.5, 1.0, 2.0):
        np.testing.assert_allclose(
            alignment._gram(tx, "rbf", threshold).numpy(), ref_gram_rbf(x, threshold), atol=1e-12
        )
    gram = ref_gram_rbf(x)
    np.testing.assert_allclose(
        alignment._center_gram(torch.from_numpy(gram), unbiased).numpy(),
        ref_center_gram(gram, unbiased),
        atol=1e-12,
    )


def test_colab_printed_values():
    """The values Demo.ipynb prints for its own random data (np.random.seed(1337))."""
    rs = np.random.RandomState(1337)  # the legacy stream np.random.seed drives, without global state
    X = rs.randn(100, 10)
    Y = rs.randn(100, 10) + X
    transform = rs.randn(10, 10)  # the invariance cell draws this next
    _, orthogonal_transform = np.linalg.eigh(transform.T.dot(transform))
    tx, ty = torch.from_numpy(X), torch.from_numpy(Y)

    # "Linear CKA from Examples: 0.55761", "Linear CKA from Features: 0.55761"
    assert round(alignment._gram_cka(tx, ty, "linear", False, 1.0), 5) == 0.55761
    assert round(alignment.feature_space_linear_cka(X, Y), 5) == 0.55761
    assert round(alignment.cka(X, Y), 5) == 0.55761
    # "RBF CKA: 0.65483" (threshold 0.5)
    assert round(alignment.cka(X, Y, kernel="rbf", threshold=0.5), 5) == 0.65483
    # "Linear CKA from Examples (Debiased): 0.51346", "... from Features (Debiased): 0.51346"
    assert round(alignment._gram_cka(tx, ty, "linear", True, 1.0), 5) == 0.51346
    assert round(alignment.cka(X, Y, debiased=True), 5) == 0.51346

    # their invariance cell: orthogonal yes, arbitrary linear no, isotropic scaling yes
    base = alignment.feature_space_linear_cka(X, Y)
    assert alignment.feature_space_linear_cka(X.dot(orthogonal_transform), Y) == pytest.approx(base, abs=1e-7)
    assert not np.isclose(alignment.feature_space_linear_cka(X.dot(transform), Y), base)
    assert alignment.feature_space_linear_cka(X * 1.337, Y) == pytest.approx(base, abs=1e-7)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("shape", [(60, 8, 13), (20, 40, 25)])
def test_cka_invariances(kernel, shape):
    x, y = related(*shape, seed=5)
    base = alignment.cka(x, y, kernel=kernel)
    q = random_orthogonal(x.shape[1], seed=6)
    assert alignment.cka(x @ q, y, kernel=kernel) == pytest.approx(base, abs=1e-9)
    assert alignment.cka(3.7 * x, y, kernel=kernel) == pytest.approx(base, abs=1e-9)
    assert alignment.cka(x + 5.0, y, kernel=kernel) == pytest.approx(base, abs=1e-9)  # centring
    assert alignment.cka(y, x, kernel=kernel) == pytest.approx(base, abs=1e-12)  # symmetric
    for debiased in (False, True):
        assert alignment.cka(x, x, kernel=kernel, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
        assert alignment.cka(x, 2 * x @ q, kernel=kernel, debiased=debiased) == pytest.approx(1.0, abs=1e-9)


def test_linear_cka_not_invariant_to_invertible_maps():
    x, y = related(60, 8, 13, seed=7)
    stretch = np.diag(np.geomspace(0.05, 20.0, 8))  # invertible, far from orthogonal
    assert abs(alignment.cka(x @ stretch, y) - alignment.cka(x, y)) > 0.05


def test_cka_of_independent_data_is_biased_and_debiasing_removes_it():
    rng = np.random.default_rng(8)
    pairs = [(rng.standard_normal((30, 50)), rng.standard_normal((30, 50))) for _ in range(10)]
    biased = np.mean([alignment.cka(x, y) for x, y in pairs])
    debiased = np.mean([alignment.cka(x, y, debiased=True) for x, y in pairs])
    assert biased > 0.5  # biased CKA of unrelated wide data at small n is far from 0 ...
    assert abs(debiased) < 0.05  # ... the unbiased HSIC estimator removes that bias


# ---------------------------------------------------------------- mutual k-NN


@pytest.mark.parametrize("k", [1, 5, 10, 30])
def test_mutual_knn_matches_reference(k):
    x, y = related(80, 16, 24, seed=9, noise=4.0)
    tx, ty = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    expected = ref_mutual_knn(F.normalize(tx, p=2, dim=-1), F.normalize(ty, p=2, dim=-1), k)
    got = alignment.mutual_knn(tx, ty, k=k)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, abs=1e-6)  # their mean is float32
    assert k / 79 + 0.05 < got < 0.95  # above chance k / (n - 1), below perfect


def test_mutual_knn_known_values():
    x, _ = related(100, 16, 16, seed=10)
    assert alignment.mutual_knn(x, x, k=10) == 1.0
    # cosine neighbours: positive per-row scaling and rotations change nothing
    scale = np.random.default_rng(11).uniform(0.1, 10.0, (100, 1))
    assert alignment.mutual_knn(x, scale * x @ random_orthogonal(16), k=10) == 1.0
    assert alignment.mutual_knn(x, x, k=99) == 1.0  # k = n - 1: everyone else


def test_mutual_knn_of_independent_data_is_chance():
    n, k = 200, 10
    rng = np.random.default_rng(12)
    scores = [alignment.mutual_knn(rng.standard_normal((n, 32)), rng.standard_normal((n, 48)), k=k) for _ in range(5)]
    assert np.mean(scores) == pytest.approx(k / (n - 1), abs=0.01)  # E = k / (n - 1) = 0.050


# ---------------------------------------------------------------- cosine


def test_cosine_known_values():
    x, _ = related(30, 7, 7, seed=13)
    assert alignment.cosine(x, x) == pytest.approx(1.0, abs=1e-12)
    assert alignment.cosine(x, -x) == pytest.approx(-1.0, abs=1e-12)
    assert alignment.cosine(x, 4.0 * x) == pytest.approx(1.0, abs=1e-12)
    e = np.eye(4)
    assert alignment.cosine(e, np.roll(e, 1, axis=0)) == 0.0  # orthogonal pairs
    assert isinstance(alignment.cosine(x, x), float)


def test_paired_cosine_per_row():
    x, y = related(30, 7, 7, seed=14)
    rows = alignment.paired_cosine(torch.from_numpy(x), y)
    expected = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    assert rows.shape == (30,)
    np.testing.assert_allclose(rows.numpy(), expected, atol=1e-12)
    assert alignment.cosine(x, y) == pytest.approx(expected.mean(), abs=1e-12)


# ---------------------------------------------------------------- dtypes, devices, input types


def _all_metrics(x, y):
    return [
        alignment.cosine(x, y[:, : x.shape[1]]),
        alignment.mutual_knn(x, y, k=5),
        alignment.cka(x, y),
        alignment.cka(x, y, kernel="rbf", threshold=0.5),
        alignment.cka(x, y, debiased=True),
    ]


def test_float32_gives_the_float64_values():
    x, y = related(50, 8, 12, seed=15)
    x, y = x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)
    wide = _all_metrics(torch.from_numpy(x), torch.from_numpy(y))
    narrow = _all_metrics(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert narrow == pytest.approx(wide, abs=1e-6)
    assert _all_metrics(x, y) == pytest.approx(wide, abs=1e-12)  # numpy in, same values
    grad = torch.from_numpy(x).float().requires_grad_()  # activations with autograd history
    assert alignment.cka(grad, y) == pytest.approx(wide[2], abs=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_values():
    x, y = related(50, 8, 12, seed=16)
    cpu = _all_metrics(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    cuda = _all_metrics(torch.from_numpy(x).float().cuda(), torch.from_numpy(y).float().cuda())
    assert cuda == pytest.approx(cpu, abs=1e-6)
    assert alignment.paired_cosine(torch.from_numpy(x).cuda(), torch.from_numpy(x).cuda()).is_cuda


# ---------------------------------------------------------------- curves and maps


def test_alignment_curve():
    layers = {i: related(40, 6, 9, seed=20 + i, noise=float(i))[1] for i in range(3)}
    ref = related(40, 6, 9, seed=20)[0]
    curve = alignment.alignment_curve(layers, ref, metric="mutual_knn", k=5)
    assert list(curve.columns) == ["layer", "metric", "value"]
    assert curve["layer"].tolist() == [0, 1, 2] and set(curve["metric"]) == {"mutual_knn"}
    assert curve["value"].tolist() == [alignment.mutual_knn(layers[i], ref, k=5) for i in range(3)]

    paired = alignment.alignment_curve(layers, {i: ref for i in (2, 0, 1)}, metric="cka", kernel="rbf")
    assert paired["value"].tolist() == pytest.approx([alignment.cka(layers[i], ref, kernel="rbf") for i in range(3)])

    with pytest.raises(InputError, match=r"only in xs: \['2'\], only in ys: \['7'\]"):
        alignment.alignment_curve(layers, {0: ref, 1: ref, 7: ref})
    with pytest.raises(InputError, match="layer 0: k must be .*got k=40"):
        alignment.alignment_curve(layers, ref, metric="mutual_knn", k=40)
    with pytest.raises(InputError, match="unknown metric 'svcca'"):
        alignment.alignment_curve(layers, ref, metric="svcca")


@pytest.mark.parametrize("kernel,debiased", [("linear", False), ("linear", True), ("rbf", False)])
def test_cka_map(kernel, debiased):
    x, y = related(30, 6, 40, seed=30)
    A = {"vision.0": x, "vision.1": x @ random_orthogonal(6), "vision.2": y[:, :5]}
    B = {0: y, 1: x * 3.0}
    grid = alignment.cka_map(A, B, kernel=kernel, debiased=debiased, as_tensor=True)
    assert grid.shape == (3, 2) and grid.dtype == torch.float64
    for i, a in enumerate(A.values()):
        for j, b in enumerate(B.values()):
            assert grid[i, j].item() == pytest.approx(alignment.cka(a, b, kernel=kernel, debiased=debiased), abs=1e-9)
    assert grid[0, 1].item() == pytest.approx(1.0) and grid[1, 1].item() == pytest.approx(1.0)

    frame = alignment.cka_map(A, B, kernel=kernel, debiased=debiased)
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == ["layer_a", "layer_b", "value"]
    assert len(frame) == 6 and frame["value"].tolist() == pytest.approx(grid.flatten().tolist())
    with pytest.raises(InputError, match=r"B\[5\].*same number of rows"):
        alignment.cka_map(A, {5: y[:20]})


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn", [alignment.cosine, alignment.mutual_knn, alignment.cka])
def test_bad_input_is_named(fn):
    x = np.random.default_rng(40).standard_normal((20, 4))
    with pytest.raises(InputError, match=r"same .*got \(20, 4\) and \(19, 4\)"):
        fn(x, x[:19])
    with pytest.raises(InputError, match=r"Y must be 2-D \[n, d\].*got shape \(20,\)"):
        fn(x, x[:, 0])
    nan = x.copy()
    nan[3, 1] = np.nan
    with pytest.raises(InputError, match="X must be finite; got 1 NaN"):
        fn(nan, x)
    with pytest.raises(InputError, match="tensor or array"):
        fn(x, {"not": "an array"})


def test_bad_options_are_named():
    x = np.random.default_rng(41).standard_normal((20, 4))
    for k in (20, 25, 0, 2.5, True):
        with pytest.raises(InputError, match=rf"1 <= k < n = 20 .*got k={k!r}"):
            alignment.mutual_knn(x, x, k=k)
    with pytest.raises(InputError, match=r"same shape \[n, d\]; got \(20, 4\) and \(20, 3\)"):
        alignment.cosine(x, x[:, :3])
    with pytest.raises(InputError, match="unknown kernel 'poly'"):
        alignment.cka(x, x, kernel="poly")
    with pytest.raises(InputError, match="at least 4 examples; got n=3"):
        alignment.cka(x[:3], x[:3], debiased=True)
    with pytest.raises(InputError, match="threshold must be a number > 0; got 0"):
        alignment.cka(x, x, kernel="rbf", threshold=0)
    with pytest.raises(InputError, match="Y does not vary across rows"):
        alignment.cka(x, np.ones((20, 3)))
    with pytest.raises(InputError, match="X: RBF bandwidth is 0"):
        alignment.cka(np.ones((20, 3)), x, kernel="rbf")
    with pytest.raises(InputError, match="threshold must be a number > 0; got '1'"):
        alignment.cka_map({0: x}, {0: x}, kernel="rbf", threshold="1")
