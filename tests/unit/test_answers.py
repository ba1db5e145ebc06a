"""Scoring free-text answers."""
from __future__ import annotations

import pandas as pd
import pytest

from lvlm_probe.bench import accuracy_by, first_word


@pytest.mark.parametrize("text, word", [
    ("Yes, it is.", "yes"), ("  no", "no"), ("Red.", "red"), ("", ""), ("42 left", "left"),
])
def test_first_word(text, word):
    assert first_word(text) == word


def test_accuracy_by_groups():
    df = pd.DataFrame({"level": ["a", "a", "b"], "correct": [True, False, True]})
    table = accuracy_by(df, "level").set_index("level")
    assert table.loc["a", "accuracy"] == 0.5 and table.loc["a", "n"] == 2
    assert table.loc["b", "accuracy"] == 1.0
