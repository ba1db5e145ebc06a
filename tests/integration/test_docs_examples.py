"""The README's and the docs' Python examples run as written.

Every ```python block of README.md and docs/*.md is executed: the blocks of one file in order, in
one namespace (a later block may use the names an earlier one defined), in a temporary working
directory, on the shipped reference model and tiny models, offline. A block that cannot run here
(a hub checkpoint, CUDA, a Ray cluster, NDIF) is preceded by ``<!-- not run: <reason> -->`` on the
line before its fence; it is skipped, and its reason must be given. A failing block is reported by
file, line and first line, and its traceback points at the markdown line that raised.

The last tests hold what the README's attribution examples rely on: an answer of several tokens is
refused with a suggestion (the first token's id, or the first word) that works when passed back.
"""
from __future__ import annotations

import re
import textwrap
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pytest

import lvlm_probe as lp
from lvlm_probe.errors import InputError

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:(?P<reason>.*?)-->\s*$")
# seconds for one file's blocks: the README's take about 5 s on an idle 2-core CPU machine and up to
# 100 s while other jobs share it; the limit leaves room for that and catches examples that grow
# to minutes
TIME_LIMIT = 180.0


@dataclass(frozen=True)
class Block:
    """One fenced code block of a markdown file.

    ``line`` is the 1-based line number of the opening fence; ``code`` is dedented (a block
    inside a list item is indented in the markdown). ``skip`` is the reason of a preceding
    ``<!-- not run: ... -->`` comment (possibly empty), or None for a block that runs.
    """

    path: Path
    line: int
    lang: str
    code: str
    skip: str | None

    @property
    def first_line(self) -> str:
        return next((s.strip() for s in self.code.splitlines() if s.strip()), "")

    def where(self) -> str:
        name = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{name}:{self.line} ({self.first_line!r})"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path`` with its language and its not-run reason, in file order."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{path.name}:{i + 1}: a code fence that is never closed")
        previous = NOT_RUN.match(lines[i - 1]) if i else None
        found.append(Block(path, i + 1, opening["lang"], textwrap.dedent("\n".join(lines[i + 1:end])),
                           previous["reason"].strip() if previous else None))
        i = end + 1
    return found


def python_blocks(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.lang == "python"]


def run_blocks(path: Path) -> float:
    """Run the python blocks of ``path`` that are not marked not-run, in order and in one
    namespace, in the current directory; return the seconds they took.

    Each block is compiled with the markdown's file name and padded so that its line numbers are
    the markdown's, so a traceback points at the line of the document that raised.
    """
    import matplotlib.pyplot as plt

    namespace: dict = {"__name__": f"docs_{path.stem}"}
    start = time.perf_counter()
    try:
        for block in python_blocks(path):
            if block.skip is not None:
                continue
            code = compile("\n" * block.line + block.code, str(path), "exec")
            try:
                exec(code, namespace)
            except Exception:
                pytest.fail(f"the example at {block.where()} failed:\n{traceback.format_exc()}",
                            pytrace=False)
    finally:
        plt.close("all")
    return time.perf_counter() - start


DOC_FILES = [p for p in DOCS if python_blocks(p)]


def test_runner_shares_names_skips_not_run_blocks_and_names_the_failing_line(tmp_path, monkeypatch):
    """The harness itself: one namespace per file, not-run blocks skipped, a failure reported with
    the block's markdown line, its first line and the line that raised."""
    doc = tmp_path / "example.md"
    doc.write_text("\n".join([
        "# Example", "", "```python", "x = 2", "```", "",
        "<!-- not run: would raise -->", "```python", "raise RuntimeError('never run')", "```", "",
        "```bash", "exit 1", "```", "",
        "   ```python", "   y = x * 3", "   assert y == 7, f'y is {y}'", "   ```", ""]))
    found = blocks(doc)
    assert [(b.line, b.lang, b.skip) for b in found] == [(3, "python", None), (8, "python", "would raise"),
                                                        (12, "bash", None), (16, "python", None)]
    assert found[3].code == "y = x * 3\nassert y == 7, f'y is {y}'"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pytest.fail.Exception) as failed:
        run_blocks(doc)
    message = str(failed.value)
    assert "example.md:16 ('y = x * 3')" in message, message
    assert f'File "{doc}", line 18' in message and "y is 6" in message, message


def test_docs_hold_python_examples():
    """The parametrization below is not empty: README.md and the docs hold python examples."""
    names = [p.name for p in DOC_FILES]
    assert "README.md" in names and len(names) >= 4, f"python examples found only in {names}"


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_not_run_blocks_say_why(path):
    """A block marked not-run names its reason, and every not-run comment applies to a python block."""
    marked = [b for b in python_blocks(path) if b.skip is not None]
    empty = [b.where() for b in marked if not b.skip]
    assert not empty, f"not-run blocks without a reason (write `<!-- not run: <reason> -->`): {empty}"
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if re.search(r"<!--\s*not run", line):  # each such comment must be one that applies
            fence = FENCE.match(lines[number]) if number < len(lines) else None
            assert NOT_RUN.match(line) and fence and fence["lang"] == "python", (
                f"{path.name}:{number}: {line.strip()!r} must read `<!-- not run: <reason> -->` and sit on "
                "the line right before a ```python fence")


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(path, tmp_path, monkeypatch):
    """Every python block of the file that is not marked not-run runs, in order, in a fresh folder."""
    monkeypatch.chdir(tmp_path)
    elapsed = run_blocks(path)
    assert elapsed < TIME_LIMIT, f"{path.name}'s examples took {elapsed:.0f} s (limit {TIME_LIMIT:.0f} s)"


# --- answers of several tokens: the error's suggestions work (issue finding: the README's
# target="yes" failed on tiny models whose vocabularies split "yes", and the fix the error
# suggested was the string that had been passed) ------------------------------------------------

SUGGESTED_ID = re.compile(r"pass a token id, e\.g\. (?P<id>\d+) for (?P<piece>'[^']*'|\"[^\"]*\")")
SUGGESTED_WORD = re.compile(r"score its first word, (?P<word>'[^']*'|\"[^\"]*\")")


@pytest.fixture(scope="module")
def qwen_batch():
    """Tiny Qwen2-VL, whose vocabulary splits "yes" into 'y' + 'es', with a yes/no question."""
    from PIL import Image

    model = lp.zoo.tiny("qwen2_vl", device="cpu")
    batch = model.prepare(images=[Image.new("RGB", (64, 48), "white")],
                          prompts=["Is there a red heart? Answer yes or no."])
    return model, batch


def refusal(model, batch, target) -> str:
    """The message of the error ``source_split`` raises for ``target`` (it must raise one)."""
    with pytest.raises(InputError) as caught:
        lp.attribution.source_split(model, batch, target=target, foil="no")
    return str(caught.value)


@pytest.mark.parametrize("target", ["yes", "yes please", "No way"])
def test_several_token_target_suggests_a_token_id_that_works(qwen_batch, target):
    model, batch = qwen_batch
    pieces = model.tokenizer.convert_ids_to_tokens(model.continuation_tokens(batch, 0, target))
    assert len(pieces) > 1, f"{target!r} is one token on this vocabulary; the test needs several"
    message = refusal(model, batch, target)
    assert repr(target) in message and str(pieces) in message, message
    suggested = SUGGESTED_ID.search(message)
    assert suggested, f"no token id suggested in: {message}"
    token = int(suggested["id"])
    assert token == model.continuation_tokens(batch, 0, target)[0]
    assert suggested["piece"].strip("'\"") == pieces[0]
    split = lp.attribution.source_split(model, batch, target=token, foil="no")  # the fix works
    assert split.targets == [model.tokenizer.decode([token])]


# "yes please": the first word is two tokens itself, so it must not be suggested
@pytest.mark.parametrize("target", ["No way", "yes please", "dark red"])
def test_several_word_target_suggests_a_first_word_that_works(qwen_batch, target):
    model, batch = qwen_batch
    message = refusal(model, batch, target)
    suggested = SUGGESTED_WORD.search(message)
    first = target.split()[0]
    if suggested is None:  # right only where the first word would be refused too
        assert len(model.continuation_tokens(batch, 0, first)) > 1, \
            f"{first!r} is one token, but the message does not suggest it: {message}"
        return
    word = suggested["word"].strip("'\"")
    assert word == first
    split = lp.attribution.source_split(model, batch, target=word, foil="no")  # the fix works
    assert split.targets == [model.tokenizer.decode(model.continuation_tokens(batch, 0, word))]
