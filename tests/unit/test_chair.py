"""CHAIR_i / CHAIR_s on hand-checked captions, synonym tables and mention-level detail."""
from __future__ import annotations

import math

import pytest

from lvlm_probe.bench import chair, load_synonyms, shapes_synonyms
from lvlm_probe.errors import InputError
from lvlm_probe.worlds import ShapesWorld


def test_hand_checked_shapes_fixture():
    captions = [
        "A small red heart and a large blue star.",        # star hallucinated
        "Two hearts and a circle.",                         # plural maps to heart; both present
        "A green square, a square and a triangle.",         # square twice (both hallucinated), triangle present
        "Nothing here.",                                    # no mention
    ]
    truths = [["heart"], ["heart", "circle"], ["triangle"], ["star"]]
    r = chair(captions, truths)
    # mentions: 2 + 2 + 3 + 0 = 7; hallucinated: 1 + 0 + 2 = 3; captions with one: 2 of 4
    assert len(r.mentions) == 7
    assert r.chair_i == pytest.approx(3 / 7) and r["chair_i"] == r.chair_i
    assert r.chair_s == pytest.approx(2 / 4) and r["chair_s"] == r.chair_s
    rows = r.mentions[r.mentions.caption == 2]
    assert list(rows.word) == ["square", "square", "triangle"]
    assert list(rows.start) == [2, 4, 7]
    assert list(rows.hallucinated) == [True, True, False]
    assert r.mentions.loc[r.mentions.word == "hearts", "object"].item() == "heart"
    assert list(r.captions.missed) == [[], [], [], ["star"]]
    s = r.summary()
    assert (s["mentions"], s["hallucinated"], s["captions"]) == (7, 3, 4)
    assert s["recall"] == pytest.approx(4 / 5)  # true objects 1+2+1+1 = 5; only the star is never mentioned


def test_scene_truths_and_world_captions_never_hallucinate():
    world = ShapesWorld(seed=2, image_size=32)
    scenes = world.scenes(20, split="typical")
    r = chair([world.caption(s) for s in scenes], scenes)
    assert r.chair_i == 0.0 and r.chair_s == 0.0
    assert len(r.mentions) == sum(len(s) for s in scenes)
    assert all(len(m) == 0 for m in r.captions.missed)


def test_coco_style_synonym_file_with_phrases(tmp_path):
    path = tmp_path / "synonyms.txt"
    path.write_text("person, girl, boy, man, woman\nhot dog, hot dogs, frankfurter\ndog, puppy\n")
    table = load_synonyms(path)
    assert table["woman"] == "person" and table["puppies"] == "dog"
    assert "men" not in table  # regular plurals only
    r = chair(["A man eats a hot dog next to a puppy.", "Two girls and a dog."],
              [["person", "hot dog"], ["girl"]], synonyms=path)
    # "hot dog" matched as one phrase (not "dog"); puppy -> dog hallucinated; girls -> person; dog hallucinated
    assert list(r.mentions.object) == ["person", "hot dog", "dog", "person", "dog"]
    assert list(r.mentions.hallucinated) == [False, False, True, False, True]
    assert r.chair_i == pytest.approx(2 / 5) and r.chair_s == 1.0


def test_conflicting_synonyms_and_bad_input(tmp_path):
    path = tmp_path / "syn.txt"
    path.write_text("dog, puppy\ncat, puppy\n")
    with pytest.raises(InputError, match="line 2 maps 'puppy' to 'cat', but line 1 maps it to 'dog'"):
        load_synonyms(path)
    with pytest.raises(InputError, match="2 captions and 1 truths"):
        chair(["a", "b"], [["heart"]])
    with pytest.raises(InputError, match="the string 'heart'"):
        chair(["a heart"], ["heart"])
    r = chair(["no objects"], [["heart"]])
    assert math.isnan(r.chair_i) and r.chair_s == 0.0


def test_a_synonym_table_the_wrong_way_round_is_refused_up_front():
    # category -> list of words (how the reference file reads) instead of word -> category
    with pytest.raises(InputError) as caught:
        chair(["a circle"], [["circle"]], synonyms={"shape": ["circle", "square"]})
    message = str(caught.value)
    assert "synonyms maps 'shape' (str) to a list (['circle', 'square'])" in message
    assert "expected a mapping word or phrase -> category, both strings" in message
    assert "pass its path or read it with lp.bench.load_synonyms" in message
    with pytest.raises(InputError, match=r"synonyms maps 3 \(int\) to a str \('three'\)"):
        chair(["a circle"], [["circle"]], synonyms={3: "three"})
    with pytest.raises(InputError, match="synonyms is a list; expected a mapping"):
        chair(["a circle"], [["circle"]], synonyms=["circle"])
    assert chair(["a disc"], [["circle"]], synonyms={"disc": "circle"}).chair_i == 0.0


def test_builtin_table_covers_every_shape_and_plural():
    table = shapes_synonyms()
    for shape in ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon"):
        assert table[shape] == shape
    assert table["crosses"] == "cross" and table["rhombus"] == "diamond"


def test_typical_share_counts_shapes_named_after_their_typical_colour():
    import pandas as pd

    from lvlm_probe.bench.misalignment_benchmark import chair_table

    captions = pd.DataFrame({
        "split": ["counterfactual", "counterfactual", "typical"],
        "caption": ["A small yellow star.", "A red star and a blue heart.", "A red heart."],
        "truth": [["triangle"], ["square"], ["heart"]],
    })
    table = chair_table(captions, {"star": "yellow", "heart": "red"}).set_index("split")
    # hallucinated: star after yellow (typical), star after red (not), heart after blue (not)
    assert table.loc["counterfactual", "hallucinated"] == 3
    assert table.loc["counterfactual", "typical_share"] == pytest.approx(1 / 3)
    assert math.isnan(table.loc["typical", "typical_share"]) and table.loc["typical", "chair_i"] == 0.0
    assert table.loc["all", "chair_s"] == pytest.approx(2 / 3)
