"""Probe sweeps and cross-modal transfer: on arrays with a planted signal, and on shapes-llava's
activations of ShapesWorld scenes, whose colours are the ground truth."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import lvlm_probe as lp
from lvlm_probe import probing
from lvlm_probe.errors import InputError
from lvlm_probe.probing.sweeps import COLUMNS


def planted(n: int = 600, d: int = 16, seed: int = 0):
    """Three layers: noise, a weak copy of the label, a strong one; 300 object types (so a probe
    cannot memorise a random label per type), two examples per scene."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    types = rng.integers(0, 300, n)
    centres = rng.normal(size=(4, d))
    layers = {
        "blocks.0.hook_resid_post": rng.normal(size=(n, d)),
        "blocks.1.hook_resid_post": 0.4 * centres[labels] + rng.normal(size=(n, d)),
        "blocks.2.hook_resid_post": 3.0 * centres[labels] + rng.normal(size=(n, d)),
    }
    return layers, labels, types, np.arange(n) // 2


def test_sweep_finds_the_planted_signal():
    layers, labels, types, scenes = planted()
    results = probing.sweep(layers, labels, hooks="blocks.*.hook_resid_post", control_by=types,
                            groups=scenes, seed=0)
    assert list(results.columns) == COLUMNS
    by_layer = results.set_index("layer")
    chance = by_layer["chance"].iloc[0]
    assert by_layer.loc[0, "accuracy"] < chance + 0.15
    assert by_layer.loc[1, "accuracy"] > by_layer.loc[0, "accuracy"] + 0.1
    assert by_layer.loc[2, "accuracy"] > 0.95
    assert by_layer.loc[2, "selectivity"] > 0.5  # a random label per type cannot be learnt
    assert (results["ci_low"] <= results["accuracy"]).all() and (results["accuracy"] <= results["ci_high"]).all()
    assert (results["n_train"] + results["n_test"] == len(labels)).all()
    # the same seed gives the same table; the tower and layer come from the names
    pd.testing.assert_frame_equal(results, probing.sweep(layers, labels, control_by=types, groups=scenes))
    assert set(results["tower"]) == {"lm"}


def test_batched_sweep_equals_one_sweep_per_hook():
    """sweep fits every probe of a call together (all hooks of one width, the control probes beside
    them); each probe's numbers equal those of a sweep of its hook alone, with its own control
    fit, across widths (two towers of different widths) and per-head hooks."""
    layers, labels, types, scenes = planted()
    narrow, _, _, _ = planted(d=6, seed=1)
    rng = np.random.default_rng(2)
    sources = {**layers, "vision.blocks.0.hook_resid_post": narrow["blocks.2.hook_resid_post"],
               "vision.blocks.1.hook_resid_post": narrow["blocks.1.hook_resid_post"]}
    heads = {"blocks.1.attn.hook_z": np.stack([layers["blocks.2.hook_resid_post"][:, :8],
                                               rng.normal(size=(len(labels), 8))], axis=1)}
    kw = dict(control_by=types, groups=scenes, seed=3, n_boot=200)
    for arrays, extra in ((sources, {}), (heads, {"heads": True})):
        together = probing.sweep(arrays, labels, hooks=list(arrays), **kw, **extra)
        alone = pd.concat([probing.sweep(arrays, labels, hooks=[hook], **kw, **extra) for hook in arrays],
                          ignore_index=True)
        assert together[["hook", "head"]].equals(alone[["hook", "head"]])
        # every probe reaches its own solution (the batch shares only the products), and the
        # selectivity bootstrap uses the same draws for every probe
        pd.testing.assert_frame_equal(together, alone)


def test_per_head_probes():
    layers, labels, types, scenes = planted(d=8)
    # heads 0 and 2 of a [N, head, d] hook carry the signal, head 1 is noise
    z = np.stack([layers["blocks.2.hook_resid_post"], layers["blocks.0.hook_resid_post"],
                  layers["blocks.1.hook_resid_post"]], axis=1)
    results = probing.sweep({"blocks.0.attn.hook_z": z}, labels, hooks="blocks.*.attn.hook_z", heads=True,
                            control=False, groups=scenes, n_boot=0)
    assert results["head"].tolist() == [0, 1, 2]
    acc = results.set_index("head")["accuracy"]
    assert acc[0] > 0.95 and acc[1] < acc[2] < acc[0]
    with pytest.raises(InputError, match="heads=True"):
        probing.sweep({"blocks.0.attn.hook_z": z}, labels, hooks="blocks.*.attn.hook_z", control=False)


def test_sweep_errors_name_what_was_wrong():
    layers, labels, types, scenes = planted()
    with pytest.raises(InputError, match="no hook matches 'vision.blocks.\\*.hook_resid_post'"):
        probing.sweep(layers, labels, hooks="vision.blocks.*.hook_resid_post", control_by=types)
    with pytest.raises(InputError, match="single value"):
        probing.sweep(layers, np.zeros(len(labels)), control_by=types)
    with pytest.raises(InputError, match="target must be the label array"):
        probing.sweep(layers, "color")
    with pytest.raises(InputError, match="names columns"):
        probing.sweep(layers, labels)  # the default control type names store columns
    with pytest.warns(UserWarning, match="near chance by construction"):
        probing.sweep(layers, labels, control_by=scenes, groups=scenes, n_boot=0)
    with pytest.raises(InputError, match="unknown control design 'latin'"):
        probing.sweep(layers, labels, control_by=types, control_design="latin")
    with pytest.raises(InputError, match="types of one column"):
        probing.sweep(layers, labels, control_by=types, control_design="factorial")


@pytest.fixture(scope="module")
def concept_stores(tmp_path_factory):
    """shapes-llava's activations of 400 counterfactual-colour scenes (colour independent of
    shape), as images and as text descriptions, plus the projector's output for the images."""
    model = lp.zoo.load("shapes-llava", device="cpu")
    world = lp.worlds.ShapesWorld(seed=0, image_size=64)
    hooks = ["hook_embed", "blocks.*.hook_resid_post"]
    image_rows = world.concepts(400, split="counterfactual", modality="image")
    text_rows = world.concepts(400, split="counterfactual", modality="text")
    out = tmp_path_factory.mktemp("concepts")
    images = lp.extract(model, image_rows, hooks, positions="image", reduce="mean", out=out / "image",
                        progress=False)
    texts = lp.extract(model, text_rows, hooks, positions="prompt", reduce="mean", out=out / "text",
                       progress=False)
    projected = lp.extract(model, image_rows, "projector.hook_out", positions="all", reduce="none",
                           out=out / "projected", progress=False)
    return images, texts, projected


def test_colour_emerges_after_the_image_enters(concept_stores):
    """At the image positions hook_embed holds the placeholder token's embedding (the same for
    every image), so nothing is decodable there; after the image features replace it, the object's
    colour is read off every LM layer, well above its object-type control."""
    images, _, _ = concept_stores
    results = probing.sweep(images, "color", hooks=["hook_embed", "blocks.*.hook_resid_post"], seed=0)
    embed = results[results["hook"] == "hook_embed"].iloc[0]
    lm = results[results["hook"] != "hook_embed"]
    assert embed["accuracy"] <= embed["chance"] + 0.05
    assert (lm["accuracy"] > 0.85).all()
    assert (lm["selectivity"] > 0.2).all()
    assert results["n_test"].iloc[0] == 100 and results["n_train"].iloc[0] == 300  # scenes split 3:1
    fig = lp.viz.layer_curves(results, chance=embed["chance"])
    assert len(fig.axes) == 2


# Measured on the shipped shapes-llava: text -> image 0.18 against chance 0.18 (0.32 for the previous
# checkpoint, 0.53 before stage 2 trained the projector beside the answer-position heads, moving
# it off the words).
@pytest.mark.xfail(strict=True, reason="shapes-llava's projector drifted from the word embeddings in stage 2")
def test_transfer_from_word_embeddings_to_the_projector(concept_stores):
    """shapes-llava's projector was trained to map each patch near the word embeddings of its
    object's colour and shape (zoo.vision_pretrain), so a colour probe trained on the embeddings of
    the descriptions' words reads the colour off the projected image patches: cross-modal
    alignment by construction. Without per-source centring the modality gap hides it."""
    images, texts, projected = concept_stores
    words = ({"x": texts["hook_embed"]}, texts.meta["color"].to_numpy())
    patches = ({"x": projected["projector.hook_out"].mean(1)}, projected.meta["color"].to_numpy())
    aligned = probing.transfer(words, patches, "color", hooks="x", seed=0).set_index("direction")
    for direction in ("text -> image", "image -> text"):
        row = aligned.loc[direction]
        assert row["accuracy"] > row["chance"] + 0.2 and row["ci_low"] > row["chance"]
        assert row["within_accuracy"] > 0.95
    gap = probing.transfer(words, patches, "color", hooks="x", center=False, n_boot=0, both=False)
    assert gap["accuracy"].iloc[0] < aligned.loc["text -> image", "accuracy"] - 0.2


def test_transfer_through_the_language_model_by_hook_name(concept_stores):
    """Both directions at every common hook; the placeholder's embedding at the image positions
    carries no colour at all."""
    images, texts, _ = concept_stores
    results = probing.transfer(texts, images, "color", hooks=["hook_embed", "blocks.*.hook_resid_post"])
    assert set(results["direction"]) == {"text -> image", "image -> text"}
    assert len(results) == 2 * (1 + 4)
    embed = results[(results["hook"] == "hook_embed") & (results["direction"] == "text -> image")].iloc[0]
    assert embed["accuracy"] <= embed["chance"] + 0.05


def test_transfer_from_arrays_equals_transfer_from_tuples():
    layers, labels, _, _ = planted()
    half = len(labels) // 2
    a = {k: torch.as_tensor(v[:half]) for k, v in layers.items()}
    b = {k: torch.as_tensor(v[half:]) for k, v in layers.items()}
    results = probing.transfer((a, labels[:half]), (b, labels[half:]), "target", n_boot=0, both=False)
    strong = results.set_index("layer").loc[2, "accuracy"]
    assert strong > 0.95  # same distribution on both sides: transfer is ordinary generalisation
    # every hook's probe fitted in one batch equals its own transfer, in both directions
    for center in (True, False):
        together = probing.transfer((a, labels[:half]), (b, labels[half:]), "target", center=center)
        alone = pd.concat([probing.transfer((a, labels[:half]), (b, labels[half:]), "target", hooks=[hook],
                                            center=center) for hook in layers], ignore_index=True)
        key = ["direction", "hook"]
        pd.testing.assert_frame_equal(together.sort_values(key, ignore_index=True),
                                      alone.sort_values(key, ignore_index=True))


# The reference model's targets for probing (see the probing issue's notes for the figures).
# The previous checkpoint peaked at 0.84 on these 400 scenes, 0.86-0.88 with 1600 scenes (mean- or
# max-pooled) and 0.78 pooled over the object's own patches. The shipped one's own captions of
# these scenes name the right shape 66% of the time (50% for small objects): its vision tower
# does not tell the small shapes apart well (test_image_tokens_hold_more_shape_than_the_captions_name).
# With 8000 scenes (6000 to train) shape reaches 0.91 at vision layer 3 and 0.88 in the LM, but the
# control task then reaches 0.53 (chance 0.14): the probe learns the object types' random labels.
@pytest.mark.xfail(strict=True, reason="shapes-llava: shape peaks at 0.82 (probes/shapes_objects.yaml, LM layer 2)")
def test_shape_decodable_at_some_layer(concept_stores):
    images, _, _ = concept_stores
    results = probing.sweep(images, "shape", hooks="blocks.*.hook_resid_post", n_boot=0)
    assert results["accuracy"].max() >= 0.9


def test_image_tokens_hold_more_shape_than_the_captions_name(concept_stores):
    """Decodability joined with behaviour on the same 400 scenes: shapes-llava's captions name the
    colour almost always but the shape far less often (small objects are 9 pixels across), and a
    linear probe reads more of the shape off the image tokens than the captions name."""
    images, _, _ = concept_stores
    model = lp.zoo.load("shapes-llava", device="cpu")
    rows = lp.worlds.ShapesWorld(seed=0, image_size=64).concepts(400, split="counterfactual", modality="image")
    assert [r["id"] for r in rows] == images.meta["id"].tolist()
    captions = []
    for start in range(0, len(rows), 100):
        chunk = rows[start:start + 100]
        batch = model.prepare(images=[r["image"] for r in chunk], prompts=[r["prompt"] for r in chunk])
        captions += [c.lower() for c in model.generate(batch, max_new_tokens=6)]
    named = {attr: np.mean([re.search(rf"\b{r[attr]}\b", c) is not None for r, c in zip(rows, captions)])
             for attr in ("color", "shape")}
    decoded = probing.sweep(images, "shape", hooks="blocks.*.hook_resid_post", n_boot=0, control=False)
    assert named["color"] > 0.95  # measured: 0.985
    assert named["shape"] < decoded["accuracy"].max() - 0.1  # measured: 0.66 named, 0.82 decoded


def test_control_accuracy_near_chance(concept_stores):
    """The object type's control labels are balanced within each of shape, colour and size, so
    decoding those attributes does not help; shapes-llava's states do not let a linear probe
    memorise the combinations. (With independent draws per type, decoding the three attributes
    alone gave 0.33-0.47 against chance 0.27.)"""
    images, _, _ = concept_stores
    results = probing.sweep(images, "color", hooks="blocks.*.hook_resid_post", n_boot=0)
    assert (results["control_accuracy"] <= results["chance"] + 0.1).all()


@pytest.mark.xfail(strict=True, reason="shapes-llava: colour text -> image transfer stays within 0.1 of "
                                       "chance in every LM layer (best 0.225 at layer 3, chance 0.18)")
def test_transfer_above_chance_in_the_language_model(concept_stores):
    images, texts, _ = concept_stores
    results = probing.transfer(texts, images, "color", hooks="blocks.*.hook_resid_post", n_boot=0, both=False)
    assert results["accuracy"].max() > results["chance"].iloc[0] + 0.1


def test_accuracy_intervals_are_wilson_and_selectivity_intervals_a_bootstrap():
    """Accuracy: the Wilson interval of k right of n_test (examples their own groups); selectivity:
    a paired bootstrap around it; n_boot=0 drops only the bootstrap. No small-test warning at
    150 test examples."""
    from lvlm_probe.probing.stats import wilson_ci

    layers, labels, types, _ = planted()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = probing.sweep(layers, labels, control_by=types, groups=None, seed=0, n_boot=300)
    assert not [w for w in caught if "n_test <" in str(w.message)]
    for row in results.itertuples():
        k = round(row.accuracy * row.n_test)
        reference = wilson_ci(np.r_[np.ones(k), np.zeros(row.n_test - k)])
        assert (row.ci_low, row.ci_high) == pytest.approx((float(reference.low), float(reference.high)))
        assert row.selectivity_ci_low < row.selectivity < row.selectivity_ci_high
    no_boot = probing.sweep(layers, labels, control_by=types, groups=None, seed=0, n_boot=0)
    pd.testing.assert_series_equal(no_boot["ci_low"], results["ci_low"])
    assert no_boot[["selectivity_ci_low", "selectivity_ci_high"]].isna().all().all()


def test_degenerate_selectivity_intervals_are_nan_with_one_warning():
    """Features that name each example's type: the probe and the control are both always right,
    so every resample gives selectivity 0 and no interval can be drawn."""
    rng = np.random.default_rng(4)
    types = np.repeat(np.arange(20), 10)
    features = 4.0 * np.eye(20)[types] + 0.01 * rng.normal(size=(200, 20))
    layers = {f"blocks.{k}.hook_resid_post": features for k in range(2)}
    with pytest.warns(UserWarning, match=r"selectivity interval is degenerate .* for \['blocks.0.hook_resid_post', "
                                         r"'blocks.1.hook_resid_post'\]"):
        results = probing.sweep(layers, types % 2, control_by=types, groups=None, n_boot=100)
    assert (results["accuracy"] == 1).all() and (results["selectivity"] == 0).all()
    assert results["selectivity_ci_low"].isna().all() and (results["ci_low"] < 1).all()


def test_transfer_intervals_are_wilson_even_without_a_bootstrap():
    from lvlm_probe.probing.stats import wilson_ci

    layers, labels, _, _ = planted()
    half = len(labels) // 2
    a = {h: x[:half] for h, x in layers.items()}
    b = {h: x[half:] for h, x in layers.items()}
    row = probing.transfer((a, labels[:half]), (b, labels[half:]), "target", n_boot=0, both=False).iloc[-1]
    k = round(row["accuracy"] * row["n_test"])
    reference = wilson_ci(np.r_[np.ones(k), np.zeros(row["n_test"] - k)])
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((float(reference.low), float(reference.high)))
