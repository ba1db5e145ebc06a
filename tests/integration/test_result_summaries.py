"""Every result type the public API returns prints a short summary (class, key numbers; never a
tensor, the tokenizer or a whole table) and has a tidy ``to_frame()``; ``LogitLens.plot()`` draws
each image grid as that grid (one panel per grid: LLaVA-NeXT's base image and tiles) within a
bounded figure size."""
from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import random_image

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
from lvlm_probe.attribution.lens import MAX_HEIGHT, MAX_WIDTH, STRIP_COLUMNS
from lvlm_probe.attribution.results import count, number
from lvlm_probe.bench.stages import Stages
from lvlm_probe.circuits.snapshot import snapshot
from lvlm_probe.errors import InputError

pytestmark = pytest.mark.skipif("shapes-llava" not in lp.zoo.checkpoints(),
                                reason="shapes-llava checkpoint not shipped")
WORLD = dict(seed=1000, image_size=64)
MAX_REPR = 600


@pytest.fixture(scope="module")
def shapes():
    """shapes-llava and two counterfactual colour questions (target: the true colour, foil: the
    shape's typical colour)."""
    model = lp.zoo.load("shapes-llava", device="cpu")
    questions = lp.worlds.ShapesWorld(**WORLD).questions(2, level="attribute", split="counterfactual", kind="color")
    batch = model.prepare(images=[q.image for q in questions], prompts=[q.prompt for q in questions])
    return model, batch, [q.answer for q in questions], [q.typical_color for q in questions]


@pytest.fixture(scope="module")
def pope_file(tmp_path_factory):
    """A POPE question file of two sampling modes with one malformed line."""
    folder = tmp_path_factory.mktemp("pope")
    questions = lp.worlds.ShapesWorld(**WORLD).questions(4, level="object")
    lines = []
    for k, q in enumerate(questions):
        q.image.save(folder / f"{k}.png")
        lines.append(json.dumps(dict(question_id=k, image=f"{k}.png", text=q.prompt, label=q.answer,
                                     pope="random" if k % 2 else "popular")))
    lines.append(json.dumps(dict(question_id=9, image="0.png", text="Is there a star?", label="maybe")))
    (folder / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "questions.jsonl"


@pytest.fixture(scope="module")
def build(shapes, pope_file, tmp_path_factory):
    """``build(name)``: the result called ``name``, computed once per module."""
    model, batch, target, foil = shapes

    @functools.cache
    def make(name: str):
        if name == "source_split":
            return source_split(model, batch, target, foil=foil)
        if name == "logit_lens":
            return logit_lens(model, batch, k=3)
        if name == "dla":
            return dla(model, batch, target, foil=foil)
        if name == "knockout":
            return knockout(model, batch, target, foil=foil, layers=[0, 2], window=2)
        if name == "image_map":
            return image_map(model, batch, target, foil=foil, method="ablation")
        if name == "explain_generation":
            return lp.attribution.explain_generation(model, batch, max_new_tokens=4)
        if name == "deletion_insertion":
            return deletion_insertion(model, batch, target, foil=foil, maps=make("image_map"), random_orders=1)
        if name == "randomization_check":
            return randomization_check(model, batch, target, foil=foil, method="ablation")
        if name == "question_file":
            return lp.bench.read_questions(pope_file)
        if name == "pope":
            return lp.bench.pope(model, pope_file, progress=False)
        if name == "chair":
            return lp.bench.chair(["A red heart and a blue star.", "a circle"], [["heart"], ["circle", "star"]])
        if name == "misalignment":
            # the smallest run with an error to diagnose (the benchmark's own tests run a full one)
            return lp.bench.misalignment(model, lp.worlds.ShapesWorld(**WORLD), n=2, captions=1, n_probe=8,
                                         progress=False)
        if name == "diagnosis":
            return make("misalignment").diagnosis
        if name == "stages":
            stages = Stages(tmp_path_factory.mktemp("stages"), {"n": 1})
            stages.run("answers", ("answers",), lambda: (pd.DataFrame({"id": ["a"]}),))
            return stages
        if name == "snapshot":
            return snapshot(model, batch, 0, target=target[0], foil=foil[0])
        if name == "batched_probes":
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(3, 40, 8, generator=generator)
            return lp.probing.fit_many(x, torch.randint(0, 3, (40,), generator=generator), standardize=True)
        raise KeyError(name)
    return make


# The columns each result's to_frame() documents.
COLUMNS = {
    "source_split": ["example", "target", "foil", "source", "value", "share"],
    "logit_lens": ["layer", "example", "position", "rank", "token_id", "token", "prob"],
    "dla": ["example", "component", "layer", "head", "source", "value", "target", "foil"],
    "knockout": ["layer", "window", "example", "target", "p", "p_knocked", "relative_change", "foil", "logodds",
                 "logodds_knocked"],
    "image_map": ["example", "target", "foil", "method", "kind", "image", "row", "col", "word", "value"],
    "explain_generation": ["example", "index", "token", "token_id", "prior", "prompt", "image", "generated", "full",
                           "image_share", "generated_share"],
    "deletion_insertion": ["example", "step", "fraction", "deletion", "insertion", "random_deletion",
                           "random_insertion"],
    "randomization_check": ["example", "spearman"],
    "question_file": ["id", "image", "prompt", "answer", "pope", "line"],
    "pope": ["id", "pope", "prompt", "gold", "output", "answer", "correct"],
    "chair": ["caption", "text", "mentions", "hallucinated", "truth", "missed"],
    "misalignment": ["id", "level", "kind", "split", "prompt", "gold", "output", "answer", "correct", "p_answer",
                     "p_gold"],
    "diagnosis": ["id", "level", "kind", "split", "prompt", "gold", "answer", "p_answer", "decodable", "decoded_at",
                  "cause"],
    "stages": ["stage", "done", "tables"],
    "snapshot": ["layer", "position", "token", "group", "lens_token", "lens_prob"],
    "batched_probes": ["probe", "n_iter", "grad_norm", "converged"],
}


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found


def test_every_attribution_result_type_is_covered(build):
    """A new result class without a case here fails: the summary tests below cover them all."""
    covered = {type(build(name)) for name in COLUMNS}
    public = {cls for cls in _subclasses(AttributionResult)
              if cls.__module__.startswith("lvlm_probe.") and cls is not AttributionTable}  # a base
    assert public <= covered, f"result types without a summary test: {public - covered}"


@pytest.mark.parametrize("name", list(COLUMNS))
def test_repr_is_a_short_summary_without_tensors_or_the_tokenizer(name, build, shapes):
    result = build(name)
    text = repr(result)
    assert str(result) == text
    assert text.startswith(f"{type(result).__name__}(") and text.endswith(")"), text
    assert len(text) < MAX_REPR and text.count("\n") <= 2, text
    assert "tensor(" not in text and "array(" not in text and "Tokenizer" not in text, text
    assert "object at 0x" not in text and "DataFrame" not in text, text


@pytest.mark.parametrize("name", list(COLUMNS))
def test_to_frame_is_a_tidy_frame_with_the_documented_columns(name, build):
    result = build(name)
    frame = result.to_frame()
    assert isinstance(frame, pd.DataFrame) and len(frame) > 0
    assert set(COLUMNS[name]) <= set(frame.columns), (name, list(frame.columns))
    assert frame.columns.is_unique and isinstance(frame.index, pd.RangeIndex)
    del frame[COLUMNS[name][0]]  # a copy: changing it leaves the result as it was
    assert COLUMNS[name][0] in result.to_frame().columns


# --- the numbers each summary names are the result's own --------------------------------------------

def test_attribution_summaries_name_method_examples_answers_and_numbers(build, shapes):
    _, batch, target, foil = shapes
    split = build("source_split")
    text = repr(split)
    assert text.startswith(f"SourceSplit(method='source_split', {len(batch)} examples, ")
    assert (f"targets 2 distinct, e.g. {target[0]!r} vs foils 2 distinct, e.g. {foil[0]!r}" in text
            if len(set(target)) > 1 else f"target {target[0]!r}" in text)
    shares = split.shares()
    assert "mean shares " + " ".join(f"{s} {shares[f'{s}_share'].mean():.2f}" for s in ("prior", "prompt", "image")) \
        in text
    assert f"full {number(split.full.mean())}" in text and "log-odds" in text

    lens = build("logit_lens")
    n_layers, n, n_pos, k = lens.top_ids.shape
    text = repr(lens)
    assert f"{n} examples; {n_layers} layers x {n_pos} positions, top-{k}" in text
    keep = lens.positions >= 0
    assert f"mean top-1 probability {number(lens.top_probs[-1, :, :, 0][keep].mean())}" in text

    terms = build("dla")
    assert f"mean logit difference {number(terms.logit.mean())}" in repr(terms)
    assert f"{len(terms.terms)} terms" in repr(terms)

    curve = build("knockout")
    mean = curve.to_frame().groupby("layer")["relative_change"].mean()
    text = repr(curve)
    assert f"table {len(curve.table)} rows x {curve.table.shape[1]} columns" in text
    assert f"image -> last, window 2; largest mean drop at layer {mean.idxmin()}: relative change " \
           f"{number(mean.min())}" in text

    explained = build("explain_generation")
    tokens = explained.to_frame()
    text = repr(explained)
    assert text.startswith(f"GenerationSplit(method='explain_generation', {len(batch)} examples; {len(tokens)} tokens")
    assert f"mean log-probability {number(tokens['full'].mean())}" in text
    assert "mean shares " + " ".join(f"{s} {tokens[f'{s}_share'].mean():.2f}"
                                     for s in ("prior", "prompt", "image", "generated")) in text

    rho = build("randomization_check").to_frame()["spearman"]
    assert f"mean Spearman {number(rho.mean())}" in repr(build("randomization_check"))
    curves = build("deletion_insertion").to_frame()
    assert f"mean score deletion {number(curves['deletion'].mean())}" in repr(build("deletion_insertion"))


def test_bench_summaries_name_counts_and_scores(build):
    pope = build("pope")
    text = repr(pope)
    overall = pope.metrics.set_index("pope").loc["all"]
    assert text.startswith(f"PopeResult({len(pope.answers)} questions, 1 malformed line; ")
    assert f"accuracy {number(overall['accuracy'])}, f1 {number(overall['f1'])}" in text
    modes = pope.metrics.set_index("pope").drop("all")["accuracy"]
    assert "accuracy by mode " + " ".join(f"{m} {number(a)}" for m, a in modes.items()) in text
    assert repr(build("question_file")).endswith("4 questions, 1 malformed line; popular 2, random 2)")

    chair = build("chair")
    assert repr(chair) == "ChairResult(2 captions, 3 mentions, 1 hallucinated; CHAIR_i 0.333, CHAIR_s 0.5, " \
                          "recall 0.667)"
    assert (chair.chair_i, chair.chair_s) == (pytest.approx(1 / 3), 0.5)

    result = build("misalignment")
    text = repr(result)
    levels = result.answers.groupby("level")["correct"].mean()
    assert f"{len(result.answers)} questions, accuracy {number(result.answers['correct'].mean())}" in text
    assert "accuracy by level: " + " ".join(f"{k} {number(v)}" for k, v in levels.items()) in text
    errors = len(result.diagnosis.errors)
    assert errors > 0 and f"diagnosis of {count(errors, 'error')}" in text
    causes = result.diagnosis.errors["cause"].value_counts()
    text = repr(result.diagnosis)
    assert text.startswith(f"Diagnosis({count(errors, 'error')}, ")
    assert all(f"{cause} {causes.get(cause, 0)}" in text for cause in lp.bench.CAUSES)

    stages = build("stages")
    assert repr(stages) == f"Stages({str(stages.folder)!r}, 1 stage on disk, 1 finished with these settings; " \
                           "settings n)"
    assert stages.to_frame().to_dict("records") == [dict(stage="answers", done=True, tables=["answers"])]


def test_circuit_and_probe_summaries(build, shapes):
    _, batch, target, foil = shapes
    snap = build("snapshot")
    text = repr(snap)
    assert text.startswith(f"Snapshot({len(snap.tokens)} positions, {snap.groups.count('image')} image, ")
    assert f"target {target[0]!r} vs foil {foil[0]!r}" in text
    assert f"full {number(snap.split.full[0])}" in text
    frame = snap.to_frame()
    assert np.allclose(frame["lens_prob"], snap.lens_probs.reshape(-1).numpy())
    assert frame.loc[(frame.layer == 1) & (frame.position == 3), "lens_token"].item() == snap.lens_tokens[1][3]

    probes = build("batched_probes")
    assert repr(probes) == (f"BatchedProbes(3 probes, 3 classes, 8 features, standardized, cpu; "
                            f"{int(probes.converged_.sum())} of 3 converged, at most {int(probes.n_iter_.max())} "
                            f"iterations, largest gradient {float(probes.grad_norm_.max()):.3g})")
    assert probes.to_frame()["n_iter"].tolist() == probes.n_iter_.tolist()


# --- the logit lens's figure ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llava_next():
    """LLaVA-NeXT's tiny model: each image is a base grid, a tiles grid and row-end separators."""
    model = lp.zoo.tiny("llava_next", device="cpu")
    batch = model.prepare(images=[[random_image(40, 56, seed=1)], [random_image(72, 48, seed=2)]],
                          prompts=["Is there a heart?", "What colour is the star? Answer in one word."])
    return model, batch


def _images(fig):
    """``(axes, AxesImage)`` of every panel that draws cells (the colour bar's axes excluded)."""
    return [(ax, ax.get_images()[0]) for ax in fig.axes if ax.get_images()]


@pytest.mark.parametrize("example", [0, 1])
def test_lens_plot_draws_each_grid_of_each_image_as_that_grid(llava_next, example):
    model, batch = llava_next
    lens = logit_lens(model, batch, k=2)
    layout = batch.layouts[example]
    grids = [g for image in layout.images for g in image.grids]
    assert len(grids) > 1  # a multi-grid layout, else the test shows nothing
    fig = lens.plot(example=example, layer=-1)
    panels = _images(fig)
    # one panel per grid, as that grid, then the strip of the image's separators
    assert [im.get_array().shape for _, im in panels[:len(grids)]] == [g.shape for g in grids]
    assert [ax.get_title() for ax, _ in panels[:len(grids)]] == \
        [f"image 0: {g.name} {g.shape[0]}x{g.shape[1]}" for g in grids]
    separators = sum(len(p) for p in layout.images[0].separators.values())
    strip = panels[len(grids)][1].get_array()
    assert len(panels) == len(grids) + 1 and np.isfinite(strip.filled(np.nan)).sum() == separators
    # each cell is the top-1 probability at that grid position
    slots = {p: s for s, p in enumerate(lens.positions[example].tolist())}
    for grid, (_, im) in zip(grids, panels):
        expected = lens.top_probs[-1, example, [slots[p] for p in grid.positions.reshape(-1).tolist()], 0]
        np.testing.assert_allclose(im.get_array().filled(np.nan).reshape(-1), expected.numpy())
    width, height = fig.get_size_inches()
    assert width <= MAX_WIDTH and height <= MAX_HEIGHT
    title = fig._suptitle.get_text()
    assert f"logit lens at layer {lens.layers[-1]}" in title and "probability" in title
    assert "top-1 probability" in fig.axes[-1].get_ylabel()  # the colour bar says what it shows


def test_lens_plot_over_every_position_wraps_the_text_and_stays_bounded(llava_next):
    model, batch = llava_next
    lens = logit_lens(model, batch, positions="all", k=1)
    layout = batch.layouts[0]
    fig = lens.plot(example=0, layer=0)
    in_grids = {p for image in layout.images for g in image.grids for p in g.positions.reshape(-1).tolist()}
    others = [p for p in range(layout.length) if p not in in_grids and p not in layout.groups["pad"].tolist()]
    strip = _images(fig)[-1][1].get_array()
    assert strip.shape[1] <= STRIP_COLUMNS and strip.shape[0] == -(-len(others) // STRIP_COLUMNS)
    assert np.isfinite(strip.filled(np.nan)).sum() == len(others)
    assert fig.get_size_inches()[0] <= MAX_WIDTH
    assert f"layer {lens.layers[0]}" in fig._suptitle.get_text()


def test_lens_plot_names_bad_indices(llava_next):
    model, batch = llava_next
    lens = logit_lens(model, batch, k=1)
    with pytest.raises(InputError, match=r"example must be an index in \[0, 2\), got 5"):
        lens.plot(example=5)
    n = len(lens.layers)
    with pytest.raises(InputError, match=rf"layer must be an index into the lens's {n} layers .*got {n}"):
        lens.plot(layer=n)
