"""Resumable benchmark stages: finished stages are read back, unfinished or stale ones recomputed."""
from __future__ import annotations

import pandas as pd

from lvlm_probe.bench.stages import DONE, Stages


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return pd.DataFrame({"x": [1.5, float("nan")], "about": [[0, 1], []], "s": ["a", None]}), pd.DataFrame({"y": [self.calls]})


def test_finished_stage_is_reused_and_equals_the_fresh_result(tmp_path):
    work = Counter()
    first = Stages(tmp_path, {"n": 3}).run("a", ("t", "u"), work)
    again = Stages(tmp_path, {"n": 3}).run("a", ("t", "u"), work)
    assert work.calls == 1
    for x, y in zip(first, again):
        pd.testing.assert_frame_equal(x, y)
    assert list(first[0]["about"][0]) == [0, 1]


def test_unfinished_and_stale_stages_are_computed_again(tmp_path):
    work = Counter()
    Stages(tmp_path, {"n": 3}).run("a", ("t", "u"), work)
    (tmp_path / "a" / DONE).unlink()                      # killed before done.json was written
    assert Stages(tmp_path, {"n": 3}).run("a", ("t", "u"), work)[1]["y"].item() == 2
    assert Stages(tmp_path, {"n": 4}).run("a", ("t", "u"), work)[1]["y"].item() == 3   # other settings
    assert Stages(tmp_path, {"n": 4}).run("a", ("t", "u"), work)[1]["y"].item() == 3   # now reused
    (tmp_path / "a" / DONE).write_text("{broken")
    assert Stages(tmp_path, {"n": 4}).run("a", ("t", "u"), work)[1]["y"].item() == 4


def test_without_a_folder_nothing_is_kept(tmp_path):
    work = Counter()
    Stages(None).run("a", ("t", "u"), work)
    Stages(None).run("a", ("t", "u"), work)
    assert work.calls == 2 and not any(tmp_path.iterdir())
