"""The HTML report: self-contained, readable structure, the JSON's numbers in its tables, resumable."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser

import pandas as pd
import pytest
from typer.testing import CliRunner

import lvlm_probe as lp
from lvlm_probe.cli import app
from lvlm_probe.report.html import cell
from lvlm_probe.report.run import TABLES

pytestmark = pytest.mark.skipif("shapes-llava" not in lp.zoo.checkpoints(),
                                reason="shapes-llava checkpoint not shipped")
SETTINGS = dict(name="shapes-llava", n=18, captions=6, n_probe=60, maps=2, progress=False)
HEADINGS = {"Accuracy per level", "POPE", "CHAIR", "Diagnosis of the errors", "Where the concepts become decodable",
            "Where the wrong answers came from", "Example heatmaps"}


class Page(HTMLParser):
    """Headings, images, figure captions, links/scripts and every table's cells."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[tuple[str, str]] = []
        self.images: list[dict] = []
        self.captions: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.foreign: list[str] = []
        self._text: list[str] | None = None
        self._tag = None
        self._table = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("h1", "h2", "figcaption", "td", "th"):
            self._text, self._tag = [], tag
        if tag == "img":
            self.images.append(attrs)
        if tag in ("script", "link", "iframe", "object", "embed") or any(
                str(v).startswith(("http:", "https:", "//")) for v in attrs.values()):
            self.foreign.append(tag)
        if tag == "table":
            self._table = attrs.get("id")
            self.tables[self._table] = []
        if tag == "tr" and self._table is not None:
            self.tables[self._table].append([])

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == self._tag and self._text is not None:
            text = "".join(self._text).strip()
            if tag in ("h1", "h2"):
                self.headings.append((tag, text))
            elif tag == "figcaption":
                self.captions.append(text)
            elif self._table is not None:
                self.tables[self._table][-1].append(text)
            self._text = self._tag = None
        if tag == "table":
            self._table = None


@pytest.fixture(scope="module")
def model():
    return lp.zoo.load("shapes-llava", device="cpu")


@pytest.fixture(scope="module")
def report(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return lp.report.write_report(model, out, **SETTINGS)


@pytest.fixture(scope="module")
def page(report):
    parser = Page()
    parser.feed(report.html.read_text(encoding="utf-8"))
    return parser


def test_self_contained_document_with_headings_and_captioned_figures(report, page):
    text = report.html.read_text(encoding="utf-8")
    assert report.html.stat().st_size < 10 * 2**20
    assert page.headings[0] == ("h1", "Misalignment report: shapes-llava")
    assert HEADINGS <= {t for tag, t in page.headings if tag == "h2"}
    assert "http://" not in text and "https://" not in text and not page.foreign
    assert len(page.images) == 9  # levels, POPE, caption causes, causes, emergence, two splits, two maps
    for image in page.images:
        assert image["src"].startswith("data:image/png;base64,") and image["alt"]
        assert base64.b64decode(image["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(page.captions) == len(page.images) and all(len(c) > 20 for c in page.captions)
    # the example heatmaps are captioned with their questions
    examples = json.loads(report.json.read_text())["examples"]
    assert len(examples) == 2
    for example, caption in zip(examples, page.captions[-2:]):
        assert caption.startswith(example["question"]) and f"answered: {example['answer']}" in caption
    # the captions name the causes' colours, which are not the sources' (grey, orange, blue)
    assert any("red: prior override, darkviolet: knows but doesn't say, olive: perception failure" in c
               for c in page.captions)
    assert not any("orange prior override" in c for c in page.captions)


def strict(constant):
    raise ValueError(f"{constant} is not JSON")


def test_json_numbers_are_the_tables_numbers(report, page):
    numbers = json.loads(report.json.read_text(), parse_constant=strict)  # no NaN or Infinity tokens
    assert numbers["model"] == "shapes-llava" and numbers["settings"]["n"] == 18
    for name in TABLES:
        rows = page.tables[name]
        header, body = rows[0], rows[1:]
        assert len(body) == len(numbers[name]) > 0
        for cells, record in zip(body, numbers[name]):
            assert cells == [cell(float("nan") if record[c] is None else record[c]) for c in header]
    result = report.result
    assert sum(r["errors"] for r in numbers["levels"]) == len(result.diagnosis.errors)
    # the wrong answers under the library's names: source_split's credits, the question's text
    errors = result.diagnosis.errors
    assert "prompt_credit" not in numbers["errors"][0]
    for record, (_, row) in zip(numbers["errors"], errors.iterrows()):
        assert record["question"] == row["prompt"] and record["id"] == row["id"]
        for credit, column in (("prior", "prior"), ("prompt", "prompt_credit"), ("image", "image")):
            assert (record[credit] is None) == pd.isna(row[column])
            assert record[credit] is None or record[credit] == pytest.approx(row[column])
    by_id = {r["id"]: r for r in numbers["errors"]}
    for example in numbers["examples"]:
        assert example["question"] == by_id[example["id"]]["question"]
    assert {p["kind"] for p in numbers["probes"]} == set(result.diagnosis.probes.kind)
    # the captions' hallucinated mentions: the table's numbers are the JSON's, and every caption
    # shown names each hallucinated word's cause after it
    header, *body = page.tables["caption_causes"]
    assert [cells for cells in body] == [[cell(float("nan") if r[c] is None else r[c]) for c in header]
                                         for r in numbers["caption_causes"]]
    mentions = pd.DataFrame(numbers["caption_mentions"])
    assert len(mentions) == numbers["caption_causes"][-1]["mentions"] > 0
    wrong = mentions[mentions["hallucinated"]]
    assert len(wrong) > 0
    assert set(wrong["cause"]) <= set(lp.bench.CAPTION_CAUSES) and mentions.loc[~mentions["hallucinated"], "cause"].isna().all()
    shown = " ".join(cells[1] for cells in page.tables["explained_captions"][1:]).lower()
    first = list(dict.fromkeys(wrong["caption"]))[:8]  # the captions the table shows
    assert len(page.tables["explained_captions"]) == len(first) + 1
    for m in wrong[wrong["caption"].isin(first)].itertuples():
        assert f"{m.word}{m.cause}" in shown, (m.word, m.cause)


def test_rerun_after_an_interrupted_stage_reuses_the_others_and_writes_the_same_report(model, report):
    out = report.html.parent
    html, numbers = report.html.read_bytes(), report.json.read_bytes()
    stages = out / "stages"
    kept = {p: p.stat().st_mtime_ns for p in stages.rglob("*.parquet") if p.parent.name not in ("splits", "maps")}
    shutil.rmtree(stages / "maps")                   # a stage that never started
    (stages / "splits" / "done.json").unlink()       # a stage killed before it finished
    report.html.unlink()
    again = lp.report.write_report(model, out, **SETTINGS)
    assert again.html.read_bytes() == html and again.json.read_bytes() == numbers
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished stages were read, not rewritten
    assert (stages / "splits" / "done.json").is_file() and (stages / "maps" / "done.json").is_file()


def test_kill9_then_resume_gives_the_same_report(model, report, tmp_path):
    """Killed after the probes stage, a rerun reuses the finished stages and writes exactly the
    uninterrupted run's report."""
    out = tmp_path / "out"
    script = ("import lvlm_probe as lp; lp.report.write_report(lp.zoo.load('shapes-llava', device='cpu'), "
              f"{str(out)!r}, **{SETTINGS!r})")
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker, deadline = out / "stages" / "probes" / "done.json", time.time() + 120
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert marker.exists() and not (out / "report.html").exists()
    finished = {p: p.stat().st_mtime_ns for name in ("answers", "captions", "probes")
                for p in (out / "stages" / name).glob("*.parquet")}
    again = lp.report.write_report(model, out, **SETTINGS)
    assert again.html.read_bytes() == report.html.read_bytes()
    assert again.json.read_bytes() == report.json.read_bytes()
    assert {p: p.stat().st_mtime_ns for p in finished} == finished


def test_bad_arguments_fail_before_any_stage(model, tmp_path):
    from lvlm_probe.errors import InputError

    with pytest.raises(InputError, match="unknown map_method 'gradcam'; available:"):
        lp.report.write_report(model, tmp_path, map_method="gradcam")
    with pytest.raises(InputError, match="maps must be a non-negative int, got -1"):
        lp.report.write_report(model, tmp_path, maps=-1)
    assert not (tmp_path / "stages").exists()


def test_cli_report_on_an_export_folder(tmp_path):
    world = lp.worlds.ShapesWorld(seed=1000, image_size=64)
    questions = (world.questions(6, level="object", split="counterfactual", pope="adversarial")
                 + world.questions(9, level="attribute", split="counterfactual"))
    world.export(tmp_path / "questions", questions)
    result = CliRunner().invoke(app, ["report", "--model", "shapes-llava", "--device", "cpu", "--maps", "1",
                                      "--folder", str(tmp_path / "questions"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "Errors per cause" in result.output
    numbers = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sum(r["n"] for r in numbers["levels"]) == 15
    assert {r["level"] for r in numbers["levels"]} == {"object", "attribute"}
    assert "from the export folder" in (tmp_path / "out" / "report.html").read_text()
