"""Group splits, Hewitt & Liang control labels, bootstrap intervals."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lvlm_probe.errors import InputError
from lvlm_probe.probing import bootstrap_ci, control_labels, group_split, type_overlap
from lvlm_probe.probing.stats import wilson_ci

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


def _main_effect(control, by: pd.DataFrame) -> float:
    """The largest total-variation distance between the control labels' distribution within one
    value of one column and their distribution overall."""
    overall = pd.Series(control).value_counts(normalize=True)
    worst = 0.0
    for column in by.columns:
        within = pd.crosstab(by[column].to_numpy(), control, normalize="index")
        worst = max(worst, float((within - overall[within.columns]).abs().sum(axis=1).max() / 2))
    return worst


def test_factorial_control_labels_are_balanced_within_every_attribute(objects):
    by = objects[["shape", "color", "size"]]
    factorial = control_labels(objects["color"], by=by, seed=0)  # auto: three columns
    independent = control_labels(objects["color"], by=by, seed=0, design="independent")
    # 60 types of about 50 objects cannot match five shares exactly within each of 13 values
    assert _main_effect(factorial, by) < 0.15 < 0.3 < _main_effect(independent, by)
    # ... in the real labels' proportions, one label per type
    shares = objects["color"].value_counts(normalize=True)
    np.testing.assert_allclose(pd.Series(factorial).value_counts(normalize=True)[shares.index], shares,
                               atol=0.01)
    per_type = pd.DataFrame({"type": list(by.itertuples(index=False)), "ctl": factorial})
    assert (per_type.groupby("type")["ctl"].nunique() == 1).all()


def test_factorial_control_is_learnt_by_memorising_types_only():
    """Attributes coded separately (a disentangled representation) beat chance on independently
    drawn labels by adding per-attribute evidence; on factorial labels only a code per type
    helps. 8 shapes x 6 colours x 2 sizes, 300 objects to train and 100 to test, as in
    ShapesWorld's probe sets."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    scores = {"independent": [], "factorial": []}
    for seed in range(10):
        shape, color, size = rng.choice(8, 400, p=np.arange(1, 9) / 36), rng.integers(0, 6, 400), rng.integers(0, 2, 400)
        by = pd.DataFrame({"shape": shape, "color": color, "size": size})
        separate = np.concatenate([np.eye(8)[shape], np.eye(6)[color], np.eye(2)[size]], 1)
        per_type = np.eye(96)[12 * shape + 2 * color + size]
        for design, out in scores.items():
            ctl = control_labels(color, by=by, seed=seed, design=design)
            fit = [LogisticRegression(max_iter=2000).fit(x[:300], ctl[:300]).score(x[300:], ctl[300:])
                   for x in (separate, per_type)]
            out.append([*fit, np.bincount(ctl[300:]).max() / 100])
    (sep_ind, type_ind, majority_ind), (sep_fac, type_fac, _) = (np.mean(v, 0) for v in scores.values())
    assert sep_ind > majority_ind + 0.1  # no memorising, yet well above chance
    assert sep_fac < 1 / 6 + 0.04        # chance
    assert type_ind > 0.85 and type_fac > 0.85


def test_factorial_control_does_not_depend_on_the_example_order(objects):
    by = objects[["shape", "color", "size"]]
    ctl = control_labels(objects["color"], by=by, seed=3, design="factorial")
    perm = np.random.default_rng(4).permutation(len(objects))
    np.testing.assert_array_equal(control_labels(objects["color"].to_numpy()[perm], by=by.iloc[perm], seed=3,
                                                 design="factorial"), ctl[perm])
    assert not np.array_equal(control_labels(objects["color"], by=by, seed=4, design="factorial"), ctl)


def test_control_design_errors(objects):
    with pytest.raises(InputError, match="unknown control design 'latin'"):
        control_labels(objects["color"], by=objects[["shape", "size"]], design="latin")
    with pytest.raises(InputError, match="types of one column"):
        control_labels(objects["color"], by=objects["shape"], design="factorial")


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


def test_best_layer_ties_break_by_selectivity_then_earliest_layer():
    from lvlm_probe.probing import best_layers

    def row(hook, tower, layer, acc, sel, target="color", head=None):
        return dict(hook=hook, tower=tower, layer=layer, head=head, target=target, accuracy=acc,
                    selectivity=sel)

    rows = [row("blocks.3.hook_resid_post", "lm", 3, 0.9, 0.2), row("blocks.2.hook_resid_post", "lm", 2, 0.9, 0.2),
            row("blocks.1.hook_resid_post", "lm", 1, 0.9, 0.1), row("vision.blocks.5.hook_resid_post", "vision", 5, 0.8, 0.5),
            row("blocks.0.attn.hook_z", "lm", 0, 1.0, 0.9, head=0),  # heads are not layers
            row("vision.blocks.4.hook_resid_post", "vision", 4, 0.7, 0.1, target="size"),
            row("blocks.0.hook_resid_post", "lm", 0, 0.7, 0.1, target="size")]
    table = pd.DataFrame(rows)
    for shuffled in (table, table.iloc[::-1], table.sample(frac=1.0, random_state=1)):
        best = best_layers(shuffled).set_index("target")["hook"]
        # equal accuracy: higher selectivity wins (layer 1 out); equal both: the earlier layer
        assert best["color"] == "blocks.2.hook_resid_post"
        assert best["size"] == "vision.blocks.4.hook_resid_post"  # the vision tower runs first


# ---- wilson_ci ----------------------------------------------------------------------------------

def test_wilson_interval_equals_scipys_and_never_collapses():
    from scipy.stats import binomtest

    cases = [(10, 10), (0, 7), (15, 20), (3, 50), (1, 1)]
    correct = [np.r_[np.ones(k), np.zeros(n - k)] for k, n in cases]
    for (k, n), row in zip(cases, correct):
        reference = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        acc, low, high = wilson_ci(row)
        assert float(acc) == k / n
        assert (float(low), float(high)) == pytest.approx((reference.low, reference.high), abs=1e-12)
        assert float(high - low) > 0  # 10 of 10 right is [0.72, 1], not [1, 1]
    batch = wilson_ci(np.stack([correct[0], np.r_[np.ones(5), np.zeros(5)]]), alpha=0.1)
    assert batch.low.shape == (2,)
    assert float(batch.low[0]) == pytest.approx(binomtest(10, 10).proportion_ci(0.9, "wilson").low)


def test_wilson_with_groups_counts_effective_examples():
    rng = np.random.default_rng(2)
    row = rng.random(60) < 0.7
    singletons = wilson_ci(row, groups=np.arange(60))
    assert torch.allclose(torch.stack(singletons[1:]), torch.stack(wilson_ci(row)[1:]))
    # answers constant within scenes of 6: 60 examples weigh as 10 scenes
    scenes = np.repeat(np.arange(10), 6)
    per_scene = rng.random(10) < 0.7
    clustered = wilson_ci(np.repeat(per_scene, 6), groups=scenes)
    torch.testing.assert_close(torch.stack(clustered[1:]), torch.stack(wilson_ci(per_scene)[1:]))
    # at 100% the clustering cannot be estimated: the cautious size, the number of scenes
    torch.testing.assert_close(wilson_ci(np.ones(60), groups=scenes).low, wilson_ci(np.ones(10)).low)
    with pytest.raises(InputError, match="wilson_ci needs right/wrong values"):
        wilson_ci(np.array([0.5, 1.0]))
    with pytest.raises(InputError, match=r"groups must be \[m\] = \[60\]"):
        wilson_ci(row, groups=scenes[:10])


def test_a_degenerate_bootstrap_is_nan_with_a_warning():
    varied = np.random.default_rng(3).random(30) < 0.6
    with pytest.warns(UserWarning, match=r"degenerate for probe\(s\) \[1\]: every one of the 200 "
                                         r"resamples of the 30 test examples gives the same value 1\.000"):
        acc, low, high = bootstrap_ci(np.stack([varied, np.ones(30)]), n_boot=200)
    assert torch.isnan(low[1]) and torch.isnan(high[1]) and float(acc[1]) == 1.0
    assert bool(low[0] < acc[0] < high[0])  # the other probe keeps its interval
