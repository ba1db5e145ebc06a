"""Every figure states what it shows, read back from the matplotlib objects: image maps name the
model, question, target and foil, the explained value and the model's own answer (and say so when
that answer is not the target); sweep figures name target, n train/test and chance; per-head
heatmaps mark chance; the report's cause colours are not its source colours."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.patches import Rectangle
from PIL import Image

import lvlm_probe as lp
from lvlm_probe import viz
from lvlm_probe.attribution import image_map, source_split
from lvlm_probe.errors import InputError
from lvlm_probe.viz import bench as bench_figures

pytestmark = pytest.mark.skipif("shapes-llava" not in lp.zoo.checkpoints(),
                                reason="shapes-llava checkpoint not shipped")


@pytest.fixture(scope="module")
def shapes():
    """shapes-llava with three colour questions (one batch)."""
    model = lp.zoo.load("shapes-llava", device="cpu")
    questions = lp.worlds.ShapesWorld(seed=1000, image_size=64).questions(
        3, level="attribute", split="typical", kind="color")
    batch = model.prepare(images=[q.image for q in questions], prompts=[q.prompt for q in questions])
    return model, questions, batch


def plain_logprobs(model, batch) -> torch.Tensor:
    """``[batch, vocab]`` last-position log-probabilities of a plain forward pass (the reference)."""
    with torch.no_grad():
        return torch.log_softmax(model.hf(**batch.inputs).logits[:, -1].float(), dim=-1)


def figure_text(fig) -> str:
    """Every text the figure draws: suptitle, axes titles, labels, text artists, colour bars."""
    parts = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()] + [t.get_text() for t in ax.texts]
    return "\n".join(parts)


def notes(fig) -> list:
    """The figure's text artists besides its suptitle."""
    return [t for t in fig.texts if t is not fig._suptitle]


def flat(text: str) -> str:
    """Text with its line wrapping undone (titles are wrapped at the figure's width)."""
    return " ".join(text.split())


# --- image maps -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ablation", "ig", "attention"])
def test_map_records_the_explained_value_and_the_models_answer(shapes, method):
    """``values`` equals source_split's score of the full input; the model's answer and its
    probability equal a plain forward pass's top token, for methods with and without gradients."""
    model, questions, batch = shapes
    answers = [q.answer for q in questions]
    maps = image_map(model, batch, answers, foil="blue", method=method, n_steps=8)
    split = source_split(model, batch, answers, foil="blue")
    assert torch.allclose(maps.values, split.full.float(), atol=1e-4)
    reference = plain_logprobs(model, batch)
    best, ids = reference.max(dim=-1)
    assert torch.equal(maps.model_answer_ids, ids)
    assert torch.allclose(maps.model_answer_probs, best.exp(), atol=1e-5)
    assert maps.model_answers == [model.tokenizer.decode([int(t)]) for t in ids]
    target_ids = model.answer_token_ids(batch, [[a] for a in answers])[:, 0]
    assert torch.allclose(maps.target_logprobs, reference[torch.arange(3), target_ids], atol=1e-4)
    assert maps.model_name == "shapes-llava" and maps.value_kind == "log-odds(target vs foil)"


def test_map_figure_names_model_question_target_value_and_answer(shapes):
    model, questions, batch = shapes
    maps = image_map(model, batch, [q.answer for q in questions], foil="blue", method="ablation")
    for i, q in enumerate(questions):
        fig = maps.plot(i)
        title = flat(fig._suptitle.get_text())
        assert "shapes-llava" in title and q.prompt in title
        assert f"target: {q.answer!r}" in title and "foil: 'blue'" in title
        assert f"log-odds(target vs foil) = {float(maps.values[i]):.3g}" in title
        assert f"model's answer: {maps.model_answers[i].strip()!r} (p = {float(maps.model_answer_probs[i]):.3g})" \
            in title
        bar = fig.axes[-1]  # the colour bar's axes
        assert flat(bar.get_ylabel()) == "drop in log-odds(target vs foil) when hidden (nats)"
        assert "grid 'patches' 4x4" in fig.axes[0].get_title()
        said = maps.model_answers[i].strip()
        if said == q.answer:  # the model answers the target: no warning on the figure
            assert not notes(fig) and not maps.answer_differs(i)


def test_a_target_the_model_does_not_say_is_flagged(shapes):
    """The finding: a map of 'large' on a colour question, which the model answers with a colour."""
    model, questions, batch = shapes
    maps = image_map(model, batch, "large", method="ablation")
    reference = plain_logprobs(model, batch)
    large = model.answer_token_ids(batch, [["large"]] * 3)[0, 0]
    for i in range(3):
        assert maps.answer_differs(i)
        fig = maps.plot(i)
        warning = flat(" ".join(t.get_text() for t in notes(fig)))
        said = maps.model_answers[i].strip()
        assert f"The model answers {said!r}, not the target 'large' (log p = {float(reference[i, large]):.3g})" \
            in warning
        assert [t.get_color() for t in notes(fig)] == ["tab:red"]
        assert f"log p(target) = {float(reference[i, large]):.3g}" in flat(fig._suptitle.get_text())
        assert flat(fig.axes[-1].get_ylabel()) == "drop in log p(target) when hidden (nats)"


def test_map_summary_frame_and_png_metadata(shapes, tmp_path):
    model, questions, batch = shapes
    maps = image_map(model, batch, [q.answer for q in questions], foil="blue", method="attention")
    text = repr(maps)
    assert text.startswith("ImageMap(method='attention', 3 examples, targets ")
    assert "vs foil 'blue'" in text and "grids [(4, 4)] (patches)" in text and "model 'shapes-llava'" in text
    assert f"{float(maps.values[0]):.3g}" in text and "tensor(" not in text and "Tokenizer" not in text
    assert len(text) < 600 and len(text.splitlines()) <= 3 and str(maps) == text
    frame = maps.to_frame()
    for i, q in enumerate(questions):
        rows = frame[frame["example"] == i]
        assert set(rows["question"]) == {q.prompt} and set(rows["model"]) == {"shapes-llava"}
        assert np.allclose(rows["full"], float(maps.values[i]))
        assert set(rows["model_answer"]) == {maps.model_answers[i]}
        assert set(rows.loc[rows["kind"] == "cell", "grid"]) == {"patches"}
    assert len(frame) == sum(16 + len(w) for w in maps.words)
    path = viz.save_figure(maps.plot(1), tmp_path / "map.png", metadata=maps.metadata(1))
    stored = Image.open(path).text
    assert stored["model"] == "shapes-llava" and stored["question"] == questions[1].prompt
    assert stored["target"] == questions[1].answer and stored["foil"] == "blue"
    assert float(stored["log-odds(target vs foil)"]) == pytest.approx(float(maps.values[1]), rel=1e-5)


# --- sweep figures --------------------------------------------------------------------------------


def sweep_table(heads: bool = False) -> pd.DataFrame:
    """A sweep's results table with its sample sizes and chance (two targets, lm layers)."""
    rng = np.random.default_rng(1)
    rows = []
    for target, chance, n_train, n_test in (("color", 1 / 6, 96, 24), ("shape", 0.25, 80, 20)):
        for layer in range(3):
            for head in (range(4) if heads else [None]):
                acc = float(rng.uniform(0.05, 0.9))
                rows.append(dict(hook=f"blocks.{layer}.hook_resid_post", tower="lm", layer=layer, head=head,
                                 target=target, accuracy=acc, ci_low=acc - 0.1, ci_high=acc + 0.1,
                                 control_accuracy=0.2, selectivity=acc - 0.2, chance=chance,
                                 n_train=n_train, n_test=n_test))
    return pd.DataFrame(rows)


def test_layer_curves_title_names_target_n_and_chance():
    table = sweep_table()
    fig = viz.layer_curves(table)
    title = flat(fig._suptitle.get_text())
    assert "color: n train 96, test 24, chance 0.17" in title
    assert "shape: n train 80, test 20, chance 0.25" in title
    chance_lines = {line.get_label(): line.get_ydata()[0] for line in fig.axes[0].get_lines()
                    if line.get_label().endswith("(chance)")}
    assert chance_lines == pytest.approx({"color (chance)": 1 / 6, "shape (chance)": 0.25})
    one = viz.layer_curves(table[table["target"] == "shape"], chance=0.25)  # as the sweep calls it
    assert flat(one._suptitle.get_text()) == "probe accuracy per layer | shape: n train 80, test 20, chance 0.25"
    varied = table.assign(n_test=np.where(table["layer"] == 0, 23, table["n_test"]))
    assert "color: n train 96, test 23-24" in flat(viz.layer_curves(varied)._suptitle.get_text())  # per target


def test_head_heatmap_is_centred_on_chance_and_marks_it():
    table = sweep_table(heads=True)
    fig = viz.head_heatmap(table, target="color", value="accuracy")
    image = fig.axes[0].get_images()[0]
    assert image.norm.vcenter == pytest.approx(1 / 6)  # white at chance
    bar = fig.axes[1]
    assert "chance 0.17" in bar.get_ylabel()
    marks = [line.get_ydata()[0] for line in bar.get_lines()]
    assert marks == pytest.approx([1 / 6])
    assert "n train 96, test 24, chance 0.17" in flat(fig.axes[0].get_title())
    fig = viz.head_heatmap(table, target="shape", value="selectivity")
    assert fig.axes[0].get_images()[0].norm.vcenter == 0.0
    assert [line.get_ydata()[0] for line in fig.axes[1].get_lines()] == [0.0]
    assert fig.axes[1].get_ylabel().startswith("selectivity (accuracy - control accuracy")
    fig = viz.head_heatmap(table, target="shape", value="n_test")  # no reference level: no mark
    assert not fig.axes[1].get_lines() and fig.axes[1].get_ylabel() == "n_test"
    with pytest.raises(InputError, match="no 'chance' column and no chance= was given; pass chance="):
        viz.head_heatmap(table.drop(columns="chance"), target="shape", value="accuracy")
    given = viz.head_heatmap(table.drop(columns="chance"), target="shape", value="accuracy", chance=0.5)
    assert given.axes[0].get_images()[0].norm.vcenter == 0.5


def test_transfer_curves_title():
    rows = [dict(layer=k, metric=f"color: {d}", value=0.5, target="color", direction=d, chance=0.2,
                 n_train=60, n_test=40) for k in range(3) for d in ("image->text", "text->image")]
    fig = viz.alignment_curves(pd.DataFrame(rows), ylabel="transfer accuracy", chance=0.2)
    assert flat(fig._suptitle.get_text()) == "transfer accuracy per layer | color: n train 60, test 40, chance 0.20"
    plain = pd.DataFrame({"layer": [0, 1], "metric": ["cka"] * 2, "value": [0.1, 0.2]})
    assert viz.alignment_curves(plain, title="CKA, image vs text")._suptitle.get_text() == "CKA, image vs text"


# --- the report's colours and names ---------------------------------------------------------------


def distance(a, b) -> float:
    return float(np.linalg.norm(np.subtract(to_rgb(a), to_rgb(b))))


def test_cause_colours_are_not_source_colours(shapes):
    """On the drawn objects: the source bars' colours (as SourceSplit.plot draws them) and the
    cause colours of the tick labels are far apart, every pair."""
    errors = pd.DataFrame({"prior": [0.5, -0.2, 0.1], "prompt_credit": [1.0, 0.3, -0.4], "image": [-0.3, 0.8, 0.2],
                           "full": [1.2, 0.9, -0.1], "answer": ["red", "blue", "green"],
                           "gold": ["blue", "red", "red"], "prompt": ["q1", "q2", "q3"],
                           "cause": ["prior override", "knows but doesn't say", "perception failure"]})
    fig = bench_figures.split_bars(errors)
    ax = fig.axes[0]
    sources = {bar.get_label(): to_rgb(bar.patches[0].get_facecolor()) for bar in ax.containers}
    assert set(sources) == {"prior", "prompt", "image"}
    causes = [to_rgb(tick.get_color()) for tick in ax.get_xticklabels()]
    assert len(set(causes)) == 3
    model, questions, batch = shapes
    split = source_split(model, batch, [q.answer for q in questions], foil="blue")
    drawn = {to_rgb(p.get_facecolor()) for a in split.plot().axes for p in a.patches if isinstance(p, Rectangle)
             and p.get_width() > 0}
    for cause in causes:
        for source in list(sources.values()) + list(drawn):
            assert distance(cause, source) > 0.3
    bars = bench_figures.cause_bars(pd.DataFrame({"split": ["cf"] * 3, "level": ["attribute"] * 3,
                                                  "cause": list(bench_figures.CAUSE_COLORS), "n": [1, 2, 3]}))
    legend = {bar.get_label(): to_rgb(bar.patches[0].get_facecolor()) for bar in bars.axes[0].containers}
    assert set(legend.values()) == set(causes)
