"""Group splits, Hewitt & Liang control labels, bootstrap intervals."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lvlm_probe.errors import InputError
from lvlm_probe.probing import bootstrap_ci, control_labels, group_split, type_overlap

# ---- group_split --------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_group_split_never_puts_a_group_on_both_sides(seed):
    rng = np.random.default_rng(seed)
    groups = np.array([f"scene{g}" for g in rng.integers(0, 40, 500)])
    train, test = group_split(groups, test_size=0.25, seed=seed)
    assert not set(groups[train]) & set(groups[test])
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(500))
    assert len(set(groups[test])) == int(np.ceil(0.25 * len(set(groups))))  # a fraction of groups


def test_group_split_is_deterministic_and_accepts_tensors():
    groups = torch.arange(60) // 3
    a = group_split(groups, seed=3)
    b = group_split(groups.numpy(), seed=3)
    c = group_split(groups, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_group_split_needs_two_groups():
    with pytest.raises(InputError, match="at least 2 distinct groups; got 1"):
        group_split(["s0"] * 10)
    with pytest.raises(InputError, match="test_size=0.99"):
        group_split(["s0", "s1"], test_size=0.99)


# ---- control_labels -----------------------------------------------------------------------------

COLORS = ["red", "green", "blue", "yellow", "purple"]


@pytest.fixture(scope="module")
def objects():
    """Objects in scenes: colour is the probed concept, (shape, colour, size) the object type."""
    rng = np.random.default_rng(0)
    n = 3000
    return pd.DataFrame({
        "scene": rng.integers(0, 600, n),
        "shape": rng.choice(["heart", "star", "circle", "square", "cross", "moon"], n),
        "color": rng.choice(COLORS, n, p=[0.4, 0.25, 0.15, 0.15, 0.05]),
        "size": rng.choice(["small", "large"], n),
    })


def test_control_labels_are_a_function_of_the_type(objects):
    by = objects[["shape", "color", "size"]]
    ctl = control_labels(objects["color"], by=by, seed=0)
    per_type = pd.DataFrame({"type": list(by.itertuples(index=False)), "ctl": ctl})
    assert (per_type.groupby("type")["ctl"].nunique() == 1).all()
    assert set(ctl) <= set(COLORS)
    # Fixed by (seed, type): the same under reordering; another seed gives another assignment.
    perm = np.random.default_rng(1).permutation(len(objects))
    shuffled = control_labels(objects["color"].to_numpy()[perm], by=by.iloc[perm], seed=0)
    np.testing.assert_array_equal(shuffled, ctl[perm])
    assert not np.array_equal(control_labels(objects["color"], by=by, seed=1), ctl)
    # ... and the control is not the concept: many types of one colour get other labels.
    assert (ctl != objects["color"].to_numpy()).mean() > 0.4


def test_control_labels_follow_the_real_label_distribution():
    # Hewitt & Liang: each type's label is drawn from the empirical label distribution.
    rng = np.random.default_rng(2)
    labels = rng.choice(4, 20000, p=[0.55, 0.25, 0.15, 0.05])
    types = rng.integers(0, 5000, 20000)
    ctl = control_labels(torch.as_tensor(labels), by=types, seed=0)
    assert isinstance(ctl, torch.Tensor)
    first = pd.Series(ctl.numpy()).groupby(types).first()  # one draw per type
    freq = first.value_counts(normalize=True).sort_index().to_numpy()
    np.testing.assert_allclose(freq, np.bincount(labels) / len(labels), atol=0.03)


def test_control_label_warnings_for_degenerate_types(objects):
    with pytest.warns(UserWarning, match="relabelling of the real task"):
        control_labels(objects["color"], by=objects["color"])
    with pytest.warns(UserWarning, match="every example is its own type"):
        control_labels(objects["color"], by=np.arange(len(objects)))
    with pytest.raises(InputError, match="expected 3000, got 10"):
        control_labels(objects["color"], by=np.arange(10))


def test_type_overlap_tells_usable_types_from_scene_ids(objects):
    train, test = group_split(objects["scene"], seed=0)
    assert type_overlap(objects["scene"], train, test) == 0.0  # scene types never recur
    assert type_overlap(objects[["shape", "color", "size"]], train, test) > 0.95


# ---- bootstrap_ci -------------------------------------------------------------------------------

def test_bootstrap_interval_contains_estimate_and_shrinks_with_m():
    rng = np.random.default_rng(0)
    widths = []
    for m in (250, 4000):
        correct = torch.as_tensor(rng.random((6, m)) < np.linspace(0.55, 0.95, 6)[:, None])
        acc, low, high = bootstrap_ci(correct, n_boot=1000, seed=0)
        assert acc.shape == low.shape == high.shape == (6,)
        torch.testing.assert_close(acc, correct.double().mean(1))
        assert bool(((low <= acc) & (acc <= high)).all())
        # Close to the normal approximation of a binomial proportion.
        normal = 2 * 1.96 * (acc * (1 - acc) / m).sqrt()
        torch.testing.assert_close(high - low, normal, rtol=0.2, atol=2 / m)
        widths.append(high - low)
    assert bool((widths[1] < widths[0] / 2).all())  # width ~ 1/sqrt(m): 4x less at 16x m


def test_bootstrap_is_seeded_shared_across_probes_and_clusters():
    rng = np.random.default_rng(1)
    row = rng.random(400) < 0.7
    same = bootstrap_ci(np.stack([row, row]), seed=5)
    assert torch.equal(same.low[0], same.low[1])  # the same resamples for every probe
    assert torch.equal(bootstrap_ci(row, seed=5).high, same.high[0])
    assert bootstrap_ci(row, seed=5).low.ndim == 0
    # Correctness constant within scenes: resampling examples understates the uncertainty.
    scene = np.repeat(np.arange(40), 10)
    clustered = np.repeat(rng.random(40) < 0.7, 10)
    iid = bootstrap_ci(clustered, seed=0)
    by_scene = bootstrap_ci(clustered, seed=0, groups=scene)
    assert (by_scene.high - by_scene.low) > 2 * (iid.high - iid.low)
    with pytest.raises(InputError, match=r"groups must be \[m\] = \[400\]"):
        bootstrap_ci(clustered, groups=scene[:10])
    with pytest.raises(InputError, match="alpha must be in"):
        bootstrap_ci(row, alpha=1.5)
