"""POPE: the official answer parser, its metrics, and question files with malformed lines."""
from __future__ import annotations

import importlib
import json
import math
import types

import pytest
from PIL import Image

from lvlm_probe.bench import pope_answer, pope_metrics, read_questions
from lvlm_probe.bench.pope_benchmark import first_word_answer, metrics_table
from lvlm_probe.errors import InputError, LVLMProbeError


def official(text: str) -> str:
    """POPE's evaluate.py, verbatim apart from the function wrapper."""
    if text.find('.') != -1:
        text = text.split('.')[0]
    text = text.replace(',', '')
    words = text.split(' ')
    if 'No' in words or 'not' in words or 'no' in words:
        return 'no'
    return 'yes'


# Free-text answers with the parse the official script gives them.
FIXTURE = [
    ("Yes. There is no cat.", "yes"),       # only the first sentence counts
    ("There is not a dog.", "no"),
    ("No, there is no dog.", "no"),
    ("No", "no"),
    ("no.", "no"),
    ("NO", "yes"),                          # case-sensitive: "NO" is not a no-word
    ("Not really.", "yes"),                 # "Not" is not "not"
    ("Yes, there is a dog in the image.", "yes"),
    ("nope", "yes"),
    ("There is a dog, not a cat", "no"),    # comma removed, "not" found
    ("I cannot see one", "yes"),            # "cannot" is one word
    ("", "yes"),
    (" no", "no"),                          # split on single spaces keeps "no"
    ("no\nthere is", "yes"),                # "no\nthere" is one space-separated word
]


@pytest.mark.parametrize("text, parsed", FIXTURE)
def test_parser_matches_the_official_script(text, parsed):
    assert pope_answer(text) == parsed == official(text)


def test_first_word_parser_is_stricter():
    assert first_word_answer("Yes. There is no cat.") == "yes"
    assert first_word_answer("There is a dog.") == "no"
    assert first_word_answer("NO") == "no"


def reference_metrics(labels, answers):
    """POPE's metric code (evaluate.py) on parsed answers."""
    pred = [0 if official(a) == "no" else 1 for a in answers]
    gold = [0 if lab == "no" else 1 for lab in labels]
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold))
    fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold))
    tn = sum(p == 0 and g == 0 for p, g in zip(pred, gold))
    fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return dict(accuracy=(tp + tn) / (tp + tn + fp + fn), precision=precision, recall=recall,
                f1=2 * precision * recall / (precision + recall), yes_ratio=pred.count(1) / len(pred))


def test_metrics_match_the_official_computation():
    labels = ["yes", "no", "yes", "no", "yes", "no", "no"]
    answers = ["Yes. There is no cat.", "There is not a dog.", "No", "Yes", "yes", "NO", "no, not."]
    got = pope_metrics(labels, answers)
    # by hand: parsed yes,no,no,yes,yes,yes,no -> tp=2 (0,4), fp=2 (3,5), tn=2 (1,6), fn=1 (2)
    assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (2, 2, 2, 1)
    for key, value in reference_metrics(labels, answers).items():
        assert got[key] == pytest.approx(value)
    assert got["accuracy"] == pytest.approx(4 / 7) and got["yes_ratio"] == pytest.approx(4 / 7)
    assert got["f1"] == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))


def test_undefined_ratios_are_nan_and_bad_labels_raise():
    got = pope_metrics(["no", "no"], ["No", "no"])
    assert got["accuracy"] == 1.0 and got["yes_ratio"] == 0.0
    assert math.isnan(got["precision"]) and math.isnan(got["recall"]) and math.isnan(got["f1"])
    with pytest.raises(InputError, match=r"labels\[1\] is 'maybe'; expected 'yes' or 'no'"):
        pope_metrics(["yes", "maybe"], ["yes", "no"])
    with pytest.raises(InputError, match="2 labels and 1 answers"):
        pope_metrics(["yes", "no"], ["yes"])
    with pytest.raises(InputError, match="unknown parser 'regex'"):
        pope_metrics(["yes"], ["yes"], parser="regex")


def test_metrics_table_groups_and_all_row():
    import pandas as pd

    table = pd.DataFrame({"pope": ["random", "random", "adversarial", "adversarial"],
                          "gold": ["yes", "no", "yes", "no"], "output": ["Yes", "No", "Yes", "Yes"]})
    out = metrics_table(table).set_index("pope")
    assert out.loc["random", "accuracy"] == 1.0 and out.loc["adversarial", "yes_ratio"] == 1.0
    assert out.loc["all", "n"] == 4 and out.loc["all", "accuracy"] == 0.75


def write_file(folder, lines):
    (folder / "img").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(folder / "img" / "a.png")
    path = folder / "coco_pope_adversarial.json"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_lines_are_reported_line_by_line_and_valid_lines_kept(tmp_path):
    good = {"question_id": 1, "image": "a.png", "text": "Is there a cat in the image?", "label": "yes"}
    lines = [
        json.dumps(good),
        json.dumps({**good, "question_id": 2, "label": "maybe"}),
        json.dumps({"question_id": 3, "image": "a.png", "label": "no"}),
        json.dumps({**good, "question_id": 4, "image": "missing.png"}),
        "{not json",
        "",
        json.dumps({**good, "question_id": 6, "label": "No"}),
        json.dumps({**good, "question_id": 1}),
        json.dumps([1, 2]),
    ]
    qf = read_questions(write_file(tmp_path, lines), images=tmp_path / "img")
    assert [q.question_id for q in qf.questions] == [1, 6]
    assert [q.answer for q in qf.questions] == ["yes", "no"]
    assert {q.pope for q in qf.questions} == {"adversarial"}  # from the file name
    assert [p.line for p in qf.problems] == [2, 3, 4, 5, 8, 9]
    by_line = {p.line: str(p) for p in qf.problems}
    assert "label 'maybe'; expected label 'yes' or 'no'" in by_line[2]
    assert "missing field(s) ['text']" in by_line[3] and "expected the fields" in by_line[3]
    assert "image 'missing.png' does not exist" in by_line[4]
    assert "invalid JSON" in by_line[5]
    assert "question_id 1 repeats line 1" in by_line[8]
    assert "a JSON list instead of an object" in by_line[9]
    assert all(line.startswith(str(qf.path)) for line in qf.report().splitlines())
    assert qf.questions[0].image.size == (8, 8)


def test_missing_file_raises(tmp_path):
    with pytest.raises(LVLMProbeError, match="does not exist"):
        read_questions(tmp_path / "nope.jsonl")


def test_shapesworld_export_reads_as_pope(tmp_path):
    from lvlm_probe.worlds import ShapesWorld

    world = ShapesWorld(seed=3, image_size=32)
    qs = world.questions(6, level="object", pope="popular")
    world.export(tmp_path, qs)
    qf = read_questions(tmp_path)
    assert not qf.problems
    assert [q.prompt for q in qf.questions] == [q.prompt for q in qs]
    assert [q.answer for q in qf.questions] == [q.answer for q in qs]
    assert {q.pope for q in qf.questions} == {"popular"}


def test_a_parser_must_answer_yes_or_no():
    with pytest.raises(InputError, match=r"turned answers\[0\] 'Yes' into 'YES'; a parser must return"):
        pope_metrics(["yes"], ["Yes"], parser=str.upper)
    assert pope_metrics(["yes", "no"], ["Yes", "nah"], parser="first_word")["accuracy"] == 1.0


def test_the_pope_module_is_not_shadowed_by_the_pope_function():
    # The package attribute `pope` is the function; the module that defines it has its own name,
    # so importing the module by its dotted name gives the module.
    import lvlm_probe as lp

    module = importlib.import_module("lvlm_probe.bench.pope_benchmark")
    assert isinstance(module, types.ModuleType)
    assert isinstance(lp.bench.pope, types.FunctionType) and lp.bench.pope is module.pope
    assert isinstance(lp.bench.pope_benchmark, types.ModuleType)
