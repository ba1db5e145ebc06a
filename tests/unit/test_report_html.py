"""The report's HTML pieces: cells as the JSON's numbers are shown, escaping, marked captions."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lvlm_probe.bench.chair_metric import chair
from lvlm_probe.report import html as markup
from lvlm_probe.report.run import _marked, pick_examples
from lvlm_probe.viz.bench import CAUSE_COLORS, SOURCE_COLORS, source_columns


def test_cells_and_tables_escape_and_format():
    assert [markup.cell(v) for v in (0.12345, np.float64(1), 3, np.int64(4), None, math.nan, True, ["a", "b"])] == \
        ["0.123", "1.000", "3", "4", "–", "–", "yes", "a, b"]
    table = markup.table(pd.DataFrame({"q": ["<b>&"], "x": [0.5]}), "t")
    assert '<table id="t">' in table and "&lt;b&gt;&amp;" in table and "<td>0.500</td>" in table
    page = markup.document("a < b", [table, markup.figure(b"\x89PNG", "what it shows", "alt")])
    assert "<title>a &lt; b</title>" in page and 'src="data:image/png;base64,iVBORw==' in page
    assert "http" not in page and "<script" not in page


def test_marked_caption_highlights_hallucinated_words_only():
    text = "A red heart, a hot dog and a dog."
    r = chair([text], [["heart", "hot dog"]], synonyms={"heart": "heart", "hot dog": "hot dog", "dog": "dog"})
    marked = _marked(text, r.mentions)
    assert marked == 'A red heart, a hot dog and a <span class="mark">dog</span>.'
    r = chair(["A <b> star"], [[]])
    assert _marked("A <b> star", r.mentions) == 'A &lt;b&gt; <span class="mark">star</span>'


def test_examples_take_causes_in_turn_counterfactual_colour_first():
    errors = pd.DataFrame({
        "id": list("abcdef"), "full": [1.0, 1.0, np.nan, 1.0, 1.0, 1.0],
        "split": ["typical", "counterfactual", "counterfactual", "counterfactual", "typical", "counterfactual"],
        "kind": ["color", "color", "color", "size", "exist", "color"],
        "cause": ["prior override", "prior override", "prior override", "perception failure",
                  "knows but doesn't say", "knows but doesn't say"],
    })
    picked = pick_examples(errors, 4)
    # c has no split; b before a (counterfactual colour first); then knows (f before e), then perception
    assert list(picked.id) == ["b", "f", "d", "a"]


def test_error_tables_take_the_librarys_names():
    """The diagnosis's ``prompt`` (question text) and ``prompt_credit`` become ``question`` and
    ``prompt`` (source_split's name of the prompt's credit); a renamed table stays as it is."""
    errors = pd.DataFrame({"id": ["a"], "prompt": ["What colour?"], "prior": [0.1], "prompt_credit": [0.7],
                           "image": [-0.2], "full": [0.6], "prompt_share": [0.7]})
    renamed = source_columns(errors)
    assert list(renamed.columns) == ["id", "question", "prior", "prompt", "image", "full", "prompt_share"]
    assert renamed["question"][0] == "What colour?" and renamed["prompt"][0] == 0.7
    assert source_columns(renamed) is renamed
    assert list(SOURCE_COLORS) == ["prior", "prompt", "image"]
    assert not set(CAUSE_COLORS.values()) & set(SOURCE_COLORS.values())
