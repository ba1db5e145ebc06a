"""The attribution contract, checked once for every public method: the call form
``(model, batch, target, *, foil=None, ...)``, a result derived from ``AttributionResult`` with a
tidy ``to_frame()`` and a ``plot()`` titled with the question, the target and the method,
deprecated call forms that warn and agree, randomness that leaves torch's global RNG alone, and
one rule for turning answers into tokens."""
from __future__ import annotations

import inspect
import re
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import random_image
from matplotlib.figure import Figure

import lvlm_probe as lp
from lvlm_probe.attribution import (
    AttributionResult,
    AttributionTable,
    deletion_insertion,
    dla,
    image_map,
    knockout,
    logit_lens,
    randomization_check,
    source_split,
)
from lvlm_probe.circuits import head_attribution, path_patch
from lvlm_probe.circuits.snapshot import snapshot
from lvlm_probe.errors import InputError

SCORING = {"source_split": source_split, "image_map": image_map, "dla": dla, "knockout": knockout,
           "deletion_insertion": deletion_insertion, "randomization_check": randomization_check,
           "head_attribution": head_attribution}


@pytest.fixture(scope="module")
def shapes():
    """shapes-llava and two counterfactual colour questions: target the true colour, foil the
    shape's typical colour (always different tokens)."""
    model = lp.zoo.load("shapes-llava", device="cpu")
    questions = lp.worlds.ShapesWorld(seed=1000, image_size=64).questions(
        2, level="attribute", split="counterfactual", kind="color")
    batch = model.prepare(images=[q.image for q in questions], prompts=[q.prompt for q in questions])
    return model, batch, [q.answer for q in questions], [q.typical_color for q in questions]


@pytest.fixture(scope="module")
def ablation_maps(shapes):
    model, batch, target, foil = shapes
    return image_map(model, batch, target, foil=foil, method="ablation")


# Each method called in the new form, cheaply.
CALLS = {
    "source_split": lambda m, b, t, f, maps: source_split(m, b, t, foil=f),
    "image_map": lambda m, b, t, f, maps: image_map(m, b, t, foil=f, method="ig", n_steps=8),
    "dla": lambda m, b, t, f, maps: dla(m, b, t, foil=f),
    "knockout": lambda m, b, t, f, maps: knockout(m, b, t, foil=f, layers=[0, 2], window=2),
    "deletion_insertion": lambda m, b, t, f, maps: deletion_insertion(m, b, t, foil=f, maps=maps,
                                                                      random_orders=1),
    "randomization_check": lambda m, b, t, f, maps: randomization_check(m, b, t, foil=f, method="ablation"),
    "logit_lens": lambda m, b, t, f, maps: logit_lens(m, b, positions="image", k=2),
}


def _title(fig: Figure) -> str:
    """Every title of the figure (suptitle and axes), whitespace collapsed."""
    texts = [fig._suptitle.get_text()] if fig._suptitle is not None else []
    texts += [ax.get_title() for ax in fig.axes]
    return " ".join(" ".join(texts).split())


# --- signatures ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SCORING))
def test_scoring_functions_take_model_batch_target_then_keyword_foil(name):
    params = list(inspect.signature(SCORING[name]).parameters.values())
    assert [p.name for p in params[:4]] == ["model", "batch", "target", "foil"], name
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[:3])
    assert params[3].kind is inspect.Parameter.KEYWORD_ONLY and params[3].default is None
    assert all(p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD) for p in params[4:])


def test_logit_lens_takes_model_batch_then_keywords():
    params = list(inspect.signature(logit_lens).parameters.values())
    assert [p.name for p in params[:2]] == ["model", "batch"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:])


# --- results -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CALLS))
def test_results_share_the_base_with_a_tidy_frame_and_a_titled_plot(name, shapes, ablation_maps, monkeypatch):
    model, batch, target, foil = shapes
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new form is not deprecated
        result = CALLS[name](model, batch, target, foil, ablation_maps)
    assert isinstance(result, AttributionResult)
    assert result.method and result.layouts and result.prompts == batch.prompts
    assert result.input_tokens == [list(lay.tokens) for lay in batch.layouts]
    assert result.image_grids == [lay.image_grids for lay in batch.layouts]
    if name != "logit_lens":
        assert [t.strip() for t in result.targets] == target
        assert [f.strip() for f in result.foils] == foil
        assert result.target_ids.shape == (len(batch),) and result.foil_ids.shape == (len(batch),)

    frame = result.to_frame()
    assert isinstance(frame, pd.DataFrame) and len(frame) > 0
    assert frame.columns.nlevels == 1 and frame.columns.is_unique and "example" in frame.columns
    assert isinstance(frame.index, pd.RangeIndex)
    assert set(frame["example"]) == set(range(len(batch)))

    def no_show(*args, **kwargs):
        raise AssertionError("plot() called plt.show()")
    monkeypatch.setattr(plt, "show", no_show)
    open_figures = plt.get_fignums()
    fig = result.plot()
    assert isinstance(fig, Figure) and plt.get_fignums() == open_figures  # not a pyplot figure
    title = _title(fig)
    assert " ".join(batch.prompts[0].split()) in title  # the question
    if name != "logit_lens":
        assert repr(target[0]) in title and repr(foil[0]) in title


def test_image_map_says_its_ig_is_on_input_embeddings_from_a_group_mean(shapes, ablation_maps):
    doc = " ".join(image_map.__doc__.split())
    assert "input-embedding space, not in pixel space" in doc and "group-mean baseline" in doc
    model, batch, target, foil = shapes
    ig = image_map(model, batch, target, foil=foil, method="ig", n_steps=4)
    title = _title(ig.plot(0))
    assert "input embeddings" in title and "group-mean baseline" in title and "not pixel IG" in title
    assert "feature ablation" in _title(ablation_maps.plot(0))


# --- deprecated call forms -----------------------------------------------------------------------

def _frame(result):
    return result if isinstance(result, pd.DataFrame) else result.to_frame()


DEPRECATED = {
    "source_split": (lambda m, b, t, f, maps: source_split(m, b, t, f),
                     lambda m, b, t, f, maps: source_split(m, b, t, foil=f)),
    "image_map": (lambda m, b, t, f, maps: image_map(m, b, t, f, method="ablation"),
                  lambda m, b, t, f, maps: image_map(m, b, t, foil=f, method="ablation")),
    "dla": (lambda m, b, t, f, maps: dla(m, b, t, f), lambda m, b, t, f, maps: dla(m, b, t, foil=f)),
    "knockout": (lambda m, b, t, f, maps: knockout(m, b, "image", "last", [0, 1], target=t),
                 lambda m, b, t, f, maps: knockout(m, b, t, source="image", dest="last", layers=[0, 1])),
    "knockout_source": (lambda m, b, t, f, maps: knockout(m, b, "prompt", layers=[1]),
                        lambda m, b, t, f, maps: knockout(m, b, source="prompt", layers=[1])),
    "deletion_insertion": (lambda m, b, t, f, maps: deletion_insertion(m, b, maps, t, f, random_orders=1),
                           lambda m, b, t, f, maps: deletion_insertion(m, b, t, foil=f, maps=maps,
                                                                       random_orders=1)),
    "deletion_insertion_keyword_target": (
        lambda m, b, t, f, maps: deletion_insertion(m, b, maps, target=t, random_orders=1),
        lambda m, b, t, f, maps: deletion_insertion(m, b, t, maps=maps, random_orders=1)),
    "randomization_check": (lambda m, b, t, f, maps: randomization_check(m, b, t, f, method="ablation"),
                            lambda m, b, t, f, maps: randomization_check(m, b, t, foil=f, method="ablation")),
    "logit_lens": (lambda m, b, t, f, maps: logit_lens(m, b, "image", 2),
                   lambda m, b, t, f, maps: logit_lens(m, b, positions="image", k=2)),
    "head_attribution": (lambda m, b, t, f, maps: head_attribution(m, b, t, f),
                         lambda m, b, t, f, maps: head_attribution(m, b, t, foil=f)),
    "head_attribution_data": (lambda m, b, t, f, maps: head_attribution(m, data=b, target=t),
                              lambda m, b, t, f, maps: head_attribution(m, b, t)),
}


@pytest.mark.parametrize("case", list(DEPRECATED))
def test_deprecated_call_forms_warn_and_give_the_same_result(case, shapes, ablation_maps):
    model, batch, target, foil = shapes
    old, new = DEPRECATED[case]
    name = case.removesuffix("_source").removesuffix("_keyword_target").removesuffix("_data")
    with pytest.warns(DeprecationWarning, match=re.escape(f"call {name}(model, batch")):
        before = old(model, batch, target, foil, ablation_maps)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        after = new(model, batch, target, foil, ablation_maps)
    pd.testing.assert_frame_equal(_frame(before), _frame(after), check_exact=True)
    if isinstance(after, AttributionResult):
        assert type(before) is type(after) and before.targets == after.targets and before.foils == after.foils


def test_table_results_still_answer_dataframe_calls_with_a_warning(shapes):
    model, batch, target, _ = shapes
    curve = knockout(model, batch, target, layers=[0, 1])
    assert isinstance(curve, AttributionTable) and not isinstance(curve, pd.DataFrame)
    frame = curve.to_frame()
    with pytest.warns(DeprecationWarning, match=r"call \.to_frame\(\) first"):
        column = curve["p_knocked"]
    pd.testing.assert_series_equal(column, frame["p_knocked"])
    with pytest.warns(DeprecationWarning, match=r"\.groupby on it is deprecated"):
        means = curve.groupby("layer")["relative_change"].mean()
    pd.testing.assert_series_equal(means, frame.groupby("layer")["relative_change"].mean())
    with pytest.warns(DeprecationWarning):
        assert len(curve) == len(frame)
    with pytest.raises(AttributeError):
        curve.not_a_dataframe_method  # noqa: B018
    with pytest.warns(DeprecationWarning, match=r"\.plot\(\.\.\.\) on it is deprecated"):
        axes = curve.plot(x="layer", y="relative_change")
    assert list(axes.get_lines()[0].get_ydata()) == frame["relative_change"].tolist()
    assert isinstance(curve.plot(), Figure)  # without arguments: the result's own figure


# --- randomness ----------------------------------------------------------------------------------

SEEDED = {
    "image_map_shapley": lambda m, b, t, f: image_map(m, b, t, foil=f, method="shapley", n_samples=2, seed=3),
    "image_map_kernelshap": lambda m, b, t, f: image_map(m, b, t, foil=f, method="kernelshap", n_samples=2,
                                                         seed=3),
    "randomization_check": lambda m, b, t, f: randomization_check(m, b, t, foil=f, method="ablation", seed=3),
    "source_split_noise": lambda m, b, t, f: source_split(m, b, t, foil=f, ablation="noise", seed=3),
}


@pytest.mark.parametrize("name", list(SEEDED))
def test_seeded_methods_leave_the_global_rng_alone(name, shapes):
    model, batch, target, foil = shapes
    torch.manual_seed(1234)
    state, np_state = torch.random.get_rng_state(), np.random.get_state()
    first = _frame(SEEDED[name](model, batch, target, foil))
    assert torch.equal(torch.random.get_rng_state(), state), "the global torch RNG moved"
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    torch.manual_seed(99)  # another global state: the same numbers, from the seed alone
    again = _frame(SEEDED[name](model, batch, target, foil))
    pd.testing.assert_frame_equal(first, again, check_exact=True)


# --- errors --------------------------------------------------------------------------------------

def test_knockout_without_layers_says_what_it_got_and_expects(shapes):
    model, batch, _, _ = shapes
    with pytest.raises(InputError, match=re.escape("layers is empty (got [])") + ".*first layer of at least one"):
        knockout(model, batch, layers=[])
    with pytest.raises(InputError, match="layers is empty"):
        knockout(model, batch, layers=range(0))
    with pytest.raises(InputError, match="needs a target"):
        knockout(model, batch, foil="red")


@pytest.mark.parametrize("family", [name for name in lp.families.names()
                                    if lp.families.get(name).nonlinear_writes is not None])
def test_nonlinear_families_raise_their_declared_reason(family):
    model = lp.zoo.tiny(family, device="cpu")
    batch = model.prepare(images=[[random_image(48, 48, 1)]], prompts=["Is there a heart?"])
    reason = model.family.nonlinear_writes
    yes = model.answer_token_ids(batch, ["yes"], first_token=True)[0, 0].item()
    for method in (lambda: dla(model, batch, yes), lambda: path_patch(model, batch, batch, senders=(0, 0))):
        with pytest.raises(InputError, match=re.escape(family) + ".*" + re.escape(reason)):
            method()
    snap = snapshot(model, batch, target=yes, split=False)  # the explorer falls back to attention
    assert snap.writes is None and reason in snap.no_writes


def test_soft_capped_logits_make_dla_raise():
    model = lp.zoo.tiny("paligemma", device="cpu")
    batch = model.prepare(images=[[random_image(48, 48, 1)]], prompts=["Is there a heart?"])
    yes = model.answer_token_ids(batch, ["yes"], first_token=True)[0, 0].item()
    model.text_config.final_logit_softcapping = 30.0
    try:
        assert model.family.final_logit_softcap(model.config) == 30.0
        with pytest.raises(InputError, match="soft cap"):
            dla(model, batch, yes)
    finally:
        model.text_config.final_logit_softcapping = None


# --- answers into tokens -------------------------------------------------------------------------

def test_one_rule_turns_answers_into_tokens(shapes):
    model, batch, _, _ = shapes
    tokens = model.continuation_tokens(batch, 0, "red heart")
    assert len(tokens) == 2
    with pytest.raises(InputError, match=r"'red heart' is 2 tokens .*first_token=True"):
        model.answer_token(batch, 0, "red heart")
    assert model.answer_token(batch, 0, "red heart", first_token=True) == tokens[0]
    assert model.answer_token(batch, 0, "red") == model.continuation_tokens(batch, 0, "red")[0]
    with pytest.raises(InputError, match="is 2 tokens"):
        model.answer_token_ids(batch, ["red heart"], first_token=False)
    with pytest.raises(InputError, match="target 'red heart' is 2 tokens"):
        source_split(model, batch, "red heart")
    explicit = model.answer_token_ids(batch, ["red heart", "blue"], first_token=True)
    with pytest.warns(DeprecationWarning, match=r"\['red heart'\] are several tokens each.*first_token=True"):
        implicit = model.answer_token_ids(batch, ["red heart", "blue"])
    assert torch.equal(implicit, explicit) and explicit[0, 0].item() == tokens[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # one-token answers: nothing to warn about
        single = model.answer_token_ids(batch, ["red", "blue"])
    assert torch.equal(single, model.answer_token_ids(batch, ["red", "blue"], first_token=False))
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.answer_token(batch, 0, 10**9)
    with pytest.raises(InputError, match="non-empty string or a token id"):
        model.answer_token(batch, 0, True)
