"""The misalignment benchmark and its diagnosis on shapes-llava (one shared run), POPE from files."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import lvlm_probe as lp
from lvlm_probe.bench import CAUSES, chair, pope_metrics
from lvlm_probe.bench.diagnosis import default_probe_world, probe_questions
from lvlm_probe.bench.tables import scene_key
from lvlm_probe.errors import InputError

pytestmark = pytest.mark.skipif("shapes-llava" not in lp.zoo.checkpoints(),
                                reason="shapes-llava checkpoint not shipped")
WORLD = dict(seed=1000, image_size=64)


@pytest.fixture(scope="module")
def model():
    return lp.zoo.load("shapes-llava", device="cpu")


@pytest.fixture(scope="module")
def result(model):
    return lp.bench.misalignment(model, lp.worlds.ShapesWorld(**WORLD), n=60, captions=12, progress=False)


def test_errors_at_every_level_and_the_level_table_counts_them(result):
    answers, levels = result.answers, result.levels.set_index(["split", "level"])
    per_level = levels.groupby(level="level")["errors"].sum()
    assert set(per_level.index) == {"object", "attribute", "relation"} and (per_level > 0).all()
    for (split, level), row in levels.iterrows():
        part = answers[(answers.split == split) & (answers.level == level)]
        assert row["n"] == len(part) == 60
        assert row["errors"] == (~part.correct).sum()
        assert row["accuracy"] == pytest.approx(1 - row["error_rate"])
        # severity is the wrong answers' mean probability: undefined (nan) for a level without errors
        assert row["severity"] == pytest.approx(part.loc[~part.correct, "p_answer"].mean(), nan_ok=True)
    # counterfactual colours hurt the attribute level (the world's colour prior)
    assert levels.loc[("counterfactual", "attribute"), "accuracy"] < levels.loc[("typical", "attribute"), "accuracy"]


def test_confidence_is_the_greedy_answers_probability(result):
    a = result.answers.dropna(subset=["p_answer"])
    assert ((a.p_answer > 0) & (a.p_answer <= 1)).all()
    right, wrong = a[a.correct], a[~a.correct]
    assert np.allclose(right.p_answer, right.p_gold)
    # greedy decoding picked the answer's first token, so it is at least as likely as the gold one's
    assert (wrong.p_answer >= wrong.p_gold - 1e-6).all()


def test_pope_table_recomputes_from_the_object_answers(result):
    objects = result.answers[result.answers.level == "object"]
    table = result.pope.set_index(["split", "pope"])
    assert {m for _, m in table.index} == {"random", "popular", "adversarial", "all"}
    for (split, mode), part in objects.groupby(["split", "pope"]):
        expected = pope_metrics(list(part.gold), list(part.output))
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio", "tp", "fp", "tn", "fn"):
            assert table.loc[(split, mode), key] == pytest.approx(expected[key], nan_ok=True)
    row = table.loc[("all", "all")]
    assert row["n"] == len(objects) and row["yes_ratio"] == pytest.approx((row["tp"] + row["fp"]) / row["n"])


def test_chair_on_generated_captions(result):
    captions, table = result.captions, result.chair.set_index("split")
    assert len(captions) == 24 and set(captions.split) == {"typical", "counterfactual"}
    for split, part in captions.groupby("split"):
        expected = chair(list(part.caption), [list(t) for t in part.truth])
        assert table.loc[split, "chair_i"] == pytest.approx(expected.chair_i)
        assert table.loc[split, "chair_s"] == pytest.approx(expected.chair_s)
    assert table.loc["all", "captions"] == 24
    # atypical colours make shapes-llava name shapes that are not there
    assert table.loc["counterfactual", "chair_i"] > table.loc["typical", "chair_i"]


def test_every_error_gets_one_cause_by_the_documented_rule(result):
    d = result.diagnosis
    errors = d.errors
    assert len(errors) == int(result.levels.errors.sum()) and set(errors.cause) <= set(CAUSES)
    causes = d.causes.groupby(["split", "level"])["n"].sum()
    with_errors = {k: v for k, v in result.levels.set_index(["split", "level"])["errors"].items() if v}
    assert causes.to_dict() == with_errors  # a level without errors has no cause rows
    split = errors.dropna(subset=["full"])
    assert len(split) > 0.9 * len(errors)  # shapes-llava answers in one token
    total = split.prior + split.prompt_credit + split.image
    assert np.allclose(total, split.full, atol=1e-4)           # the split is exact
    assert (split.full > 0).all()                               # greedy: the wrong answer beat the gold one
    language = errors.prior + errors.prompt_credit > 0
    prior = language & (errors.image_share <= 0.5)
    assert (errors.cause == "prior override").equals(prior)
    assert (errors.loc[~prior, "cause"] == np.where(errors.loc[~prior, "decodable"], CAUSES[1], CAUSES[2])).all()


def test_prior_override_is_the_largest_cause_on_counterfactual_colour(result):
    kinds = result.diagnosis.kinds
    cf = kinds[(kinds.split == "counterfactual") & kinds.kind.isin(["color", "color_yesno"])]
    counts = cf.groupby("cause")["n"].sum()
    assert counts.sum() >= 10
    assert counts.idxmax() == "prior override" and counts["prior override"] > counts.drop("prior override").max()


@pytest.fixture(scope="module")
def colour_errors(model):
    """Wrong answers to open colour questions about atypically coloured shapes, with their source
    split and the cause the split rule gives them (decodability left out)."""
    from lvlm_probe.bench.diagnosis import assign_causes, split_errors
    from lvlm_probe.bench.misalignment_benchmark import answer_questions

    qs = lp.worlds.ShapesWorld(seed=1007, image_size=64).questions(300, level="attribute", split="counterfactual",
                                                                   kind="color")
    answers = answer_questions(model, qs, progress=False)
    errors = answers[~answers.correct].merge(split_errors(model, qs, answers, progress=False), on="id")
    errors["decodable"] = False
    assert len(errors) > 40
    return errors, assign_causes(errors) == "prior override", errors.answer == errors.typical_color


def test_errors_naming_the_typical_colour_are_prior_overrides(colour_errors):
    """Validity of the split rule: an error naming the shape's typical colour is a prior override
    more often than one naming another colour."""
    _, prior, named = colour_errors
    assert prior[named].mean() > prior[~named].mean() + 0.15


def test_prior_override_errors_name_the_typical_colour(colour_errors):
    """The errors the split rule calls prior overrides mostly name the shape's typical colour."""
    _, prior, named = colour_errors
    assert named[prior].mean() > 0.6


def test_probes_per_kind_and_location_and_what_they_decode(result):
    probes = result.diagnosis.probes
    locations = probes.groupby("kind")["location"].agg(lambda v: set(v)).to_dict()
    assert locations == {"exist": {"last"}, "color": {"last", "object"}, "color_yesno": {"last", "object"},
                         "size": {"last", "object"}, "relation_yesno": {"last", "pair"}, "where": {"last", "pair"}}
    assert (probes.groupby(["kind", "location"]).size() == 5).all()  # embed + 4 layers
    colour = probes[(probes.kind == "color") & (probes.location == "object")].set_index("layer")
    assert colour.accuracy.max() > 0.8 > colour.chance.max() + 0.4
    # image positions hold the placeholder token's embedding at "embed": nothing to decode there
    assert colour.loc["embed", "accuracy"] < colour.loc["embed", "chance"] + 0.1 and not colour.loc["embed", "counts"]
    assert (probes.counts == (probes.accuracy >= probes.chance + 0.1)).all()
    decoded = result.diagnosis.decoded
    assert decoded.loc[decoded.decodable, "decoded_at"].notna().all()
    assert decoded.loc[~decoded.decodable, "decoded_at"].isna().all()
    counting = {f"{r.location}@{r.layer}" for r in probes[probes.counts].itertuples()}
    assert set(decoded.decoded_at.dropna()) <= counting
    # decodability goes with answering right: the concept is decodable more often when the answer is right
    joined = decoded.merge(result.answers[["id", "split", "level", "correct"]], on="id")
    assert joined[joined.correct].decodable.mean() > joined[~joined.correct].decodable.mean()
    table = result.diagnosis.decodability.set_index(["split", "level"])
    for (split, level), part in joined.groupby(["split", "level"]):
        wrong = part[~part.correct]
        assert table.loc[(split, level), "n_wrong"] == len(wrong)
        assert table.loc[(split, level), "decodable_wrong"] == pytest.approx(wrong.decodable.mean(), nan_ok=True)


def test_probe_questions_never_share_a_scene_with_the_diagnosed_ones(result):
    avoid = {scene_key(q.scene) for q in result.questions}
    probe_world = default_probe_world(lp.worlds.ShapesWorld(**WORLD), result.questions)
    assert probe_world.config.seed == WORLD["seed"] + 1
    train = probe_questions(probe_world, ["color", "exist"], ["counterfactual"], 30, avoid)
    assert train and not {scene_key(q.scene) for q in train} & avoid
    # the same world would repeat the diagnosed scenes: they are dropped
    same = lp.worlds.ShapesWorld(**WORLD)
    asked = same.questions(30, level="attribute", split="counterfactual", kind="color")
    kept = probe_questions(same, ["color"], ["counterfactual"], 30, {scene_key(q.scene) for q in asked})
    assert kept == []


def test_export_folder_and_pope_file_with_malformed_lines(model, tmp_path):
    world = lp.worlds.ShapesWorld(seed=1000, image_size=64)
    qs = world.questions(6, level="object", split="typical", pope="adversarial")
    world.export(tmp_path, qs)
    from_folder = lp.bench.misalignment(model, tmp_path, captions=0, diagnose=False, progress=False)
    assert list(from_folder.answers.id) == [q.id for q in qs]
    assert from_folder.diagnosis is None and from_folder.chair.empty

    path = tmp_path / "questions.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(2, json.dumps({**json.loads(lines[0]), "question_id": 99, "label": "unsure"}))
    lines.insert(4, json.dumps({**json.loads(lines[0]), "question_id": 98, "image": "images/gone.png"}))
    path.write_text("\n".join(lines) + "\n")
    result = lp.bench.pope(model, path, progress=False)
    assert [(p.line, "label 'unsure'" in p.problem) for p in result.problems][:1] == [(3, True)]
    assert [p.line for p in result.problems] == [3, 5] and "does not exist" in result.problems[1].problem
    assert list(result.answers.prompt) == [q.prompt for q in qs]  # every valid line answered
    direct = lp.bench.pope(model, qs, progress=False)
    pd.testing.assert_frame_equal(result.metrics, direct.metrics)
    assert list(result.metrics.pope) == ["adversarial"]


def test_bad_inputs_name_what_was_expected(model, tmp_path):
    with pytest.raises(InputError, match="not a ShapesWorld export"):
        lp.bench.misalignment(model, tmp_path)
    with pytest.raises(InputError, match="n must be a positive int, got 0"):
        lp.bench.misalignment(model, lp.worlds.ShapesWorld(seed=1), n=0)
    with pytest.raises(InputError, match="must be a ShapesWorld or an export folder, got int"):
        lp.bench.misalignment(model, 3)
    attribute = lp.worlds.ShapesWorld(seed=1).questions(2, level="attribute", kind="color")
    with pytest.raises(InputError, match="POPE needs yes/no questions"):
        lp.bench.pope(model, attribute, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1}\n')
    with pytest.raises(InputError, match=r"no valid question:\n.*line 1: missing field\(s\)"):
        lp.bench.pope(model, tmp_path / "bad.jsonl", progress=False)
